"""An attention kernel run per shard: batch over ("data", "fsdp"), heads over "tensor".

    out = per_shard(local_attend, q, k, v, segment_ids)   # (B, N, H, Dh) x3, (B, N)

`local_attend(q, k, v, segment_ids, *per_row, interpret=...)` sees one shard's rows and heads,
and of each `per_row` array (B, ...) the same rows. Under a mesh
(`jax.set_mesh`) with those axes it runs in `shard_map`; otherwise on the whole arrays. Off TPU
the Pallas kernels run in interpret mode (`interpret=True`). Used by the splash and "short"
attention backends (`models.splash`, `models.short_attention`).
"""

from __future__ import annotations

import functools

import jax
from jax.sharding import PartitionSpec as P

from fitv2_jax.parallel.platform import compiling_for_tpu


def per_shard(local_attend, q, k, v, segment_ids, *per_row):
    """q, k, v: (B, N, H, Dh); segment_ids: (B, N); per_row: arrays (B, ...) split as the batch.
    Returns local_attend's (B, N, H, Dh)."""
    mesh = jax.sharding.get_abstract_mesh()
    interpret = not compiling_for_tpu()
    if mesh.empty or not {"data", "fsdp", "tensor"} <= set(mesh.axis_names):
        return local_attend(q, k, v, segment_ids, *per_row, interpret=interpret)
    spec, rows = P(("data", "fsdp"), None, "tensor", None), P(("data", "fsdp"))
    attend = jax.shard_map(
        functools.partial(local_attend, interpret=interpret),
        mesh=mesh,
        in_specs=(spec, spec, spec, rows) + (rows,) * len(per_row),
        out_specs=spec,
        check_vma=False,
    )
    return attend(q, k, v, segment_ids, *per_row)
