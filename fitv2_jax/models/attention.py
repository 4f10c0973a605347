"""Masked multi-head self-attention with q/k norm and 2D RoPE (the FiT attention).

Mask semantics (official): query i may attend key j iff segment[i] == segment[j]. With the plain
0/1 token mask as the segment id this is "real attends real, padding attends padding"; packed
sequences pass segment ids 1, 2, ... per image and 0 for padding. The attention output is
multiplied by (segment != 0) before the output projection, so padded tokens carry zeros.

Backends (`attention_backend`):
  "xla"    `models.softmax_attention`: XLA everywhere, a backward that keeps the log-sum-exp
           instead of the (B, H, N, N) probabilities (5-6% faster CPU train steps, measured);
           on TPU with nothing recomputed it keeps the probabilities (`saves_probs`)
  "einsum" explicit einsum + float32 softmax (a reference, and the most portable)
  "splash" Pallas TPU splash attention with segment ids, per shard (`models.splash`); Pallas
           interpret mode off TPU
  "short"  our Pallas TPU kernels for rows of up to 1024 tokens (512 on v4, whose cores have 16
           MiB of VMEM: `short_attention.max_tokens`), whole rows in VMEM and every array with
           the tokens on the lanes (`models.short_attention`); interpret mode off TPU
  "auto"   on TPU: "short" for rows the chip's kernels take, with any remat policy; beyond
           them splash from SPLASH_MIN_TOKENS tokens, or from SPLASH_MIN_TOKENS_RECOMPUTED when
           the blocks are rematerialised (any `remat_policy` but "none": FiT resolves it with
           that knowledge); XLA attention otherwise, and off TPU (the pod configs' default). By
           the TPU compiler's estimate (README, TPU section, 2026-12-05; the kernels of both
           Pallas backends priced from the work they state, as the compiler prices XLA's
           fusions), global batch 256, with the q/k norms and RoPE inside the "short" kernels:
           - 256 tokens, no remat: "short" is ahead of XLA attention and splash (FiTv2-XL/2's
             step on v5p-64 41.0 ms against 48.1 with XLA attention and 52.8 with splash; 4
             unrolled blocks 4.61 vs 5.46 and 5.76; 37.0 ms and 4.40 since the kernels take
             the projection's output and bias, 2026-12-06);
           - 256 tokens, full remat: "short" is ahead (FiTv2-XL/2 on v5e-256, data 2 x FSDP
             128, scanned: 31.1 ms vs splash 36.9, XLA attention 35.6);
           - 256 tokens, remat "dots", "dots_no_batch" or "projections": "short" is ahead of
             splash (FiTv2-XL/2 on v5e-256 32.7 vs 35.2 ms with "dots", FiTv2-B/2 on v6e-64 8.2
             vs 8.4; 4 XL blocks on v5p-64 4.85 vs 5.69 with each of the three, which give the
             same program here);
           - 640 to 1024 tokens: "short" is ahead (4 unrolled HR FiTv2-XL/2 blocks on v5p-64,
             no remat: 1024 tokens 13.97 ms vs splash 16.78; 768 tokens 10.82 vs XLA
             attention 14.03 and splash 14.55; full remat at 1024 16.55 vs splash 18.72);
           - beyond the "short" kernels (v4 above 512 tokens, any chip above 1024), without
             remat: XLA attention up to 1023 tokens (ahead of splash at 640 and 768 on v5p:
             12.03 vs 13.06 and 14.03 vs 14.55 ms), splash from 1024 (HR FiTv2-XL/2, 4 unrolled
             blocks: 17.9 vs 20.9 ms).
           (Sampling with such a config picks the same backend.)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fitv2_jax.models.layers import DenseND, Norm
from fitv2_jax.models.rope import apply_rope
from fitv2_jax.models.short_attention import max_tokens as short_max_tokens
from fitv2_jax.models.short_attention import short_attend, short_attend_qkv
from fitv2_jax.models.softmax_attention import softmax_attention
from fitv2_jax.models.splash import splash_attend
from fitv2_jax.parallel.platform import tpu_device_kind

BACKENDS = ("xla", "einsum", "splash", "short", "auto")
SPLASH_MIN_TOKENS = 1024  # "auto" picks splash on TPU from this sequence length (module doc)
SPLASH_MIN_TOKENS_RECOMPUTED = 256  # ... and from this one when the blocks are rematerialised
SAVE_PROBS_MAX_TOKENS = 256  # the "xla" backend keeps its probabilities up to here (saves_probs)


def _qk_norm_kind(kind: str | None, weight: bool) -> str:
    kind = (kind or "none").lower()
    if weight and kind in ("layernorm", "rmsnorm"):
        return "w_" + kind
    return kind


def _unweighted(kind: str) -> str | None:
    return None if kind == "none" else kind


def fuses_into_short(q_kind: str, k_kind: str, rope_on_v: bool) -> bool:
    """Whether the "short" kernels take q and k raw and apply the q/k norms and RoPE themselves
    (`short_attention.Fused`): unweighted norms (kinds as `_qk_norm_kind` gives them) and
    RoPE on q and k only, FiTv2's attention. Why (README, TPU section): in XLA those passes
    read and write q and k in HBM around the kernels, and RoPE's channel swap is a matmul."""
    return {q_kind, k_kind} <= {"layernorm", "rmsnorm", "none"} and not rope_on_v


def resolve_backend(backend: str, tokens: int, tpu: str | None, remat_policy: str = "none") -> str:
    """The backend `attend` runs: "auto" resolved for a sequence length, the TPU compiled for
    (its device kind, `parallel.platform.tpu_device_kind`; None off TPU) and the blocks' remat
    policy (any but "none" recomputes the attention in the backward)."""
    if backend == "auto":
        if tpu is None:
            return "xla"
        if tokens <= short_max_tokens(tpu):
            return "short"
        least = SPLASH_MIN_TOKENS if remat_policy == "none" else SPLASH_MIN_TOKENS_RECOMPUTED
        return "splash" if tokens >= least else "xla"
    return backend


def saves_probs(backend: str, tokens: int, on_tpu: bool, remat_policy: str = "none") -> bool:
    """Whether the "xla" backend (`backend` as `resolve_backend` gave it) keeps its (B, H, N, N)
    probabilities (in the compute dtype) for the backward instead of the log-sum-exp
    (`softmax_attention`'s `save_probs`): on TPU, when nothing is recomputed and
    N <= SAVE_PROBS_MAX_TOKENS. The backward then skips q k^T and the exp, for 16 MiB per block
    per chip at 8 images x 256 tokens x 16 heads. By the TPU compiler's estimate on v5p-64
    (global batch 256, 2026-12-05): FiTv2-XL/2's whole step 49.9 vs 51.8 ms (`softmax_attention`'s
    module doc). Off TPU it stays off: on XLA:CPU the log-sum-exp backward was measured faster
    than autodiff's, which keeps the probabilities, and this form was not measured there; above
    256 tokens ("auto" picks splash from 1024) it was not measured."""
    return (
        backend == "xla" and on_tpu and remat_policy == "none" and tokens <= SAVE_PROBS_MAX_TOKENS
    )


def logit_bound(q_norm: str, k_norm: str, head_dim: int) -> float | None:
    """The largest attention logit q.k / sqrt(Dh) when q and k come out of these norms (kinds as
    `_qk_norm_kind` gives them), before RoPE's magnitude factor; None if unbounded.

    Unweighted LayerNorm and RMSNorm give vectors of norm below sqrt(Dh), so |q.k| / sqrt(Dh) <
    sqrt(Dh). RoPE rotates (norm kept), times the rule's magnitude factor f (yarn, ntk-aware-pro1/2;
    1 otherwise) on both q and k, so logits stay below f^2 sqrt(Dh). Used as the softmax's static
    shift (`softmax_attention`), float32 exp overflows only when (f^2 - 1) sqrt(Dh) + ln N > 88:
    for Dh = 72 that is f^2 > 10 (yarn's f = 0.1 ln s + 1 at s > 10^9, pro1's at sides of 10^12
    patches), never for any image."""
    if q_norm in ("layernorm", "rmsnorm") and k_norm in ("layernorm", "rmsnorm"):
        return float(head_dim) ** 0.5
    return None


def attend(q, k, v, segment_ids, backend: str = "xla", bound: float | None = None,
           save_probs: bool = False):  # fmt: skip
    """q, k, v: (B, N, H, Dh); segment_ids: (B, N) int; bound: the logits' bound (`logit_bound`)
    if known, which spares the "xla" backend its row maxima; save_probs: the "xla" backend's
    backward reuses the probabilities (`saves_probs`). Returns (B, N, H, Dh)."""
    backend = resolve_backend(backend, q.shape[1], tpu_device_kind())
    if backend == "splash":
        return splash_attend(q, k, v, segment_ids)
    if backend == "short":
        return short_attend(q, k, v, segment_ids)
    if backend == "xla":
        return softmax_attention(q, k, v, segment_ids, bound, save_probs)
    mask = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]  # (B, 1, N, N)
    if backend == "einsum":
        scale = q.shape[-1] ** -0.5
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * scale
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    raise ValueError(f"attention_backend={backend!r}: expected one of {BACKENDS}.")


class Attention(nn.Module):
    """x (B, N, D) -> (B, N, D).

    Parameters: qkv kernel (D, 3 H Dh), viewed as (D, 3, H, Dh), + bias (3, H, Dh) (official
    `attn.qkv`, output split as [q | k | v] then heads), optional q/k norm weights (Dh,), proj
    kernel (H Dh, D), viewed as (H, Dh, D), + bias (D,). The kernels are stored flat (why:
    `layers.DenseND`).
    Each head's Dh channels are in `rope.head_channel_order` (official evens, then odds).
    With the "short" backend the q/k/v bias, the q/k norms, RoPE and the padding's zeros run
    inside its kernels when they can (`fuses_into_short`); the parameters are the same either
    way.
    """

    num_heads: int
    qkv_bias: bool = True
    q_norm: str | None = None
    k_norm: str | None = None
    qk_norm_weight: bool = False
    use_rope: bool = True
    rope_on_v: bool = False
    backend: str = "xla"
    gather_once: bool = False  # q/k/v and output kernels gathered once (FiT.gather_attention_once)
    save_probs: bool = False  # the "xla" backend keeps its probabilities (`saves_probs`)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, segment_ids, cos=None, sin=None):
        dim = x.shape[-1]
        heads, head_dim = self.num_heads, dim // self.num_heads
        q_kind = _qk_norm_kind(self.q_norm, self.qk_norm_weight)
        k_kind = _qk_norm_kind(self.k_norm, self.qk_norm_weight)
        fused = self.backend == "short" and fuses_into_short(q_kind, k_kind, self.rope_on_v)
        qkv = DenseND(features=(3, heads, head_dim), axes=("embed", "qkv", "heads", "kv"),
                      stored_axes=("embed", "qkv_heads"), n_in=1, use_bias=self.qkv_bias,
                      gather_once=self.gather_once, bias_outside=fused and self.qkv_bias,
                      dtype=self.dtype, name="qkv")(x)  # fmt: skip
        if fused:
            # the kernels read q, k and v from the projection's output, add its bias and zero
            # the padding's outputs themselves: no slicing, no extra passes (README, TPU section)
            qkv, bias = qkv if self.qkv_bias else (qkv, None)
            rope = (cos, sin) if self.use_rope else (None, None)
            out = short_attend_qkv(qkv, segment_ids, *rope, norm_q=_unweighted(q_kind),
                                   norm_k=_unweighted(k_kind), bias=bias, zero_padding=True)  # fmt: skip
        else:
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, N, H, Dh)
            q = Norm(q_kind, "kv", name="q_norm")(q)
            k = Norm(k_kind, "kv", name="k_norm")(k)
            if self.use_rope:
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
                if self.rope_on_v:
                    v = apply_rope(v, cos, sin)
            q = nn.with_logical_constraint(
                q, ("activation_batch", "activation_length", "activation_heads", None)
            )
            k = nn.with_logical_constraint(
                k, ("activation_batch", "activation_length", "activation_heads", None)
            )
            bound = logit_bound(q_kind, k_kind, head_dim)
            out = attend(q, k, v, segment_ids, self.backend, bound, self.save_probs)
            out = out * (segment_ids != 0)[:, :, None, None].astype(out.dtype)
        return DenseND(features=(dim,), axes=("heads", "kv", "embed_out"),
                       stored_axes=("qkv_heads", "embed_out"), n_in=2, use_bias=True,
                       gather_once=self.gather_once, dtype=self.dtype, name="proj")(out)  # fmt: skip


__all__ = ["Attention", "attend", "logit_bound", "saves_probs", "BACKENDS"]
