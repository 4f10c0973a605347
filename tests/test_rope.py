"""RoPE rules against hand-derived values and the defining properties of rotary embeddings."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from fitv2_jax.models.rope import (
    RopeConfig,
    apply_rope,
    axis_freqs,
    head_channel_order,
    magnitude,
    rope_cos_sin,
)


def grid_of(h, w):
    return np.stack([np.tile(np.arange(w), h), np.repeat(np.arange(h), w)])[None].astype(np.int32)


def test_normal_rope_logits_depend_only_on_relative_position():
    cfg = RopeConfig(head_dim=16)
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 1, 1, 16)).astype(np.float32)
    k = rng.standard_normal((1, 1, 1, 16)).astype(np.float32)

    def logit(pq, pk):
        grid = np.array([[[pq[1], pk[1]], [pq[0], pk[0]]]], np.int32)  # rows: w, h
        cos, sin = rope_cos_sin(cfg, jnp.asarray(grid))
        qr = apply_rope(jnp.asarray(np.concatenate([q, q], 1)), cos, sin)[0, 0, 0]
        kr = apply_rope(jnp.asarray(np.concatenate([k, k], 1)), cos, sin)[0, 1, 0]
        return float(jnp.dot(qr, kr))

    base = logit((2, 3), (5, 1))
    assert logit((7, 9), (10, 7)) == pytest.approx(base, abs=1e-4)  # shifted by (5, 6)
    assert logit((2, 3), (5, 2)) != pytest.approx(base, abs=1e-3)


def test_rotation_layout_first_half_follows_h_second_half_follows_w():
    cfg = RopeConfig(head_dim=8, theta=10000.0)
    cos, sin = rope_cos_sin(cfg, jnp.asarray(np.array([[[3], [2]]], np.int32)))  # w=3, h=2
    freqs = 1.0 / 10000.0 ** (np.arange(0, 4, 2) / 4)  # D = 4 channels per axis, 2 pairs
    expected = np.concatenate([2 * freqs, 3 * freqs])
    np.testing.assert_allclose(np.asarray(cos)[0, 0], np.cos(expected), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(sin)[0, 0], np.sin(expected), rtol=1e-6)
    x = np.arange(8, dtype=np.float32).reshape(1, 1, 1, 8)
    out = np.asarray(apply_rope(jnp.asarray(x), cos, sin))[0, 0, 0]
    # our layout: pair j is channels (j, j + 4), rotated by expected[j]
    for j in range(4):
        a, b, th = x[0, 0, 0, j], x[0, 0, 0, j + 4], expected[j]
        np.testing.assert_allclose(
            out[[j, j + 4]],
            [a * math.cos(th) - b * math.sin(th), b * math.cos(th) + a * math.sin(th)],
            rtol=1e-5,
            atol=1e-5,
        )


def test_our_channel_order_carries_the_official_interleaved_rotation():
    """apply_rope on channels in head_channel_order == the official rotation of interleaved
    pairs (x[2j], x[2j+1]), reordered the same way; bit for bit (the same products)."""
    head_dim = 72
    cfg = RopeConfig(head_dim=head_dim)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 30, 3, head_dim)).astype(np.float32)  # official order
    grid = np.stack([rng.integers(0, 16, (2, 30)), rng.integers(0, 16, (2, 30))], 1)
    cos, sin = (np.asarray(a) for a in rope_cos_sin(cfg, jnp.asarray(grid, jnp.int32)))
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    official = np.stack([even * c - odd * s, odd * c + even * s], -1).reshape(x.shape)
    order = head_channel_order(head_dim)
    np.testing.assert_array_equal(order[:4], [0, 2, 4, 6])
    np.testing.assert_array_equal(order[36:40], [1, 3, 5, 7])
    ours = np.asarray(apply_rope(jnp.asarray(x[..., order]), jnp.asarray(cos), jnp.asarray(sin)))
    np.testing.assert_array_equal(ours, official[..., order])


def test_ntk_aware_base_change_by_hand():
    d, s = 16, 2.0
    got = np.asarray(axis_freqs("ntk-aware", 10000.0, d, jnp.float32(s), 16))
    base = 10000.0 * s ** (d / (d - 2))
    np.testing.assert_allclose(got, [base ** (-2 * j / d) for j in range(d // 2)], rtol=1e-5)


def test_linear_rule_is_position_interpolation():
    s = 1.5
    cfg_pi = RopeConfig(
        head_dim=16, custom_freqs="linear", max_pe_len_h=24, max_pe_len_w=24, ori_max_pe_len=16
    )
    grid = grid_of(3, 24)
    cos_pi, _ = rope_cos_sin(cfg_pi, jnp.asarray(grid))
    freqs = 1.0 / 10000.0 ** (np.arange(0, 8, 2) / 8)
    angles_w = (grid[0, 0] / s)[:, None] * freqs
    np.testing.assert_allclose(np.asarray(cos_pi)[0, :, 4:], np.cos(angles_w), rtol=1e-5, atol=1e-6)


def test_yarn_keeps_fast_and_interpolates_slow_frequencies():
    d, s = 32, 4.0
    f = np.asarray(axis_freqs("yarn", 10000.0, d, jnp.float32(s), 16))
    base = 1.0 / 10000.0 ** (np.arange(0, d, 2) / d)
    assert f[0] == pytest.approx(base[0])  # many rotations over 16 positions: extrapolate
    assert f[-1] == pytest.approx(base[-1] / s, rel=1e-5)  # < 1 rotation: interpolate
    assert float(magnitude("yarn", 64.0, 16.0, 16)) == pytest.approx(0.1 * math.log(4) + 1)


def test_attention_scale_factors_by_hand():
    # pro2: sqrt(log(2 h w) / log(16^2)) for 20 x 20 patches; 1 inside the training area
    assert float(magnitude("ntk-aware-pro2", 20.0, 20.0, 16)) == pytest.approx(
        math.sqrt(math.log(800) / math.log(256)), rel=1e-6
    )
    assert float(magnitude("ntk-aware-pro2", 8.0, 8.0, 16)) == 1.0
    assert float(magnitude("ntk-aware-pro1", 10.0, 30.0, 16)) == pytest.approx(
        math.sqrt(math.log(60) / math.log(16)), rel=1e-6
    )


def test_decoupled_scales_each_axis_separately():
    kw = dict(
        head_dim=16, custom_freqs="ntk-aware", max_pe_len_h=16, max_pe_len_w=32, ori_max_pe_len=16
    )
    grid = grid_of(2, 32)
    cos_dec, _ = rope_cos_sin(RopeConfig(decouple=True, **kw), jnp.asarray(grid))
    cos_cpl, _ = rope_cos_sin(RopeConfig(decouple=False, **kw), jnp.asarray(grid))
    cos_plain, _ = rope_cos_sin(RopeConfig(head_dim=16), jnp.asarray(grid))
    # h is within the training range: decoupled leaves it alone, coupled scales it by s = 2
    np.testing.assert_allclose(
        np.asarray(cos_dec)[..., :4], np.asarray(cos_plain)[..., :4], atol=1e-6
    )
    assert not np.allclose(np.asarray(cos_cpl)[..., :4], np.asarray(cos_plain)[..., :4], atol=1e-3)
    np.testing.assert_allclose(
        np.asarray(cos_dec)[..., 4:], np.asarray(cos_cpl)[..., 4:], atol=1e-6
    )


def test_online_rope_uses_each_samples_size():
    cfg = RopeConfig(
        head_dim=16, custom_freqs="ntk-aware", decouple=True, ori_max_pe_len=16, online_rope=True
    )
    grid = np.concatenate([grid_of(4, 8), grid_of(4, 8)])
    cos, _ = rope_cos_sin(cfg, jnp.asarray(grid), jnp.asarray([[4, 8], [4, 64]]))
    plain, _ = rope_cos_sin(RopeConfig(head_dim=16), jnp.asarray(grid[:1]))
    np.testing.assert_allclose(np.asarray(cos)[0], np.asarray(plain)[0], atol=1e-6)  # inside 16x16
    assert not np.allclose(np.asarray(cos)[1, :, 4:], np.asarray(plain)[0, :, 4:], atol=1e-3)


def test_config_errors_name_the_missing_setting():
    with pytest.raises(ValueError, match="ori_max_pe_len"):
        RopeConfig(head_dim=16, custom_freqs="ntk-aware")
    with pytest.raises(ValueError, match="max_pe_len_h"):
        RopeConfig(head_dim=16, custom_freqs="yarn", ori_max_pe_len=16)
    with pytest.raises(ValueError, match="custom_freqs"):
        RopeConfig(head_dim=16, custom_freqs="ntk")
    with pytest.raises(ValueError, match="size"):
        rope_cos_sin(
            RopeConfig(head_dim=16, custom_freqs="linear", ori_max_pe_len=16, online_rope=True),
            jnp.asarray(grid_of(2, 2)),
        )
