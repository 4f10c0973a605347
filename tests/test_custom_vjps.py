"""Our hand-written backward passes against autodiff (the oracle): the log-sum-exp attention
against jax.nn.dot_product_attention on ragged and packed rows, SwiGLU's gated_silu, the
LayerNorm / RMSNorm normalize and RoPE; outputs and gradients, and what each backward keeps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals

from fitv2_jax.models import rope as rope_lib
from fitv2_jax.models.layers import gated_silu, normalize
from fitv2_jax.models.rope import apply_rope
from fitv2_jax.models.softmax_attention import softmax_attention


def _inputs(dtype, n=40, heads=3, dh=16):
    rng = np.random.default_rng(0)
    q, k, v, d_out = (jnp.asarray(2 * rng.standard_normal((4, n, heads, dh)), dtype)
                      for _ in range(4))  # fmt: skip
    seg = np.zeros((4, n), np.int32)
    seg[0, :30] = 1  # ragged: 30 real tokens, 10 padding (padding attends padding)
    seg[1, :] = 1  # full row
    seg[2, :10], seg[2, 10:25], seg[2, 25:33] = 1, 2, 3  # three packed images + padding
    seg[3, :1] = 1  # one real token
    return q, k, v, d_out, jnp.asarray(seg)


def _reference(q, k, v, seg):
    mask = seg[:, None, :, None] == seg[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=mask)


def _out_and_grads(fn, q, k, v, d_out, seg):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, seg), q, k, v)
    return (out, *vjp(d_out))


def _max_relative(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _keeping_probs(q, k, v, seg):
    return softmax_attention(q, k, v, seg, None, True)


@pytest.mark.parametrize("fn", [softmax_attention, _keeping_probs], ids=["lse", "probs"])
def test_outputs_and_gradients_equal_autodiff_of_xla_attention_in_float32(fn):
    """Both backwards, the one recomputing the probabilities from the log-sum-exp and the one
    keeping them (TPU without remat, `attention.saves_probs`)."""
    q, k, v, d_out, seg = _inputs(jnp.float32)
    ours = jax.jit(lambda *a: _out_and_grads(fn, *a))(q, k, v, d_out, seg)
    ref = jax.jit(lambda *a: _out_and_grads(_reference, *a))(q, k, v, d_out, seg)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert _max_relative(a, b) < 1e-5, (name, _max_relative(a, b))
    # the packed rows' images do not see each other: a key of image 2 does not move image 1
    k2 = k.at[2, 12].add(5.0)
    moved = fn(q, k2, v, seg) - fn(q, k, v, seg)
    assert float(jnp.max(jnp.abs(moved[2, :10]))) == 0.0
    assert float(jnp.max(jnp.abs(moved[2, 10:25]))) > 1e-3


@pytest.mark.parametrize("fn", [softmax_attention, _keeping_probs], ids=["lse", "probs"])
def test_bfloat16_stays_within_its_rounding_of_the_float32_oracle(fn):
    """Kept probabilities are bfloat16 (those the forward's value product used): the gradients
    stay within the same tolerance as the float32 recomputation's."""
    q, k, v, d_out, seg = _inputs(jnp.bfloat16)
    ours = _out_and_grads(fn, q, k, v, d_out, seg)
    f32 = [a.astype(jnp.float32) for a in (q, k, v, d_out)]
    exact = _out_and_grads(_reference, *f32, seg)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, exact, strict=True):
        assert a.dtype == jnp.bfloat16, name
        assert _max_relative(a, b) < 2e-2, (name, _max_relative(a, b))  # bf16: 8 mantissa bits


def _unit_norm(x):
    """Each head vector normalised as unweighted LayerNorm does: norm below sqrt(Dh)."""
    return normalize(x.astype(jnp.float32), True, 1e-6).astype(x.dtype)


@pytest.mark.parametrize("magnitude", [1.0, 2.0])
def test_a_static_shift_for_bounded_logits_gives_the_row_max_attention(magnitude):
    """q and k out of LayerNorm (times a RoPE-like magnitude factor) have logits below
    magnitude^2 sqrt(Dh): subtracting the static sqrt(Dh) (models.attention.logit_bound) instead
    of each row's max gives the same outputs and gradients in float32, and the forward and
    backward then hold no max reduction."""
    q, k, v, d_out, seg = _inputs(jnp.float32)
    q, k = magnitude * _unit_norm(q), magnitude * _unit_norm(k)
    bound = q.shape[-1] ** 0.5
    shifted = lambda q, k, v, seg: softmax_attention(q, k, v, seg, bound)
    ours = jax.jit(lambda *a: _out_and_grads(shifted, *a))(q, k, v, d_out, seg)
    row_max = jax.jit(lambda *a: _out_and_grads(softmax_attention, *a))(q, k, v, d_out, seg)
    ref = jax.jit(lambda *a: _out_and_grads(_reference, *a))(q, k, v, d_out, seg)
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), ours, row_max, ref, strict=True):
        assert _max_relative(a, b) < 1e-6, (name, _max_relative(a, b))
        assert _max_relative(a, c) < 1e-5, (name, _max_relative(a, c))
    jaxpr = lambda fn: str(jax.make_jaxpr(lambda *a: _out_and_grads(fn, *a))(q, k, v, d_out, seg))
    assert "reduce_max" in jaxpr(softmax_attention) and "reduce_max" not in jaxpr(shifted)


@pytest.mark.parametrize("fn, keeps_probabilities", [(_reference, True),
                                                     (softmax_attention, False),
                                                     (_keeping_probs, True)])  # fmt: skip
def test_the_backward_keeps_no_n_by_n_array(fn, keeps_probabilities):
    q, k, v, _, seg = _inputs(jnp.float32)
    n = q.shape[1]
    shapes = [aval.shape for aval, _ in saved_residuals(lambda q, k, v: fn(q, k, v, seg), q, k, v)]
    square = [s for s in shapes if len(s) >= 2 and s[-2:] == (n, n)]
    assert bool(square) == keeps_probabilities, shapes


@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_gated_silu_gradients_equal_autodiff_and_keep_only_its_inputs(dtype, tolerance):
    rng = np.random.default_rng(1)
    gate, val, d_out = (jnp.asarray(3 * rng.standard_normal((8, 33)), dtype) for _ in range(3))
    autodiff = lambda g, v: jax.nn.silu(g) * v
    out, vjp = jax.vjp(gated_silu, gate, val)
    ref_out, ref_vjp = jax.vjp(autodiff, gate, val)
    assert out.dtype == dtype and _max_relative(out, ref_out) == 0.0
    for a, b in zip(vjp(d_out), ref_vjp(d_out), strict=True):
        assert a.dtype == dtype and _max_relative(a, b) < tolerance
    kept = saved_residuals(gated_silu, gate, val)
    assert [aval.shape for aval, _ in kept] == [gate.shape, val.shape]
    assert len(saved_residuals(autodiff, gate, val)) > 2  # what the custom backward saves


def _autodiff_normalize(x, centered, eps):  # the forward Norm ran before its custom backward
    if centered:
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + eps)
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


@pytest.mark.parametrize("centered", [True, False], ids=["layernorm", "rmsnorm"])
def test_normalize_gradients_equal_autodiff_and_keep_x_and_row_statistics(centered):
    rng = np.random.default_rng(2)
    # an offset mean and a wide spread, and a row near the eps floor
    x = rng.standard_normal((6, 5, 48)) * rng.uniform(0.1, 10, (6, 5, 1)) + 3.0
    x[0, 0] = 1e-4 * rng.standard_normal(48)
    x, d_out = jnp.asarray(x, jnp.float32), jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    fn = lambda x: normalize(x, centered, 1e-6)
    ref_fn = lambda x: _autodiff_normalize(x, centered, 1e-6)
    out, vjp = jax.vjp(fn, x)
    ref_out, ref_vjp = jax.vjp(ref_fn, x)
    assert _max_relative(out, ref_out) == 0.0  # the forward is the same arithmetic
    (d_x,), (ref_d_x,) = vjp(d_out), ref_vjp(d_out)
    for row in np.ndindex(x.shape[:2]):  # each row at its own scale (1/std spans 1e4)
        assert _max_relative(d_x[row], ref_d_x[row]) < 1e-5, row
    if centered:  # the gradient of a centred output has zero mean
        assert float(jnp.max(jnp.abs(jnp.mean(d_x, axis=-1)))) < 1e-3
    kept = [aval.shape for aval, _ in saved_residuals(fn, x)]
    row = x.shape[:-1] + (1,)
    assert sorted(kept) == sorted([x.shape, row, row] if centered else [x.shape, row]), kept
    assert len(saved_residuals(ref_fn, x)) > 2


@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_rope_backward_is_the_inverse_rotation_and_keeps_no_activation(dtype, tolerance):
    """apply_rope off TPU: rotate_back_in_backward."""
    from fitv2_jax.models.rope import _rotate, apply_rope

    rng = np.random.default_rng(3)
    x, d_out = (jnp.asarray(rng.standard_normal((2, 7, 3, 16)), dtype) for _ in range(2))
    angle = rng.uniform(-np.pi, np.pi, (2, 7, 8))
    magnitude = 1.3  # yarn / ntk-pro scale cos and sin: the map is not a pure rotation
    cos, sin = (jnp.asarray(magnitude * f(angle), jnp.float32) for f in (np.cos, np.sin))
    out, vjp = jax.vjp(lambda x: apply_rope(x, cos, sin), x)
    ref_out, ref_vjp = jax.vjp(lambda x: _rotate(x, cos, sin), x)
    assert out.dtype == dtype and _max_relative(out, ref_out) == 0.0
    (d_x,), (ref_d_x,) = vjp(d_out), ref_vjp(d_out)
    assert d_x.dtype == dtype and _max_relative(d_x, ref_d_x) < tolerance
    kept = [aval.shape for aval, _ in saved_residuals(lambda x: apply_rope(x, cos, sin), x)]
    assert x.shape not in kept, kept


@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_rope_backward_is_autodiffs_rotation_with_minus_sin(dtype, tolerance):
    """apply_rope's backward (the same rotation with -sin, one pass; every platform since
    2026-12-04) against autodiff of the plain rotation: equal gradients for x in both dtypes."""
    rng = np.random.default_rng(3)
    x, d_out = (jnp.asarray(rng.standard_normal((2, 12, 3, 8)), dtype) for _ in range(2))
    angles = jnp.asarray(rng.uniform(0, 6.3, (2, 12, 4)), jnp.float32)
    cos, sin = 1.3 * jnp.cos(angles), 1.3 * jnp.sin(angles)  # a magnitude factor as in yarn
    ours = jax.vjp(lambda x: apply_rope(x, cos, sin), x)
    plain = jax.vjp(lambda x: rope_lib._rotate(x, cos, sin), x)
    assert _max_relative(ours[0], plain[0]) == 0.0
    d_ours, d_plain = ours[1](d_out)[0], plain[1](d_out)[0]
    assert d_ours.dtype == dtype and _max_relative(d_ours, d_plain) < tolerance
    # the inverse map for a pure rotation: rotating back undoes the rotation
    unit_cos, unit_sin = jnp.cos(angles), jnp.sin(angles)
    back = rope_lib._rotate(apply_rope(x.astype(jnp.float32), unit_cos, unit_sin), unit_cos,
                            -unit_sin)  # fmt: skip
    assert _max_relative(back, x.astype(jnp.float32)) < 1e-5


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_ropes_tpu_form_finds_partners_by_a_permutation_matmul_and_equals_the_halves(
    dtype, monkeypatch
):
    """On TPU `apply_rope` rotates with a (head_dim, head_dim) permutation matmul instead of
    slicing the halves: the same values bit for bit, forward and backward, in both dtypes."""
    rng = np.random.default_rng(5)
    x, d_out = (jnp.asarray(rng.standard_normal((2, 9, 3, 72)), dtype) for _ in range(2))
    angles = jnp.asarray(rng.uniform(0, 6.3, (2, 9, 36)), jnp.float32)
    cos, sin = 1.3 * jnp.cos(angles), 1.3 * jnp.sin(angles)
    halves = jax.vjp(lambda x: apply_rope(x, cos, sin), x)
    halves_ops = str(jax.make_jaxpr(lambda x: apply_rope(x, cos, sin))(x))
    monkeypatch.setattr(rope_lib, "compiling_for_tpu", lambda: True)
    tpu = jax.vjp(lambda x: apply_rope(x, cos, sin), x)
    tpu_ops = str(jax.make_jaxpr(jax.grad(lambda x: apply_rope(x, cos, sin).sum()))(x))
    assert "dot_general" in tpu_ops and "dot_general" not in halves_ops
    np.testing.assert_array_equal(np.asarray(tpu[0], np.float32), np.asarray(halves[0], np.float32))
    d_tpu, d_halves = tpu[1](d_out)[0], halves[1](d_out)[0]
    assert d_tpu.dtype == dtype
    np.testing.assert_array_equal(np.asarray(d_tpu, np.float32), np.asarray(d_halves, np.float32))
