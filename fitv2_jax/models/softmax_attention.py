"""Masked softmax attention that saves the log-sum-exp, not the probabilities, for its backward.

    out = softmax_attention(q, k, v, segment_ids)   # q, k, v (B, N, H, Dh); segment_ids (B, N)

Query i attends key j iff segment_ids[i] == segment_ids[j] (every token attends at least itself,
so no row is empty). The forward is the textbook one: logits in float32, scaled by Dh^-0.5,
softmax in float32, probabilities cast to v's dtype for the value product.

Autodiff of that forward keeps the (B, H, N, N) probabilities of every layer until the backward
(under `nn.scan` they are stacked over depth: 377 MB per step for FiTv2-B/2 at 8 x 256 tokens),
and its softmax backward is one large fusion that XLA:CPU runs slowly. The custom VJP here
keeps only the (B, H, N) log-sum-exp and the output, as flash attention does, and recomputes the
probabilities with one extra q k^T product:

    p  = exp(s - lse)                      s = q k^T / sqrt(Dh), masked
    dv = p^T do        dp = do v^T         delta = rowsum(do * out)
    ds = p * (dp - delta) / sqrt(Dh)       dq = ds k        dk = ds^T q

The gradients equal autodiff's to float32 rounding (tests/test_custom_vjps.py).

`shift`: the softmax subtracts each row's max from its logits, which costs a pass over the
(B, H, N, N) logits. When the caller knows the logits are bounded it may pass a static shift
instead: softmax is unchanged by any shift, and float32 exp only needs the shifted logits below
about 88 - ln N. FiT's q and k come out of unweighted LayerNorm or RMSNorm, so their norms are at
most sqrt(Dh) and every logit at most sqrt(Dh) (times the RoPE magnitude factor squared,
`models.attention`). By the TPU compiler's estimate on v5p-64 (2026-12-04, commit 6ffdeba against
its parent): FiTv2-XL/2's whole step 52.7 vs 53.2 ms (`train --config configs/fitv2_xl.py
--dry_run --topology v5p-64`), 8 unrolled blocks 11.90 vs 12.06 ms (`bench --suite
tpu_blocks --blocks 8`); the forward's softmax fusions lose half their cycles.

`save_probs`: the backward keeps the forward's probabilities instead, in v's dtype (those the value
product used), and skips q k^T and the exp: (B, H, N, N) per layer of memory for that work. It
pays on TPU when nothing is recomputed (`attention.saves_probs` decides): FiTv2-XL/2's whole step
on v5p-64 49.9 vs 51.8 ms (31.9% MFU), and a peak of 5.00 vs 5.55 GiB per chip in the
compiler's memory plan (`train --config configs/fitv2_xl.py --dry_run --topology v5p-64`,
2026-12-05). The kept probabilities pass an optimization barrier before the value product uses
them; without it the same step was estimated at 52.5 ms and 6.13 GiB. In bfloat16, ds is computed
from the bfloat16 probabilities, within the rounding the float32 recomputation has (ds is cast to
bfloat16 either way; tests/test_custom_vjps.py); in float32 both are the same to rounding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name


def _masked_logits(q, k, segment_ids):
    """(B, H, N, N) float32 scaled logits, -inf where query and key are in different segments."""
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    return jnp.where(same, logits, -jnp.inf)


def _forward(q, k, v, segment_ids, shift, keep_probs=False):
    logits = _masked_logits(q, k, segment_ids)
    peak = jnp.max(logits, axis=-1, keepdims=True) if shift is None else jnp.float32(shift)
    weights = jnp.exp(logits - peak)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    probs = (weights / total).astype(v.dtype)
    if keep_probs:  # computed once, then used by the value product and kept (module doc)
        probs = jax.lax.optimization_barrier(probs)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    return out, probs, peak + jnp.log(total)  # (B, N, H, Dh), (B, H, N, N), lse (B, H, N, 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def softmax_attention(q, k, v, segment_ids, shift: float | None = None, save_probs: bool = False):
    """q, k, v: (B, N, H, Dh); segment_ids: (B, N) int; shift: None (each row's max) or a static
    float subtracted from every logit before exp; save_probs: the backward reuses the forward's
    (B, H, N, N) probabilities in v's dtype instead of recomputing them (module doc). Returns
    (B, N, H, Dh) in v's dtype."""
    return _forward(q, k, v, segment_ids, shift)[0]


def _fwd(q, k, v, segment_ids, shift, save_probs):
    out, probs, lse = _forward(q, k, v, segment_ids, shift, save_probs)
    # named for remat policies (fit.REMAT_POLICIES "projections" keeps out and lse)
    out = checkpoint_name(out, "attention_out")
    kept = checkpoint_name(probs, "attention_probs") if save_probs else (
        checkpoint_name(lse, "attention_lse"))  # fmt: skip
    return out, (q, k, v, segment_ids, out, kept)


def _bwd(shift, save_probs, residuals, d_out):
    q, k, v, segment_ids, out, kept = residuals
    scale = q.shape[-1] ** -0.5
    if save_probs:
        probs = kept  # in v's dtype, as the forward's value product used them
    else:
        probs = jnp.exp(_masked_logits(q, k, segment_ids) - kept)  # exp(-inf) = 0 off the mask
    dv = jnp.einsum("bhqk,bqhd->bkhd", probs.astype(v.dtype), d_out.astype(v.dtype))
    dp = jnp.einsum("bqhd,bkhd->bhqk", d_out, v, preferred_element_type=jnp.float32)
    f32 = jnp.float32
    delta = jnp.einsum("bqhd,bqhd->bhq", d_out.astype(f32), out.astype(f32))[..., None]
    ds = (probs.astype(f32) * (dp - delta) * scale).astype(q.dtype)
    dq = jnp.einsum("bhqk,bkhd->bqhd", ds, k)
    dk = jnp.einsum("bhqk,bqhd->bkhd", ds, q)
    return dq, dk.astype(k.dtype), dv, None  # segment ids are integers: no cotangent


softmax_attention.defvjp(_fwd, _bwd)

__all__ = ["softmax_attention"]
