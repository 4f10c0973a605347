"""An attention kernel run per shard: batch over ("data", "fsdp"), heads over "tensor".

    out = per_shard(local_attend, (q, k, v), segment_ids)   # (B, N, H, Dh) x3, (B, N)
    out = per_shard(local_attend, (qkv,), segment_ids)      # (B, N, 3, H, Dh), (B, N)

`local_attend(*heads, segment_ids, *per_row, interpret=...)` sees one shard's rows and heads of
each `heads` array (heads on its second-to-last axis), and of each `per_row` array (B, ...) the
same rows. Under a mesh (`jax.set_mesh`) with those axes it runs in `shard_map`; otherwise on
the whole arrays. Off TPU the Pallas kernels run in interpret mode (`interpret=True`). Used by
the splash and "short" attention backends (`models.splash`, `models.short_attention`).
"""

from __future__ import annotations

import functools

import jax
from jax.sharding import PartitionSpec as P

from fitv2_jax.parallel.platform import compiling_for_tpu

BATCH = ("data", "fsdp")


def _heads_spec(ndim: int) -> P:
    """(B, N, ..., H, Dh): the batch split as the activations', the heads over "tensor"."""
    return P(BATCH, *([None] * (ndim - 3)), "tensor", None)


def per_shard(local_attend, heads: tuple, segment_ids, *per_row):
    """heads: arrays (B, N, ..., H, Dh); segment_ids: (B, N); per_row: arrays (B, ...) split as
    the batch. Returns local_attend's (B, N, H, Dh)."""
    mesh = jax.sharding.get_abstract_mesh()
    interpret = not compiling_for_tpu()
    if mesh.empty or not {"data", "fsdp", "tensor"} <= set(mesh.axis_names):
        return local_attend(*heads, segment_ids, *per_row, interpret=interpret)
    rows = P(BATCH)
    attend = jax.shard_map(
        functools.partial(local_attend, interpret=interpret),
        mesh=mesh,
        in_specs=tuple(_heads_spec(x.ndim) for x in heads) + (rows,) * (1 + len(per_row)),
        out_specs=_heads_spec(4),
        check_vma=False,
    )
    return attend(*heads, segment_ids, *per_row)
