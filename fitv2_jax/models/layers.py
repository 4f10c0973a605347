"""FiT building blocks: linear layers with logical axes, norms, embedders, MLPs, modulation.

Every kernel is stored (in_features..., out_features...) and carries logical axis names that
`fitv2_jax.parallel.rules` maps onto mesh axes. Compute runs in `dtype` (bf16 on accelerators when
the config asks for it) while parameters stay in `param_dtype` (float32 master weights); norms run
in float32.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fitv2_jax.parallel.platform import compiling_for_tpu
from fitv2_jax.parallel.rules import gathered

Dtype = Any

# torch.nn.init.xavier_uniform_ on a (out, in) weight == fan_avg uniform on our (in, out) kernel.
xavier_uniform = nn.initializers.xavier_uniform()
zeros = nn.initializers.zeros


def logical(init, names: Sequence[str | None]):
    return nn.with_logical_partitioning(init, tuple(names))


def dense_dot(x, kernel, n_in: int):
    """x (lead..., in...) . kernel (in..., out...) -> (lead..., out...), contracting the n_in axes.

    The leading axes (batch, tokens) are merged into one first, so that the kernel's gradient is
    one (M, in)^T (M, out) product over M = prod(lead). Without the merge XLA:CPU makes that
    gradient a dot contracting two axes, which it lowers with transposed copies of both operands,
    and fuses the elementwise chain producing the cotangent into that copy (computing it twice):
    FiTv2's demo train step ran 8-12% slower (same-process A/B). Only leading axes are merged,
    never the kernel's, so head-sharded kernels keep their sharding; the batch axis is the major
    merged axis, so a batch-sharded x stays sharded the same way.
    """
    lead = x.shape[: x.ndim - n_in]
    x2 = x.reshape(math.prod(lead), *x.shape[x.ndim - n_in :])
    dims = ((tuple(range(1, n_in + 1)), tuple(range(n_in))), ((), ()))
    y = jax.lax.dot_general(x2, kernel, dims)
    return y.reshape(*lead, *y.shape[1:])


class Linear(nn.Module):
    """y = x @ W + b over the last axis. W: (in, out) with logical names `axes`."""

    features: int
    axes: tuple[str | None, str | None] = ("embed", "mlp")
    use_bias: bool = True
    zero_init: bool = False
    kernel_init: Any = xavier_uniform
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        init = zeros if self.zero_init else self.kernel_init
        kernel = self.param(
            "kernel", logical(init, self.axes), (x.shape[-1], self.features), self.param_dtype
        )
        y = dense_dot(x.astype(self.dtype), kernel.astype(self.dtype), n_in=1)
        if self.use_bias:
            bias = self.param(
                "bias", logical(zeros, self.axes[1:]), (self.features,), self.param_dtype
            )
            y = y + bias.astype(self.dtype)
        return y


class DenseND(nn.Module):
    """Contracts the last `n_in` axes of x with a kernel viewed as (in..., out...).

    Used where heads are their own kernel axis (q/k/v and output projections), so that tensor
    parallelism can shard whole heads. The kernel is stored flat, (prod(in), prod(out)) with the
    logical names `stored_axes` (the torch Linear weight transposed), and reshaped to the
    (in..., out...) view, named `axes`, after the cast to the compute dtype. Why flat: the TPU
    compiler lays an all-gathered kernel out with the gathered axis major, and wants these
    kernels with the embedding axis on the lanes, heads of 72 channels being no multiple of 128;
    FSDP can only shard the embedding axis of the 4D view (3, H or Dh does not divide by 32), so
    each block's q/k/v and output kernels were copied into the matmul's layout after every gather
    (9.5% of the estimated cycles of 4 FiTv2-XL/2 blocks on v5p-64). Stored flat, FSDP shards the
    flat head axis instead, and the view of the gathered kernel is a bitcast (README, TPU).
    Initialised as the 4D view would be (fan-avg xavier over the groups; same values).
    `gather_once`: the compute-dtype kernel is all-gathered over FSDP here and the backward reuses
    that copy (`parallel.rules.gathered`).
    `bias_outside`: returns (x @ kernel, bias in the compute dtype) and leaves the sum to the
    caller (the "short" attention kernels add the q/k/v bias themselves).
    """

    features: tuple[int, ...]
    axes: tuple[str | None, ...]  # the (in..., out...) view's logical names
    stored_axes: tuple[str | None, str | None]  # the stored (prod(in), prod(out)) kernel's
    n_in: int = 1
    use_bias: bool = True
    gather_once: bool = False
    bias_outside: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        in_shape = tuple(x.shape[-self.n_in :])
        view = in_shape + tuple(self.features)
        # fans are products over the groups, so this is the 4D view's xavier, element for element
        init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=0, out_axis=1)
        kernel = self.param(
            "kernel",
            logical(init, self.stored_axes),
            (math.prod(in_shape), math.prod(self.features)),
            self.param_dtype,
        )
        kernel = kernel.astype(self.dtype).reshape(view)
        if self.gather_once:
            kernel = gathered(kernel, self.axes)
        y = dense_dot(x.astype(self.dtype), kernel, self.n_in)
        if self.use_bias:
            bias = self.param(
                "bias", logical(zeros, self.axes[self.n_in :]), self.features, self.param_dtype
            )
            if self.bias_outside:
                return y, bias.astype(self.dtype)
            y = y + bias.astype(self.dtype)
        return y


def normalize_with_stats(x, centered: bool, eps: float, axis: int = -1):
    """(y, mean or None, 1/std) of x normalised along `axis`."""
    mean = jnp.mean(x, axis=axis, keepdims=True) if centered else None
    xc = x - mean if centered else x
    rstd = jax.lax.rsqrt(jnp.mean(jnp.square(xc), axis=axis, keepdims=True) + eps)
    return xc * rstd, mean, rstd


def normalize_grad(y, rstd, d_y, centered: bool, axis: int = -1):
    """The gradient at x of y = `normalize_with_stats(x)`'s output, from y, 1/std and d_y.

    y = xc * r with r = (mean(xc^2) + eps)^-1/2: d xc = r (d_y - y mean(d_y y)); the centring
    xc = x - mean(x) then subtracts the mean of d xc (RMSNorm: x itself, no centring)."""
    d_x = rstd * (d_y - y * jnp.mean(d_y * y, axis=axis, keepdims=True))
    if centered:
        d_x = d_x - jnp.mean(d_x, axis=axis, keepdims=True)
    return d_x


def normalize(x, centered: bool, eps: float):
    """x (..., D) float32 -> (x - mean) / sqrt(var + eps) if centered (LayerNorm without affine),
    else x / sqrt(mean(x^2) + eps) (RMSNorm).

    Off TPU its backward is hand-written (`normalize_with_own_backward`): it keeps x and the
    per-row mean and 1/std, recomputes y in the same pass, and reduces twice (LayerNorm) or once
    (RMSNorm); autodiff kept three arrays and reduced three times. Keeping x rather than y: x is
    usually kept anyway (a projection's output, the scan's carry). On TPU autodiff stays, which
    the compiler estimates faster (FiTv2-XL/2 v5p-64: 74.9 vs 76.8 ms).
    """
    if compiling_for_tpu():
        return normalize_with_stats(x, centered, eps)[0]
    return normalize_with_own_backward(x, centered, eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def normalize_with_own_backward(x, centered: bool, eps: float):
    """`normalize` with the backward described there."""
    return normalize_with_stats(x, centered, eps)[0]


def _normalize_fwd(x, centered, eps):
    y, mean, rstd = normalize_with_stats(x, centered, eps)
    return y, (x, mean, rstd)


def _normalize_bwd(centered, eps, residuals, d_y):
    x, mean, rstd = residuals
    y = (x - mean if centered else x) * rstd
    return (normalize_grad(y, rstd, d_y, centered),)


normalize_with_own_backward.defvjp(_normalize_fwd, _normalize_bwd)


class Norm(nn.Module):
    """The official norms over the last axis, eps 1e-6, computed in float32.

    kind: "layernorm" (no affine), "w_layernorm" (weight only), "rmsnorm" (no weight),
    "w_rmsnorm" (weight), "none"/None (identity).
    """

    kind: str | None = "layernorm"
    axis_name: str | None = "norm"
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x):
        kind = (self.kind or "none").lower()
        if kind == "none":
            return x
        dtype = x.dtype
        x = x.astype(jnp.float32)
        if kind in ("layernorm", "w_layernorm", "rmsnorm", "w_rmsnorm"):
            y = normalize(x, kind.endswith("layernorm"), self.eps)
        else:
            raise ValueError(
                f"Unknown norm {self.kind!r}: use layernorm, w_layernorm, rmsnorm, w_rmsnorm or none."
            )
        if kind.startswith("w_"):
            weight = self.param(
                "weight", logical(nn.initializers.ones, (self.axis_name,)), (x.shape[-1],)
            )
            y = y * weight
        return y.astype(dtype)


def per_token(a):
    """(B, D) per-sample conditioning -> (B, 1, D); (B, N, D) per-token (packed rows) unchanged."""
    return a[:, None, :] if a.ndim == 2 else a


def modulate(x, shift, scale):
    """x: (B, N, D); shift, scale: (B, D) per sample or (B, N, D) per token."""
    return x * (1 + per_token(scale)) + per_token(shift)


def timestep_frequencies(t: jnp.ndarray, dim: int = 256, max_period: float = 10000.0):
    """t: (B,) float (continuous, not scaled) -> (B, dim) = [cos(t f), sin(t f)]."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """t (B,) -> (B, D): sinusoid then Linear-SiLU-Linear (official `t_embedder.mlp`)."""

    hidden_size: int
    frequency_embedding_size: int = 256
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t):
        init = nn.initializers.normal(0.02)
        h = timestep_frequencies(t, self.frequency_embedding_size)
        h = Linear(
            self.hidden_size, ("freq", "embed"), kernel_init=init, dtype=self.dtype, name="mlp_0"
        )(h)
        h = nn.silu(h)
        return Linear(
            self.hidden_size,
            ("embed", "embed_out"),
            kernel_init=init,
            dtype=self.dtype,
            name="mlp_2",
        )(h)


class LabelEmbedder(nn.Module):
    """y (B,) -> (B, D). Row `num_classes` is the null class used for classifier-free guidance.

    In training, labels are replaced by the null class with probability `dropout_prob` (rng
    stream "dropout"); `force_drop` (B,) bool drops chosen labels deterministically.
    """

    num_classes: int
    hidden_size: int
    dropout_prob: float

    @nn.compact
    def __call__(self, labels, train: bool, force_drop=None):
        rows = self.num_classes + int(self.dropout_prob > 0)
        # replicated (4.6 MB at XL): a gather from a column-sharded table compiles on TPU to a
        # custom call the compiler cannot cost (cost_analysis' optimal_seconds becomes -1)
        table = self.param(
            "embedding_table",
            logical(nn.initializers.normal(0.02), ("vocab", "vocab_embed")),
            (rows, self.hidden_size),
        )
        if train and self.dropout_prob > 0:
            drop = jax.random.uniform(self.make_rng("dropout"), labels.shape) < self.dropout_prob
            labels = jnp.where(drop, self.num_classes, labels)
        if force_drop is not None:
            labels = jnp.where(force_drop, self.num_classes, labels)
        return jnp.take(table, labels, axis=0)


@jax.custom_vjp
def gated_silu(gate, val):
    """silu(gate) * val, elementwise. Its backward keeps only gate and val (autodiff would also
    keep sigmoid(gate) and silu(gate): two more FFN-wide arrays per layer, stacked by nn.scan)."""
    return nn.silu(gate) * val


def _gated_silu_fwd(gate, val):
    return gated_silu(gate, val), (gate, val)


def _gated_silu_bwd(residuals, d_out):
    gate, val = residuals
    sig = jax.nn.sigmoid(gate)
    d_val = d_out * (gate * sig)
    d_gate = d_out * val * (sig * (1 + gate * (1 - sig)))  # silu'(g) = s + g s (1 - s)
    return d_gate, d_val


gated_silu.defvjp(_gated_silu_fwd, _gated_silu_bwd)


class SwiGLU(nn.Module):
    """fc2(silu(fc1_g(x)) * fc1_x(x)) (the timm SwiGLU the official code uses)."""

    hidden: int
    out: int
    use_bias: bool = True
    axes_in: str = "embed"
    axes_hidden: str = "mlp"
    axes_out: str = "embed_out"
    zero_init_out: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(use_bias=self.use_bias, dtype=self.dtype)
        gate = Linear(self.hidden, (self.axes_in, self.axes_hidden), name="fc1_g", **kw)(x)
        val = Linear(self.hidden, (self.axes_in, self.axes_hidden), name="fc1_x", **kw)(x)
        h = gated_silu(gate, val)
        h = nn.with_logical_constraint(
            h, ("activation_batch", "activation_length", "activation_mlp")
        )
        return Linear(
            self.out,
            (self.axes_hidden, self.axes_out),
            zero_init=self.zero_init_out,
            name="fc2",
            **kw,
        )(h)


class GeluMlp(nn.Module):
    """fc2(gelu_tanh(fc1(x))) (timm Mlp with GELU(approximate='tanh'), DiT/SiT style)."""

    hidden: int
    out: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = Linear(self.hidden, ("embed", "mlp"), self.use_bias, dtype=self.dtype, name="fc1")(x)
        h = nn.gelu(h, approximate=True)
        h = nn.with_logical_constraint(
            h, ("activation_batch", "activation_length", "activation_mlp")
        )
        return Linear(self.out, ("mlp", "embed_out"), self.use_bias, dtype=self.dtype, name="fc2")(
            h
        )


class Modulation(nn.Module):
    """c (B, D) -> (B, n * D) adaLN parameters, zero-initialised output (adaLN-Zero).

    kind "normal": SiLU -> Linear(D, nD).  kind "lora": SiLU -> Linear(D, r) -> Linear(r, nD).
    kind "swiglu": SwiGLU(D, hidden, nD). Parameter names follow the official `adaLN_modulation`
    Sequential indices (`linear_1`, `linear_2`).
    """

    hidden_size: int
    chunks: int
    kind: str = "normal"
    lora_dim: int | None = None
    swiglu_hidden: int | None = None
    use_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, c):
        out = self.chunks * self.hidden_size
        kw = dict(use_bias=self.use_bias, dtype=self.dtype)
        if self.kind == "swiglu":
            hidden = self.swiglu_hidden or (self.hidden_size // 4) * 3
            return SwiGLU(hidden=hidden, out=out, use_bias=self.use_bias, axes_in="embed",
                          axes_hidden="adaln_hidden", axes_out="adaln", zero_init_out=True,
                          dtype=self.dtype, name="swiglu")(c)  # fmt: skip
        h = nn.silu(c)
        if self.kind == "normal":
            return Linear(out, ("embed", "adaln"), zero_init=True, name="linear_1", **kw)(h)
        if self.kind == "lora":
            if not self.lora_dim:
                raise ValueError(
                    "adaln_type='lora' needs adaln_lora_dim (official: hidden_size // 4)."
                )
            h = Linear(self.lora_dim, ("embed", "lora"), name="linear_1", **kw)(h)
            return Linear(out, ("lora", "adaln"), zero_init=True, name="linear_2", **kw)(h)
        raise ValueError(f"Unknown adaln_type {self.kind!r}: use normal, lora or swiglu.")
