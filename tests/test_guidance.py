"""Classifier-free guidance against hand formulas on a tiny hand-written fake model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fitv2_jax.flow import guidance

P, CIN, N, B = 2, 4, 5, 3
CV = P * P * CIN  # 16 velocity channels, layout (c, p1, p2): channel c is [4c, 4c + 4)
NULL = 10
rng = np.random.default_rng(0)
GAIN = jnp.asarray(rng.uniform(0.5, 2.0, size=(NULL + 1, 2 * CV)), jnp.float32)
BIAS = jnp.asarray(rng.normal(size=(NULL + 1, 2 * CV)), jnp.float32)
calls = []


def fake_model(c_out=CV):
    """model_apply: label- and time-dependent affine map of the tokens, (B, N, c_out)."""

    def apply(x, t, y, grid, mask, size):
        calls.append((x.shape[0], np.asarray(y)))
        xx = jnp.concatenate([x, -x], -1)[..., :c_out]
        out = xx * GAIN[y][:, None, :c_out] + t[:, None, None] * BIAS[y][:, None, :c_out]
        return out * mask[..., None] + 0.0 * grid[:, :1, :].transpose(0, 2, 1)

    return apply


def inputs(seed=0):
    k = jax.random.key(seed)
    x = jax.random.normal(k, (B, N, CV))
    t = jnp.array([0.1, 0.5, 0.9])
    y = jnp.array([3, 7, 0])
    grid = jnp.zeros((B, 2, N), jnp.int32)
    mask = jnp.ones((B, N)).at[2, 3:].set(0)
    return x, t, y, grid, mask


def separate(apply, x, t, y, grid, mask):
    """Oracle: two independent model calls, conditional and with the null label."""
    cond = apply(x, t, y, grid, mask, None)
    uncond = apply(x, t, jnp.full_like(y, NULL), grid, mask, None)
    return np.asarray(cond), np.asarray(uncond)


def test_one_doubled_call_with_null_labels():
    x, t, y, grid, mask = inputs()
    calls.clear()
    guidance.cfg_velocity(fake_model(), x, t, y, grid, mask, None, cfg_scale=1.5, null_label=NULL)
    assert len(calls) == 1
    batch, labels = calls[0]
    assert batch == 2 * B
    np.testing.assert_array_equal(labels, [3, 7, 0, NULL, NULL, NULL])


def test_scale_one_is_the_conditional_model():
    x, t, y, grid, mask = inputs()
    apply = fake_model()
    v = guidance.cfg_velocity(apply, x, t, y, grid, mask, None, cfg_scale=1.0, null_label=NULL)
    cond, _ = separate(apply, x, t, y, grid, mask)
    np.testing.assert_allclose(v, cond, atol=1e-6)
    # and the no-guidance fast path makes a single B-sized call
    calls.clear()
    fn = guidance.make_velocity_fn(apply, y, grid, mask, cfg_scale=1.0, null_label=NULL)
    np.testing.assert_array_equal(fn(x, t), cond)
    assert [c[0] for c in calls] == [B]


@pytest.mark.parametrize("channels,n_guided", [("official", 3 * P * P), ("all", CV)])
def test_guided_channels(channels, n_guided):
    x, t, y, grid, mask = inputs(1)
    apply = fake_model()
    s = 4.0
    v = np.asarray(
        guidance.cfg_velocity(
            apply, x, t, y, grid, mask, None, cfg_scale=s, null_label=NULL, channels=channels
        )
    )
    cond, uncond = separate(apply, x, t, y, grid, mask)
    want = uncond + s * (cond - uncond)
    np.testing.assert_allclose(v[..., :n_guided], want[..., :n_guided], rtol=1e-5, atol=1e-5)
    # official: the 4th latent channel (last p*p output channels) stays exactly conditional
    np.testing.assert_array_equal(v[..., n_guided:], cond[..., n_guided:])
    assert not np.allclose(want[..., n_guided:], cond[..., n_guided:]) or n_guided == CV


def test_power_cosine_schedule_table():
    t = jnp.array([0.0, 0.5, 1.0, 1.2])
    # scale_pow 1: s(t) = (cfg - 1)(1 - cos(pi (1 - t)))/2 + 1, t clamped to 1
    np.testing.assert_allclose(
        guidance.guidance_scale(t, 3.0, 1.0), [3.0, 2.0, 1.0, 1.0], atol=1e-6
    )
    # scale_pow 2 at t = 0.5: (1 - cos(pi / 4)) / 2 = 0.1464466
    np.testing.assert_allclose(guidance.guidance_scale(t[1:2], 3.0, 2.0), [1.2928932], rtol=1e-6)
    np.testing.assert_allclose(guidance.guidance_scale(t, 1.5, 0.0), 1.5)
    # used per sample inside cfg_velocity (times 0.1, 0.5, 0.9 differ)
    x, t, y, grid, mask = inputs(2)
    apply = fake_model()
    v = guidance.cfg_velocity(
        apply, x, t, y, grid, mask, None, cfg_scale=3.0, null_label=NULL, scale_pow=1.0
    )
    cond, uncond = separate(apply, x, t, y, grid, mask)
    s = 2.0 * (1 - np.cos(np.pi * (1 - np.asarray(t)))) / 2 + 1
    want = uncond + s[:, None, None] * (cond - uncond)
    np.testing.assert_allclose(np.asarray(v)[..., :12], want[..., :12], rtol=1e-5, atol=1e-5)


def test_guidance_interval():
    x, t, y, grid, mask = inputs(3)
    apply = fake_model()
    v = np.asarray(
        guidance.cfg_velocity(
            apply, x, t, y, grid, mask, None, cfg_scale=2.0, null_label=NULL, interval=(0.3, 0.7)
        )
    )
    cond, uncond = separate(apply, x, t, y, grid, mask)
    np.testing.assert_array_equal(v[[0, 2]], cond[[0, 2]])  # t = 0.1, 0.9: outside
    want = uncond[1, ..., :12] + 2.0 * (cond[1, ..., :12] - uncond[1, ..., :12])
    np.testing.assert_allclose(v[1, ..., :12], want, rtol=1e-5, atol=1e-5)


def test_learn_sigma_velocity_is_the_first_half():
    x, t, y, grid, mask = inputs(4)
    apply = fake_model(2 * CV)
    v = guidance.cfg_velocity(
        apply, x, t, y, grid, mask, None, cfg_scale=2.0, null_label=NULL, learn_sigma=True
    )
    cond, uncond = separate(apply, x, t, y, grid, mask)
    assert v.shape == x.shape
    want = np.concatenate(
        [uncond[..., :12] + 2 * (cond[..., :12] - uncond[..., :12]), cond[..., 12:CV]], -1
    )
    np.testing.assert_allclose(v, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="channels per token"):
        guidance.cfg_velocity(apply, x, t, y, grid, mask, None, cfg_scale=2.0, null_label=NULL)


def test_doubled_state_matches_the_official_layout():
    x, t, y, grid, mask = inputs(5)
    apply = fake_model()
    ghost = jnp.zeros_like(x) + 123.0  # never read by the model
    v2 = np.asarray(
        guidance.cfg_velocity_doubled_state(
            apply,
            jnp.concatenate([x, ghost]),
            jnp.concatenate([t, t]),
            y,
            grid,
            mask,
            None,
            cfg_scale=2.0,
            null_label=NULL,
        )
    )
    v = guidance.cfg_velocity(apply, x, t, y, grid, mask, None, cfg_scale=2.0, null_label=NULL)
    cond, uncond = separate(apply, x, t, y, grid, mask)
    np.testing.assert_array_equal(v2[:B], v)
    np.testing.assert_array_equal(v2[B:, ..., :12], v2[:B, ..., :12])
    np.testing.assert_array_equal(v2[B:, ..., 12:], uncond[..., 12:])


def test_bad_channel_mode():
    x, t, y, grid, mask = inputs()
    with pytest.raises(ValueError, match="channels mode"):
        guidance.cfg_velocity(
            fake_model(), x, t, y, grid, mask, None, cfg_scale=2.0, null_label=NULL, channels="3"
        )
