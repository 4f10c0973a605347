"""Splash attention (Pallas TPU flash attention with segment ids) for FiT's masked attention.

    out = splash_attend(q, k, v, segment_ids)   # (B, N, H, Dh) x3, (B, N) -> (B, N, H, Dh)

The official mask is "query i sees key j iff segment[i] == segment[j]" (0 = padding), which is
exactly splash's segment-id mask over a full (non-causal) mask, so padded and packed rows need
no mask array. Under a mesh (`jax.set_mesh`) the kernel runs per shard with `shard_map`: batch
over ("data", "fsdp"), heads over "tensor"; each shard's kernel sees only its own heads and rows.
Rows are padded to a multiple of the block size with segment id -1 (pads see only pads; their
outputs are cut off). On CPU, or any mesh that is not TPU, the kernel runs in Pallas interpret
mode (slow; for tests). Softmax scale 1/sqrt(Dh) is applied to q before the kernel. Mosaic
rejects bf16 dots under `jax_default_matmul_precision="highest"` ("Bad lhs type"): keep the
default precision when compiling for TPU.

Layout: q, k and v enter the kernel as (h, Dh, L), tokens on the lanes (`QKVLayout.SEQ_MINOR`
for all three; the kernel transposes its q tile itself). With the kernel's default (Dh on the
lanes) a head's 72 or 96 channels were padded to 128 lanes, and XLA laid the q/k norms and RoPE
out the same way around the kernel; tokens on the lanes is what XLA attention uses too. By the
compiler's estimate of the ops around the kernels (v5p-64, 4 blocks unrolled, no remat, a train
step; the kernels' own priced work is the same either way): FiTv2-XL/2 5.91 ms vs 6.99 with Dh
on the lanes; HR FiTv2-XL/2 at 1024 tokens 16.72 vs 18.71; FiTv2-3B/2 (Dh 96) 16.48 vs 17.13.
Mixed layouts were in between or worse.

Block sizes (fused backward kernel): the padded length when it is at most 512 (one block per
row at 256 tokens), else 512 (1024 tokens: 2 x 2 blocks), except that the backward takes all of a
row's keys in one block, computed 512 at a time. With two key blocks the fused backward wrote a
partial dq per key block and XLA summed them in a reduce the compiler prices at 0.6 ms per HR
FiTv2-XL/2 block on v5p (4 blocks unrolled: 17.88 vs 19.08 ms a step; `python -m fitv2_jax.train
--dry_run` prints the profile). The kernels' own tile sizes do not move the estimate, which
prices them by their work (`parallel.cost.splash_kernel_work`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

from fitv2_jax.parallel.shard_attention import per_shard

BLOCK_MULTIPLE = 128  # splash tiles rows in multiples of 128
MAX_BLOCK = 512
PAD_SEGMENT = -1
# q, k and v enter the kernel as (h, Dh, L): tokens on the lanes (module doc)
SEQ_MINOR = splash.QKVLayout.SEQ_MINOR


def block_size(length: int) -> int:
    """Block size for a padded row length (a multiple of BLOCK_MULTIPLE)."""
    return length if length <= MAX_BLOCK else MAX_BLOCK


def padded_length(n: int) -> int:
    multiple = BLOCK_MULTIPLE if n <= MAX_BLOCK else MAX_BLOCK
    return -(-n // multiple) * multiple


def _kernel(heads: int, length: int, interpret: bool):
    b = block_size(length)
    # the backward takes a row's keys in one block (computed b at a time): with several key
    # blocks the fused kernel writes one partial dq per block and XLA sums them after it
    sizes = splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                              block_kv_dkv=length, block_kv_dkv_compute=b,
                              use_fused_bwd_kernel=True, q_layout=SEQ_MINOR, k_layout=SEQ_MINOR,
                              v_layout=SEQ_MINOR)  # fmt: skip
    mask = masks.MultiHeadMask([masks.FullMask((length, length)) for _ in range(heads)])
    # built per trace, not cached: its mask tables become constants of the trace that made them
    return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                  interpret=interpret)  # fmt: skip


def _local_attend(q, k, v, segment_ids, interpret: bool):
    """One shard: q, k, v (b, N, h, Dh), segment_ids (b, N) -> (b, N, h, Dh)."""
    n, heads, dh = q.shape[1], q.shape[2], q.shape[3]
    length = padded_length(n)
    pad = length - n
    q = q * jnp.asarray(dh**-0.5, q.dtype)
    to_heads_first = lambda x: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)  # fmt: skip
    q, k, v = to_heads_first(q), to_heads_first(k), to_heads_first(v)
    seg = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, pad)), constant_values=PAD_SEGMENT)
    kernel = _kernel(heads, length, interpret)
    one = lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(q=s, kv=s))
    out = jax.vmap(one)(q, k, v, seg)  # (b, h, L, Dh)
    return out.transpose(0, 2, 1, 3)[:, :n]


def splash_attend(q, k, v, segment_ids):
    """q, k, v: (B, N, H, Dh); segment_ids: (B, N) int. Returns (B, N, H, Dh)."""
    return per_shard(_local_attend, (q, k, v), segment_ids)
