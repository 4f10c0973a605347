"""Attention for rows that fit VMEM whole (up to 1024 tokens; 512 on v4): Pallas TPU kernels
(forward, backward) whose grid steps hold whole rows, for FiT's masked attention.

    out = short_attend(q, k, v, segment_ids)   # (B, N, H, Dh) x3, (B, N) -> (B, N, H, Dh)
    out = short_attend_qkv(qkv, segment_ids, cos, sin, "layernorm", "layernorm", bias=b,
                           zero_padding=True)   # (B, N, 3, H, Dh) before its bias: FiTv2's

Mask (official): query i sees key j iff segment[i] == segment[j] (0 = padding). Rows are padded
to a multiple of 128 tokens with segment id -1 (pads see only pads; their outputs are cut off).
Under a mesh (`jax.set_mesh`) the kernels run per shard with `shard_map`: batch over
("data", "fsdp"), heads over "tensor". Off TPU they run in Pallas interpret mode (for tests).

Why not splash at these lengths: a row of 256 tokens is a single splash block, and what splash
adds around its kernels is what costs (by the TPU compiler's estimate of 4 unrolled FiTv2-XL/2
blocks on v5p-64, no remat: splash 5.76 ms against XLA attention's 5.46). Splash keeps its
log-sum-exp as (H, L, 128) float32 (16.8 MB per block per chip at 8 images x 16 heads x 256
tokens, more than q, k and v together), computes the backward's rowsum(o * do) in XLA and widens
it the same way, widens the segment ids to (L, 128) and (8, L), and writes dq, dk and dv with
the head dim on the lanes, which XLA then copies into the tokens-on-the-lanes layout the rest of
the step uses. This kernel keeps everything in that layout:

- q, k and v are read from the q/k/v projection's output as the TPU compiler lays it out,
  (3, B, H, Dh, L) with the tokens on the lanes (a transpose of (B, L, 3, H, Dh) that is a
  bitcast), and dq, dk, dv written into one array of that layout; the forward's output is
  (H, Dh/8, B, 8, L), the layout the compiler gives the output projection's operand (`_tiles`),
  and its gradient (B, H, Dh, L);
- the log-sum-exp is (B, H, 1, L) float32, one row per head;
- the kernel works on the transposed scores s^T = k^T q (keys on the sublanes, queries on the
  lanes), so that every per-query vector (max, sum, log-sum-exp, rowsum(o * do)) is a row that
  broadcasts over the sublanes, and the products are
      forward   s^T = k^T q,  o^T = v p^T
      backward  dv^T = do p,  dp^T = v^T do,  dq^T = k ds^T,  dk^T = q ds
  (q and k enter the products transposed on the contracted head dim, or with both operands
  contracted on the lanes);
- rowsum(o * do) is computed inside the backward kernel from o and do;
- the segment ids enter as a row (B, 1, L) and a column (B, L, 1).

The softmax is exact, not online: a row's scores for one head are (L, L) float32 in VMEM (256 KiB
at 256 tokens, 1 MiB at 512, 4 MiB at 1024), computed once in the forward and once in the
backward (recomputed from the log-sum-exp, as flash attention does). Probabilities are
normalised in float32 and cast to v's dtype before the value product, as the "xla" backend
does. The softmax scale 1/sqrt(Dh) is applied to q inside the kernels, in q's dtype.

What the kernels fuse around the attention (`Fused`): for FiTv2's attention `models.attention`
passes the q/k/v projection's output before its bias, when the norms are unweighted and v is not
rotated. The kernels add the bias (and give its gradient, summed over the tokens by a (1, L) x
(L, Dh) product, where XLA's sum over the lanes of the whole gradient cost 0.6% of a block's
cycles), apply the q/k norms and RoPE, and zero the outputs of padding (FiT's mask multiply
before the output projection, which was its own pass). In XLA the norms' and RoPE's
passes read q and k from HBM and wrote them back, forward and backward, and RoPE's swap of a
head's halves was a (Dh, Dh) permutation matmul (`models.rope`). Here each head's (Dh, L) block
is already in VMEM: the norm is a reduction over the sublanes and the swap a rotation of them
(`pltpu.roll`). Casts follow the unfused path (norm and rotation in float32, each result cast to
the input dtype). The backward recomputes them from the raw q and k and returns the gradients
there.

By the TPU compiler's estimate, 4 unrolled FiTv2-XL/2 blocks on v5p-64, global batch 256, side
by side (`bench --suite tpu_blocks`, 2026-12-05): 4.61 ms without remat (XLA attention 5.46,
splash 5.76; these kernels with the norms and RoPE outside 5.15), 4.85 with remat "dots"
(5.95, 5.69), 5.42 with full remat (6.75, 6.41); the whole FiTv2-XL/2 step 41.0 ms against
44.6 with the norms and RoPE outside and 48.1 with XLA attention. Reading q, k, v from the
projection's output, the bias, the padding's zeros and the output's layout inside (2026-12-06):
4 blocks 4.606 -> 4.403 ms, the whole step 41.0 -> 37.0 ms (43.0% MFU). Longer rows, 4 unrolled HR
FiTv2-XL/2 blocks on v5p-64, global batch 256: at 1024 tokens 13.97 ms against splash's 16.78
without remat, 16.55 against 18.72 with full remat; at 768 tokens 10.82 against XLA
attention's 14.03 (splash 14.55), at 640 9.27 against 12.03 (13.06).

Each grid step takes one batch element and `heads_per_step` heads (at 256 tokens all 16 of
FiTv2-XL/2's, 12 of FiTv2-3B/2's 24; at 512 tokens 4), within Mosaic's default scoped VMEM (16
MiB) up to 512 tokens. Longer rows raise the scoped limit to 48 MiB (at 768 tokens 8 of XL's
heads a step, at 1024 4 of XL's or 3B's): Mosaic compiles that for v5e, v5p and v6e, whose cores
have far more VMEM, and refuses it for v4 (16 MiB a core: 768 tokens would need 23 MiB), so on
v4 (`max_tokens`) the rows stop at 512 and "auto" takes splash or XLA attention beyond. The
grid's steps are independent ("parallel"), so a megacore chip (v4, v5p) splits them over its
two cores. The kernels carry a `pl.CostEstimate` of their work (2 products of L x L x Dh forward, 5
backward, their vector work as FLOPs (`vector_ops`), one exp per score, their bytes), which the
TPU compiler prices in place as it prices XLA's own fusions: it counts an elementwise operation
as one FLOP at the rate it gives matmuls (tests/test_tpu.py), so vector work weighs little in
either. A roofline, the kernels' best case, as XLA's fusions and the splash kernels are priced
(`parallel.cost`); on a TPU the vector unit's rate applies to both.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from fitv2_jax.models.layers import normalize_grad, normalize_with_stats
from fitv2_jax.models.rope import full_width_tables
from fitv2_jax.parallel.platform import tpu_device_kind
from fitv2_jax.parallel.shard_attention import per_shard

LANES = 128  # rows are padded to a multiple of this
MAX_TOKENS = 1024  # longer rows: use splash (models.attention); on a 16 MiB VMEM chip 512
SMALL_VMEM_MAX_TOKENS = 512
SMALL_VMEM_KINDS = ("TPU v2", "TPU v3", "TPU v4")  # 16 MiB of VMEM a TensorCore (measured, v4)
PAD_SEGMENT = -1
# bytes a grid step may hold: under Mosaic's default 16 MiB scoped VMEM up to 512 tokens; longer
# rows raise the scoped limit (LONG_ROWS_VMEM_LIMIT, which v5e, v5p and v6e compile and v4 lacks)
VMEM_BUDGET = 14 * 2**20
LONG_ROWS_VMEM_BUDGET = 40 * 2**20
LONG_ROWS_VMEM_LIMIT = 48 * 2**20
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)  # a finite "minus infinity", as splash uses
_TN = (((0,), (0,)), ((), ()))  # contract the sublane (head-dim) axes: a^T b
_NT = (((1,), (1,)), ((), ()))  # contract the lane (token) axes: a b^T


def padded_length(n: int) -> int:
    return -(-n // LANES) * LANES


def max_tokens(device_kind: str | None) -> int:
    """The longest row the kernels take on a TPU of this `device_kind` (`parallel.platform`;
    None: off TPU, interpret mode): MAX_TOKENS, or 512 on chips of 16 MiB of VMEM a core, where
    Mosaic refuses longer rows (measured on v4: 768 tokens need 23 MiB)."""
    small = device_kind is not None and device_kind.startswith(SMALL_VMEM_KINDS)
    return SMALL_VMEM_MAX_TOKENS if small else MAX_TOKENS


def _vmem(length: int) -> tuple[int, int | None]:
    """(budget of a grid step, scoped VMEM limit or None for Mosaic's default) for rows of
    `length` (padded) tokens."""
    if length <= SMALL_VMEM_MAX_TOKENS:
        return VMEM_BUDGET, None
    return LONG_ROWS_VMEM_BUDGET, LONG_ROWS_VMEM_LIMIT


def _compiler_params(length: int):
    # every grid step is independent: a megacore chip (v4, v5p) splits the grid over its 2 cores
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"),
                                vmem_limit_bytes=_vmem(length)[1])  # fmt: skip


def heads_per_step(heads: int, head_dim: int, length: int, itemsize: int = 2) -> int:
    """The most heads (a divisor of `heads`) a grid step takes within its VMEM budget (`_vmem`):
    the backward holds 8 (h, Dh, L) blocks, the q/k/v biases as 3 (h, Dh, 1) columns (a lane
    tile each) and the two (Dh, L) float32 RoPE tables, each double-buffered, and about 6 (L, L)
    float32 arrays."""
    padded = -(-head_dim // 16) * 16  # Dh padded to 16 sublanes
    per_head = 2 * (8 * length + 3 * LANES) * itemsize * padded
    tables = 2 * 2 * 4 * padded * length
    fit = max(1, (_vmem(length)[0] - 6 * 4 * length * length - tables) // per_head)
    return max(h for h in range(1, heads + 1) if heads % h == 0 and h <= fit)


def _tiles(head_dim: int) -> tuple[int, int]:
    """(g, r): the forward's output holds a head's Dh channels as g tiles of r rows (8 if Dh is
    a multiple of 8) with the batch between them, (H, g, B, r, L): the layout the TPU compiler
    gives the output projection's operand, so that it is not copied into it (README, TPU
    section)."""
    return (head_dim // 8, 8) if head_dim % 8 == 0 else (1, head_dim)


def _to_tiles(x):
    """(Dh, L) -> (g, r, L) (`_tiles`)."""
    return x.reshape(*_tiles(x.shape[0]), x.shape[1])


def _from_tiles(x):
    """(g, r, L) -> (Dh, L), `_to_tiles` undone."""
    return x.reshape(-1, x.shape[-1])


def _untiled(out):
    """The forward's (H, g, B, r, L) output -> (B, L, H, Dh)."""
    heads, g, b, r, length = out.shape
    return out.transpose(2, 4, 0, 1, 3).reshape(b, length, heads, g * r)


def _mask(seg_col, seg_row):
    return seg_col == seg_row  # (L, 1) == (1, L) -> (keys, queries)


class Fused(NamedTuple):
    """What the kernels do around the attention itself (static), in the order and dtypes of
    `models.attention.Attention`'s unfused path. Before the scores: the q/k/v projection's bias
    (`bias`: added to each of q, k and v in their dtype; its gradient comes out of the backward);
    each head's q/k norm over its channels (`norm_q`, `norm_k`: "layernorm", "rmsnorm" or None;
    unweighted, eps `eps`) in float32, cast to the input dtype; RoPE (`rope`): x c' + swap(x) s'
    in float32 (`models.rope`: the halves swapped, c' = [cos, cos], s' = [-sin, sin], both (Dh, L)
    per image), cast again; then q times 1/sqrt(Dh) in the input dtype. After: the outputs of
    padding (segment 0) zeroed (`zero_padding`), as FiT's attention does before its output
    projection. The default is the scale alone."""

    norm_q: str | None = None
    norm_k: str | None = None
    rope: bool = False
    eps: float = 1e-6
    bias: bool = False
    zero_padding: bool = False


def _swap_halves(x):
    """x (Dh, L): channel j gets channel (j + Dh/2) % Dh, a rotation of the sublanes (its own
    inverse)."""
    return pltpu.roll(x, x.shape[0] // 2, 0)


def _prepared(x, norm, fused: Fused, cos, sin, scale: float):
    """One head's q or k (Dh, L) in its dtype, bias added -> the kernel's operand (`Fused`)."""
    dtype, f32 = x.dtype, jnp.float32
    if norm:
        x = normalize_with_stats(x.astype(f32), norm == "layernorm", fused.eps, axis=0)[0]
        x = x.astype(dtype)
    if fused.rope:
        x32 = x.astype(f32)
        x = (x32 * cos + _swap_halves(x32) * sin).astype(dtype)
    return x * jnp.asarray(scale, dtype) if scale != 1.0 else x


def _prepared_grad(x, d, norm, fused: Fused, cos, sin, scale: float):
    """The gradient (float32) at `x` (Dh, L), q or k with its bias, of `_prepared`'s output's
    `d`."""
    d = d * scale
    if fused.rope:  # the rotation's transpose: the same swap, with -sin
        d = d * cos + _swap_halves(d * sin)
    if norm:  # over the channels, the sublanes
        centered = norm == "layernorm"
        y, _, rstd = normalize_with_stats(x.astype(jnp.float32), centered, fused.eps, axis=0)
        d = normalize_grad(y, rstd, d, centered, axis=0)
    return d


class _Refs(NamedTuple):
    """A grid step's inputs: q, k, v (1, h, Dh, L) blocks [, their biases (h, Dh, 1)] [, the
    image's RoPE tables (Dh, L) float32]."""

    qkv: tuple
    biases: tuple | None
    cos: object
    sin: object

    def head(self, t: int, h: int):
        """Head h of q (t = 0), k (1) or v (2), (Dh, L), its bias added."""
        x = self.qkv[t][0, h]
        return x + self.biases[t][h] if self.biases is not None else x


def _split_refs(fused: Fused, refs) -> tuple[_Refs, tuple]:
    """(the step's inputs after the segment ids, the remaining refs)."""
    qkv, refs = refs[:3], refs[3:]
    biases = None
    if fused.bias:
        biases, refs = refs[:3], refs[3:]
    cos = sin = None
    if fused.rope:
        cos, sin, refs = refs[0][0], refs[1][0], refs[2:]
    return _Refs(qkv, biases, cos, sin), refs


def _forward_kernel(fused: Fused, seg_row_ref, seg_col_ref, *refs):
    """One batch element, `h` heads: q, k, v (1, h, Dh, L) [, biases] [, cos, sin] (`_Refs`) ->
    o (h, g, 1, r, L) (`_tiles`), lse (1, h, 1, L)."""
    inputs, (o_ref, lse_ref) = _split_refs(fused, refs)
    same = _mask(seg_col_ref[0], seg_row_ref[0])
    real = seg_row_ref[0] != 0  # (1, Lq)
    scale = inputs.qkv[0].shape[2] ** -0.5
    for h in range(inputs.qkv[0].shape[1]):
        q = _prepared(inputs.head(0, h), fused.norm_q, fused, inputs.cos, inputs.sin, scale)
        k = _prepared(inputs.head(1, h), fused.norm_k, fused, inputs.cos, inputs.sin, 1.0)
        v = inputs.head(2, h)
        s = jax.lax.dot_general(k, q, _TN, preferred_element_type=jnp.float32)  # (Lk, Lq)
        s = jnp.where(same, s, _MASKED)
        peak = jnp.max(s, axis=0, keepdims=True)  # (1, Lq)
        weights = jnp.exp(s - peak)
        total = jnp.sum(weights, axis=0, keepdims=True)
        probs = (weights * (1.0 / total)).astype(v.dtype)
        o = jnp.dot(v, probs, preferred_element_type=jnp.float32)  # (Dh, Lq)
        if fused.zero_padding:
            o = jnp.where(real, o, 0.0)
        o_ref[h, :, 0] = _to_tiles(o).astype(o_ref.dtype)
        lse_ref[0, h] = peak + jnp.log(total)


def _backward_kernel(fused: Fused, seg_row_ref, seg_col_ref, *refs):
    """One batch element, `h` heads: the forward's inputs and outputs and do -> dqkv (3, 1, h,
    Dh, L), the gradients at q, k and v with their biases (through the norms and RoPE) [, their
    sums over the tokens, the biases' gradients (1, 3, h, 1, Dh) float32]."""
    inputs, refs = _split_refs(fused, refs)
    o_ref, do_ref, lse_ref, dqkv_ref = refs[:4]
    dbias_ref = refs[4] if fused.bias else None
    same = _mask(seg_col_ref[0], seg_row_ref[0])
    real = seg_row_ref[0] != 0  # (1, Lq)
    f32 = jnp.float32
    cos, sin = inputs.cos, inputs.sin
    scale = inputs.qkv[0].shape[2] ** -0.5
    ones = jnp.ones((1, inputs.qkv[0].shape[3]), f32)
    for h in range(inputs.qkv[0].shape[1]):
        q_in, k_in = inputs.head(0, h), inputs.head(1, h)
        q = _prepared(q_in, fused.norm_q, fused, cos, sin, scale)
        k = _prepared(k_in, fused.norm_k, fused, cos, sin, 1.0)
        o = _from_tiles(o_ref[h, :, 0])  # (Dh, L)
        v, do = inputs.head(2, h), do_ref[0, h]
        if fused.zero_padding:  # the forward's outputs there were zeros: no gradient flows back
            do = jnp.where(real, do, jnp.zeros_like(do))
        s = jax.lax.dot_general(k, q, _TN, preferred_element_type=f32)  # (Lk, Lq)
        probs = jnp.where(same, jnp.exp(s - lse_ref[0, h]), 0.0)
        dv = jax.lax.dot_general(do, probs.astype(do.dtype), _NT, preferred_element_type=f32)
        dp = jax.lax.dot_general(v, do, _TN, preferred_element_type=f32)  # (Lk, Lq)
        delta = jnp.sum(o.astype(f32) * do.astype(f32), axis=0, keepdims=True)  # (1, Lq)
        ds = (probs * (dp - delta)).astype(q.dtype)
        dq = jnp.dot(k, ds, preferred_element_type=f32)  # (Dh, Lq)
        dk = jax.lax.dot_general(q, ds, _NT, preferred_element_type=f32)  # (Dh, Lk)
        dq = _prepared_grad(q_in, dq, fused.norm_q, fused, cos, sin, scale)
        dk = _prepared_grad(k_in, dk, fused.norm_k, fused, cos, sin, 1.0)
        for t, d in enumerate((dq, dk, dv)):
            dqkv_ref[t, 0, h] = d.astype(dqkv_ref.dtype)
            if dbias_ref is not None:  # the sum over the tokens (lanes) as a row: (1, L) x (L, Dh)
                dbias_ref[0, t, h] = jax.lax.dot_general(
                    ones, d, _NT, precision=jax.lax.Precision.HIGHEST, preferred_element_type=f32
                )


class _Specs(NamedTuple):
    grid: tuple
    qkv: tuple  # q, k and v: blocks of the (3, B, H, Dh, L) slab, its index 0, 1, 2
    biases: tuple  # their biases: (h, Dh, 1) blocks of the (3, H, Dh, 1) biases
    dqkv: pl.BlockSpec  # the backward's (3, 1, h, Dh, L) block of the slab's gradient
    dbias: pl.BlockSpec  # (1, 3, h, 1, Dh) of the biases' gradients per image (B, 3, H, 1, Dh)
    heads: pl.BlockSpec  # (1, h, Dh, L) of a (B, H, Dh, L) array: the output's gradient
    out: pl.BlockSpec  # (h, g, 1, r, L) of the (H, g, B, r, L) output (`_tiles`)
    lse: pl.BlockSpec
    row: pl.BlockSpec
    col: pl.BlockSpec
    table: pl.BlockSpec


def _specs(slab) -> _Specs:
    """Grid (batch, head groups) and blocks for the (3, B, H, Dh, L) slab of q, k and v."""
    _, b, heads, dh, length = slab.shape
    hb = heads_per_step(heads, dh, length, slab.dtype.itemsize)
    g, r = _tiles(dh)
    qkv = tuple(pl.BlockSpec((None, 1, hb, dh, length), lambda i, j, t=t: (t, i, j, 0, 0))
                for t in range(3))  # fmt: skip
    biases = tuple(pl.BlockSpec((None, hb, dh, 1), lambda i, j, t=t: (t, j, 0, 0))
                   for t in range(3))  # fmt: skip
    return _Specs(
        grid=(b, heads // hb),
        qkv=qkv,
        biases=biases,
        dqkv=pl.BlockSpec((3, 1, hb, dh, length), lambda i, j: (0, i, j, 0, 0)),
        dbias=pl.BlockSpec((1, 3, hb, 1, dh), lambda i, j: (i, 0, j, 0, 0)),
        heads=pl.BlockSpec((1, hb, dh, length), lambda i, j: (i, j, 0, 0)),
        out=pl.BlockSpec((hb, g, 1, r, length), lambda i, j: (j, 0, i, 0, 0)),
        lse=pl.BlockSpec((1, hb, 1, length), lambda i, j: (i, j, 0, 0)),
        row=pl.BlockSpec((1, 1, length), lambda i, j: (i, 0, 0)),
        col=pl.BlockSpec((1, length, 1), lambda i, j: (i, 0, 0)),
        table=pl.BlockSpec((1, dh, length), lambda i, j: (i, 0, 0)),
    )


def _in_specs(specs: _Specs, fused: Fused, tables) -> list:
    """The kernels' inputs up to the RoPE tables: segment ids, q, k, v [, biases] [, tables]."""
    return [specs.row, specs.col, *specs.qkv, *(specs.biases if fused.bias else ()),
            *[specs.table] * len(tables)]  # fmt: skip


def _operands(seg_row, seg_col, slab, biases, tables, fused: Fused) -> list:
    """The arrays `_in_specs` describes: the slab once per q, k, v block, the biases likewise."""
    return [seg_row, seg_col, *(slab,) * 3, *((biases,) * 3 if fused.bias else ()), *tables]


def vector_ops(fused: Fused, backward: bool) -> tuple[int, int]:
    """The kernels' vector (VPU) operations as (per score, per q/k/v element), counted as the TPU
    compiler counts XLA's elementwise work: one FLOP per operation and element. Per score: mask,
    max, subtract, exp's argument, sum, normalise, cast (forward); recomputed probabilities, mask,
    subtract, multiply, cast and the two casts of the products (backward). Per element: the
    prologue's norm (about 8), RoPE (4), casts and scale; its gradient about twice that; the
    backward's rowsum(o * do) (3)."""
    per_element = 0
    for norm in (fused.norm_q, fused.norm_k):
        per_element += (8 if norm else 0) + (4 if fused.rope else 0) + 1
    if backward:
        per_element = 3 * per_element + 3
    return (9 if backward else 7), per_element


def _work(shape, itemsize, products, arrays, fused: Fused, backward: bool):
    """The kernel's `pl.CostEstimate`: `products` matmuls of L x L x Dh per head and the vector
    work (`vector_ops`) as FLOPs, one exp per score, `arrays` (B, H, Dh, L) arrays read or
    written (plus the RoPE tables)."""
    b, heads, dh, length = shape
    per_score, per_element = vector_ops(fused, backward)
    scores, elements = b * heads * length * length, b * heads * dh * length
    tables = 2 * b * dh * length * 4 if fused.rope else 0
    return pl.CostEstimate(flops=(2 * products * dh + per_score) * scores + per_element * elements,
                           transcendentals=scores,
                           bytes_accessed=arrays * elements * itemsize + tables)  # fmt: skip


def _forward(slab, biases, seg_row, seg_col, tables, fused: Fused, interpret):
    specs = _specs(slab)
    _, b, heads, dh, length = slab.shape
    g, r = _tiles(dh)
    return pl.pallas_call(
        functools.partial(_forward_kernel, fused),
        grid=specs.grid,
        in_specs=_in_specs(specs, fused, tables),
        out_specs=[specs.out, specs.lse],
        out_shape=[
            jax.ShapeDtypeStruct((heads, g, b, r, length), slab.dtype),
            jax.ShapeDtypeStruct((b, heads, 1, length), jnp.float32),
        ],
        cost_estimate=_work(slab.shape[1:], slab.dtype.itemsize, 2, 4, fused, backward=False),
        compiler_params=_compiler_params(length),
        interpret=interpret,
        name="short_attention_fwd",
    )(*_operands(seg_row, seg_col, slab, biases, tables, fused))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attention(slab, biases, seg_row, seg_col, tables, fused, interpret):
    return _untiled(_forward(slab, biases, seg_row, seg_col, tables, fused, interpret)[0])


def _attention_fwd(slab, biases, seg_row, seg_col, tables, fused, interpret):
    out, lse = _forward(slab, biases, seg_row, seg_col, tables, fused, interpret)
    # named as the "xla" backend names them, for the "projections" remat policy (models.fit)
    out, lse = checkpoint_name(out, "attention_out"), checkpoint_name(lse, "attention_lse")
    return _untiled(out), (slab, biases, seg_row, seg_col, tables, out, lse)


def _attention_bwd(fused, interpret, residuals, d_out):
    slab, biases, seg_row, seg_col, tables, out, lse = residuals
    specs = _specs(slab)
    _, b, heads, dh, _ = slab.shape
    out_specs, out_shape = [specs.dqkv], [jax.ShapeDtypeStruct(slab.shape, slab.dtype)]
    if fused.bias:
        out_specs.append(specs.dbias)
        out_shape.append(jax.ShapeDtypeStruct((b, 3, heads, 1, dh), jnp.float32))
    grads = pl.pallas_call(
        functools.partial(_backward_kernel, fused),
        grid=specs.grid,
        in_specs=_in_specs(specs, fused, tables) + [specs.out, specs.heads, specs.lse],
        out_specs=out_specs,
        out_shape=out_shape,
        cost_estimate=_work(slab.shape[1:], slab.dtype.itemsize, 5, 8, fused, backward=True),
        compiler_params=_compiler_params(slab.shape[-1]),
        interpret=interpret,
        name="short_attention_bwd",
    )(*_operands(seg_row, seg_col, slab, biases, tables, fused), out,
      d_out.astype(slab.dtype).transpose(0, 2, 3, 1), lse)  # fmt: skip
    d_biases = None
    if fused.bias:  # (B, 3, H, 1, Dh) -> (3, H, Dh, 1)
        d_biases = grads[1].sum(axis=0).transpose(0, 1, 3, 2).astype(biases.dtype)
    return grads[0], d_biases, None, None, tuple(jnp.zeros_like(t) for t in tables)


_attention.defvjp(_attention_fwd, _attention_bwd)


def _local_attend(qkv, *args, fused: Fused, interpret: bool):
    """One shard: qkv (b, N, 3, h, Dh) [, its biases broadcast (b, 1, 3, h, Dh)], segment_ids
    (b, N) [, cos, sin (b, N, Dh/2)] -> (b, N, h, Dh)."""
    biases = None
    if fused.bias:  # one image's copy: the gradient lands there, and the sum over images is XLA's
        rows, args = args[0], args[1:]
        biases = rows[0, 0][..., None]  # (3, h, Dh, 1)
    segment_ids, rope = args[0], args[1:]
    n, kind = qkv.shape[1], tpu_device_kind()
    if n > max_tokens(kind):
        raise ValueError(f"attention_backend='short' takes rows of at most {max_tokens(kind)} "
                         f"tokens{' on ' + kind if kind else ''}, got {n}: use 'splash' (or "
                         "'auto') for longer rows")  # fmt: skip
    pad = padded_length(n) - n
    # (b, N, 3, h, Dh) -> (3, b, h, Dh, L): tokens on the lanes; the q/k/v projection's own
    # layout on TPU, so no copy (README, TPU section)
    slab = jnp.pad(qkv, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0))).transpose(2, 0, 3, 4, 1)
    seg = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, pad)), constant_values=PAD_SEGMENT)
    tables = ()
    if fused.rope:  # c' = [cos, cos], s' = [-sin, sin]: (b, Dh, L) float32
        full = full_width_tables(*(t.astype(jnp.float32) for t in rope))
        tables = tuple(jnp.pad(t, ((0, 0), (0, pad), (0, 0))).transpose(0, 2, 1) for t in full)
    out = _attention(slab, biases, seg[:, None, :], seg[:, :, None], tables, fused, interpret)
    return out[:, :n]  # (b, L, h, Dh)


def short_attend_qkv(qkv, segment_ids, cos=None, sin=None, norm_q=None, norm_k=None,
                     eps: float = 1e-6, bias=None, zero_padding: bool = False):  # fmt: skip
    """qkv: (B, N, 3, H, Dh), q, k and v as the projection gives them, N <= max_tokens(the
    chip); segment_ids: (B, N) int. Returns (B, N, H, Dh).

    The kernels do what `Fused` lists: with `bias` (3, H, Dh), the projection's bias, they add it
    to q, k and v themselves (and give its gradient, summed over the tokens); with
    `norm_q`/`norm_k` ("layernorm", "rmsnorm") and/or `cos`, `sin` (B, N, Dh/2) they apply the
    q/k norms and RoPE (q and k are then the projection's raw output, and their gradients are
    taken through the norms and the rotation); with `zero_padding` the outputs of padding tokens
    (segment 0) are zeros, as FiT's attention multiplies them before its output projection."""
    fused = Fused(norm_q, norm_k, cos is not None, eps, bias is not None, zero_padding)
    heads = (qkv,)
    if bias is not None:  # one copy per image, so that shard_map splits it as the batch
        heads += (jnp.broadcast_to(bias.astype(qkv.dtype), (qkv.shape[0], 1, *bias.shape)),)
    rope = () if cos is None else (cos, sin)
    local = functools.partial(_local_attend, fused=fused)
    return per_shard(local, heads, segment_ids, *rope)


def short_attend(q, k, v, segment_ids, cos=None, sin=None, norm_q=None, norm_k=None,
                 eps: float = 1e-6):  # fmt: skip
    """q, k, v: (B, N, H, Dh) each; the rest as `short_attend_qkv`, which takes them stacked."""
    qkv = jnp.stack([q, k, v], axis=2)
    return short_attend_qkv(qkv, segment_ids, cos, sin, norm_q, norm_k, eps)
