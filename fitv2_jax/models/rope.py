"""2D rotary position embedding (RoPE) for FiT and every resolution-extrapolation rule.

Official layout: for a head of size `head_dim`, the first head_dim/2 channels are rotated by the
token's row index h, the last head_dim/2 by its column index w. Each axis uses D = head_dim/2
channels as D/2 interleaved pairs (x[2j], x[2j+1]) rotated by angle pos * freq_j, with
freq_j = theta^(-2j/D); so pair j of the head (j < head_dim/2) has angle index j of `cos, sin`.

Our layout stores every head's channels in `head_channel_order`: the official even channels, then
the odd ones. Pair j is then (x[j], x[j + head_dim/2]), and the rotation works on the two halves of
the head, with no axis of size 2. Attention is unchanged by the same reordering of the q, k and v
channels of every head (and of the output projection's inputs), which `models.convert` applies to
official checkpoints. Why: on TPU the pairs' axis of size 2 made XLA split the heads into
(36, 2)-shaped arrays and relayout them around every RoPE, q/k norm and their backward passes;
with halves, FiTv2-XL/2 on v5p-64 (XLA attention, full remat) went from 74.6 to 66.7 ms per step
by the compiler's estimate (`train --dry_run --topology v5p-64`).

Extrapolation rules (`custom_freqs`), with s = max(L_test / L_train, 1) per axis ("decouple") or
from the longer side, L_train = `ori_max_pe_len` (16 patches for the 256-token models):
  normal          plain RoPE, no scaling
  linear          position interpolation: freq / s
  ntk-aware       base theta * s^(D / (D - 2))
  ntk-by-parts    NTK blended with linear and the original by rotation-count ramps (LLaMA constants)
  yarn            interpolation / extrapolation blend (beta_fast 32, beta_slow 1); cos, sin * (0.1 ln s + 1)
  ntk-aware-pro1  ntk-aware; cos, sin * sqrt(log(2 L) / log(L_train)) if 2 L > L_train (L: longer side)
  ntk-aware-pro2  ntk-aware; cos, sin * sqrt(log(2 N) / log(L_train^2)) if 2 N > L_train^2 (N = h * w)

Static mode takes the test size from `max_pe_len_h/w`; online mode (`online_rope`) takes it per
sample from `size` (B, 2) = (h, w) in patches, as in high-resolution post-training. The magnitude
factors of yarn / pro1 / pro2 are computed per sample in online mode (the official code defines
them only in static mode, so online + yarn fails there; here it is the natural per-sample rule).
All frequency arithmetic is float32, as in the official code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from fitv2_jax.parallel.platform import compiling_for_tpu

RULES = (
    "normal",
    "linear",
    "ntk-aware",
    "ntk-by-parts",
    "yarn",
    "ntk-aware-pro1",
    "ntk-aware-pro2",
)


def _exponents(dim: int) -> jnp.ndarray:
    """(dim/2,) float32: 2j / dim for j < dim/2."""
    return jnp.arange(0, dim, 2, dtype=jnp.float32) / dim


def _base_freqs(theta: float, dim: int) -> jnp.ndarray:
    return 1.0 / (jnp.float32(theta) ** _exponents(dim))


def _ntk_freqs(theta: float, dim: int, scale: jnp.ndarray) -> jnp.ndarray:
    """scale (...,) -> (..., dim/2): RoPE with the NTK-aware base theta * s^(D/(D-2))."""
    new_base = jnp.float32(theta) * scale ** (dim / (dim - 2))
    return 1.0 / (new_base[..., None] ** _exponents(dim))


def _linear_freqs(theta: float, dim: int, scale: jnp.ndarray) -> jnp.ndarray:
    return 1.0 / (scale[..., None] * (jnp.float32(theta) ** _exponents(dim)))


def _correction_range(
    low_rot: float, high_rot: float, dim: int, theta: float, max_len: int
) -> tuple[int, int]:
    """Channel-pair indices where the rotation count over `max_len` positions crosses the bounds."""

    def dim_for(rotations: float) -> float:
        return dim * math.log(max_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = math.floor(dim_for(low_rot))
    high = math.ceil(dim_for(high_rot))
    return max(low, 0), min(high, dim - 1)


def _ramp(low: float, high: float, n: int) -> jnp.ndarray:
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    return jnp.clip((jnp.arange(n, dtype=jnp.float32) - low) / (high - low), 0.0, 1.0)


def axis_freqs(
    rule: str, theta: float, dim: int, scale: jnp.ndarray, ori_max_pe_len: int
) -> jnp.ndarray:
    """Per-axis frequencies for one extrapolation rule.

    Args:
      rule: one of RULES.
      dim: channels per axis, D = head_dim / 2.
      scale: (...,) float32, already clamped to >= 1.
    Returns: (..., dim/2) float32.
    """
    scale = jnp.asarray(scale, jnp.float32)
    if rule == "normal":
        return jnp.broadcast_to(_base_freqs(theta, dim), scale.shape + (dim // 2,))
    if rule == "linear":
        return _linear_freqs(theta, dim, scale)
    if rule in ("ntk-aware", "ntk-aware-pro1", "ntk-aware-pro2"):
        return _ntk_freqs(theta, dim, scale)
    if rule == "ntk-by-parts":
        base = _base_freqs(theta, dim)
        linear = _linear_freqs(theta, dim, scale)
        ntk = _ntk_freqs(theta, dim, scale)
        low, high = _correction_range(1.25, 0.75, dim, theta, ori_max_pe_len)
        ntk_weight = 1.0 - _ramp(low, high, dim // 2)
        freqs = linear * (1 - ntk_weight) + ntk * ntk_weight
        low, high = _correction_range(16, 2, dim, theta, ori_max_pe_len)
        keep_weight = 1.0 - _ramp(low, high, dim // 2)
        return freqs * (1 - keep_weight) + base * keep_weight
    if rule == "yarn":
        extrapolation = jnp.broadcast_to(_base_freqs(theta, dim), scale.shape + (dim // 2,))
        interpolation = _linear_freqs(theta, dim, scale)
        low, high = _correction_range(32, 1, dim, theta, ori_max_pe_len)
        keep_weight = 1.0 - _ramp(low, high, dim // 2)
        return interpolation * (1 - keep_weight) + extrapolation * keep_weight
    raise ValueError(f"Unknown RoPE rule custom_freqs={rule!r}; expected one of {RULES}.")


def _log_ratio_factor(length: jnp.ndarray, train_length: float) -> jnp.ndarray:
    """sqrt(log(2 L) / log(L_train)) when 2 L > L_train else 1 (attention-logit scale)."""
    doubled = 2.0 * jnp.asarray(length, jnp.float32)
    factor = jnp.sqrt(jnp.log(doubled) / jnp.log(jnp.float32(train_length)))
    return jnp.where(doubled / train_length <= 1.0, 1.0, factor)


def magnitude(
    rule: str, len_h: jnp.ndarray, len_w: jnp.ndarray, ori_max_pe_len: int
) -> jnp.ndarray | None:
    """Factor multiplying cos and sin (so attention logits scale by its square), or None."""
    longest = jnp.maximum(jnp.asarray(len_h, jnp.float32), jnp.asarray(len_w, jnp.float32))
    if rule == "yarn":
        scale = jnp.maximum(longest / ori_max_pe_len, 1.0)
        return jnp.where(scale <= 1.0, 1.0, 0.1 * jnp.log(scale) + 1.0)
    if rule == "ntk-aware-pro1":
        return _log_ratio_factor(longest, ori_max_pe_len)
    if rule == "ntk-aware-pro2":
        area = jnp.asarray(len_h, jnp.float32) * jnp.asarray(len_w, jnp.float32)
        return _log_ratio_factor(area, ori_max_pe_len**2)
    return None


@dataclass(frozen=True)
class RopeConfig:
    """The official RoPE settings (names as in `network_config.params`)."""

    head_dim: int
    theta: float = 10000.0
    custom_freqs: str = "normal"
    max_pe_len_h: int | None = None
    max_pe_len_w: int | None = None
    decouple: bool = False
    ori_max_pe_len: int | None = None
    online_rope: bool = False

    def __post_init__(self):
        rule = self.custom_freqs.lower()
        object.__setattr__(self, "custom_freqs", rule)
        if rule not in RULES:
            raise ValueError(f"custom_freqs={self.custom_freqs!r}: expected one of {RULES}.")
        if self.head_dim % 4:
            raise ValueError(f"RoPE needs head_dim divisible by 4, got {self.head_dim}.")
        if rule != "normal" and self.ori_max_pe_len is None:
            raise ValueError(
                f"custom_freqs={rule!r} needs ori_max_pe_len (the training grid side, 16 for "
                "256-token models); set model.ori_max_pe_len."
            )
        if rule != "normal" and not self.online_rope:
            if self.max_pe_len_h is None or self.max_pe_len_w is None:
                raise ValueError(
                    f"custom_freqs={rule!r} without online_rope needs max_pe_len_h and "
                    "max_pe_len_w (the test grid in patches); set them or online_rope=True."
                )


def _test_lengths(cfg: RopeConfig, size: jnp.ndarray | None):
    """(len_h, len_w): shape (B, 1) online per sample, (B, N) online per token (size (B, N, 2),
    packed rows), or () static."""
    if cfg.online_rope:
        if size is None:
            raise ValueError("online_rope=True needs `size` (B, 2) = (h, w) in patches.")
        size = jnp.asarray(size, jnp.float32)
        if size.ndim == 3 and size.shape[1] > 1:  # per token
            return size[..., 0], size[..., 1]
        size = size.reshape(size.shape[0], -1)[:, :2]
        return size[:, :1], size[:, 1:2]
    return jnp.float32(cfg.max_pe_len_h), jnp.float32(cfg.max_pe_len_w)


def rope_cos_sin(
    cfg: RopeConfig, grid: jnp.ndarray, size: jnp.ndarray | None = None
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Rotation tables for each token.

    Args:
      grid: (B, 2, N) int, row 0 = w (column) index, row 1 = h (row) index.
      size: (B, 2) (h, w) in patches; only used with online_rope.
    Returns: cos, sin of shape (B, N, head_dim / 2), one entry per rotated channel pair,
      magnitude factor included: pairs [0, head_dim/4) follow h, the rest follow w.
    """
    dim = cfg.head_dim // 2
    rule = cfg.custom_freqs
    if rule == "normal":
        freqs_h = freqs_w = _base_freqs(cfg.theta, dim)
        factor = None
    else:
        len_h, len_w = _test_lengths(cfg, size)
        ori = cfg.ori_max_pe_len
        if cfg.decouple:
            s_h = jnp.maximum(len_h / ori, 1.0)
            s_w = jnp.maximum(len_w / ori, 1.0)
        else:
            s_h = s_w = jnp.maximum(jnp.maximum(len_h, len_w) / ori, 1.0)
        # scale: () static, (B, 1) per sample or (B, N) per token -> freqs (1|B, 1|N, D/2)
        freqs_h = axis_freqs(rule, cfg.theta, dim, s_h, ori)
        freqs_w = axis_freqs(rule, cfg.theta, dim, s_w, ori)
        factor = magnitude(rule, len_h, len_w, ori)
    if freqs_h.ndim == 1:  # static: one table for every token
        freqs_h, freqs_w = freqs_h.reshape(1, 1, -1), freqs_w.reshape(1, 1, -1)
    pos_w = grid[:, 0].astype(jnp.float32)  # (B, N)
    pos_h = grid[:, 1].astype(jnp.float32)
    angles = jnp.concatenate([pos_h[..., None] * freqs_h, pos_w[..., None] * freqs_w], axis=-1)
    cos, sin = jnp.cos(angles), jnp.sin(angles)  # (B, N, head_dim/2)
    if factor is not None:
        factor = jnp.asarray(factor, jnp.float32)
        factor = factor.reshape(factor.shape[0], -1) if factor.ndim else factor.reshape(1, 1)
        cos = cos * factor[..., None]
        sin = sin * factor[..., None]
    return cos, sin


def head_channel_order(head_dim: int) -> np.ndarray:
    """Our channel i of a head is official channel order[i]: the even channels, then the odd."""
    return np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])


def _rotate(x, cos, sin):
    """The rotation of `apply_rope`, without its custom backward: on TPU with each channel's
    partner found by a permutation matmul, elsewhere by slicing the halves."""
    return (
        _rotate_by_permutation(x, cos, sin) if compiling_for_tpu() else _rotate_halves(x, cos, sin)
    )


def _rotate_halves(x, cos, sin):
    dtype = x.dtype
    half = x.shape[-1] // 2
    x = x.astype(jnp.float32)
    first, second = x[..., :half], x[..., half:]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    out = jnp.concatenate([first * c - second * s, second * c + first * s], axis=-1)
    return out.astype(dtype)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate the channel pairs (x[i], x[i + head_dim/2]) by angle i: -> (x[i] c_i - x[i+h] s_i,
    x[i+h] c_i + x[i] s_i), h = head_dim/2, i.e. the official interleaved rotation in our
    `head_channel_order` (module doc).

    Earlier forms, measured on TPU: the official interleaved pairs (a (head_dim/2, 2) split; see
    the module doc), and partners found by rolling the channel axis (commit d541ff7: faster for
    XLA attention on v6e-64, 39 vs 46 ms, slower for splash at 1024 tokens, 252 vs 215 ms).

    The backward is the transposed map, the same rotation with -sin, as one fused pass
    (`rotate_back_in_backward`; autodiff of the pair slicing and stacking made zero-padded copies
    and sums of them: CPU train step 4% faster). On TPU autodiff was kept while the compiler
    estimated it faster (FiTv2-XL/2 v5p-64 with full remat and the pairs interleaved: 74.9 vs
    75.5 ms); since the halves layout and the unrolled blocks without remat it is the other way
    round (2026-12-04: FiTv2-XL/2's whole step on v5p-64 51.9 vs 52.7 ms, `train --dry_run
    --topology v5p-64`; `bench --suite tpu_blocks`: 8 XL blocks 11.76 vs 11.90 ms, on v6e-64
    with data 2 x FSDP 32 8.20 vs 8.27; 4 HR XL blocks at 1024 tokens with splash 17.57 vs
    17.88), so every platform takes the same path.

    Args:
      x: (B, N, H, head_dim).
      cos, sin: (B, N, head_dim / 2).
    Returns: (B, N, H, head_dim) in x.dtype; the rotation itself runs in float32.
    """
    return rotate_back_in_backward(x, cos, sin)


def _rotate_by_permutation(x, cos, sin):
    """_rotate_halves as x c' + (x P) s', where P (head_dim, head_dim) swaps the halves, c' = [c, c]
    and s' = [-s, s]: every op spans the whole head (head_dim lanes), none a half of it. Exact: P
    moves values (HIGHEST precision for float32), and the products and sums are _rotate_halves'.

    Why on TPU: the halves are 36 of a vector register's 128 lanes at head_dim 72, and their slices
    and concatenation are lane shuffles; the (72, 72) matmul is nearly free on the MXU (0.6% more
    FLOPs for FiTv2-XL/2). Compiler estimates on v5p-64 (`bench --suite tpu_blocks`, 2026-12-04):
    8 XL blocks 11.55 vs 11.76 ms, 8 HR XL blocks at 1024 tokens with splash 33.85 vs 34.65; but
    the whole XL step (`train --dry_run --topology v5p-64`) only 51.8 vs 51.9 ms, its elementwise
    cycles coming back as matmul ones. Off TPU the matmul is real work (head_dim multiply-adds per
    channel), so the halves stay. With the "short" attention kernels FiTv2's q and k are rotated
    inside them instead, by a rotation of the sublanes (`models.short_attention.Fused`)."""
    dtype, dim = x.dtype, x.shape[-1]
    # (x @ swap)[j] = x[(j + dim/2) % dim]
    swap = np.roll(np.eye(dim, dtype=np.float32), dim // 2, axis=1)
    partner = jnp.einsum("bnhd,de->bnhe", x, jnp.asarray(swap, dtype),
                         precision=jax.lax.Precision.HIGHEST,
                         preferred_element_type=jnp.float32)  # fmt: skip
    c, s = (t[:, :, None, :] for t in full_width_tables(cos, sin))
    return (x.astype(jnp.float32) * c + partner * s).astype(dtype)


def full_width_tables(cos, sin):
    """cos, sin (..., head_dim/2) -> c' = [cos, cos], s' = [-sin, sin] (..., head_dim): the
    rotation as x c' + swap(x) s', swap exchanging a head's halves."""
    return jnp.concatenate([cos, cos], axis=-1), jnp.concatenate([-sin, sin], axis=-1)


@jax.custom_vjp
def rotate_back_in_backward(x, cos, sin):
    """_rotate whose backward is _rotate with -sin. cos and sin are positions, not parameters:
    they get a zero cotangent."""
    return _rotate(x, cos, sin)


def _rotate_back_fwd(x, cos, sin):
    return _rotate(x, cos, sin), (cos, sin)


def _rotate_back_bwd(residuals, d_out):
    cos, sin = residuals
    return _rotate(d_out, cos, -sin), jnp.zeros_like(cos), jnp.zeros_like(sin)


rotate_back_in_backward.defvjp(_rotate_back_fwd, _rotate_back_bwd)
