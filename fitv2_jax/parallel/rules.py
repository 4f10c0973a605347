"""The one table mapping logical axis names to mesh axes, and shardings derived from it.

Parameters carry logical names (`nn.with_logical_partitioning` in fitv2_jax.models); activations
are constrained with `nn.with_logical_constraint`. A logical name may appear more than once: the
first rule whose mesh axis is still unused in that array wins (flax semantics), so a kernel
(lora, adaln) shards adaln over "tensor" and lora over "fsdp". A dimension that a mesh axis does
not divide moves to another dimension it divides, or is left replicated, so any config runs on
any mesh; a large parameter left replicated is a warning that names a mesh which shards it
(FiTv2-XL/2's q/k/v kernel (1152, 3456) on FSDP over 256 chips: data 2 x FSDP 128).
"""

from __future__ import annotations

import logging
import math

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # activations
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_mlp", "tensor"),
    # parameters
    ("layers", None),
    # FFN kernels: FSDP on their hidden (mlp) axis, ahead of embed. The TPU compiler lays an
    # all-gathered kernel out with the gathered axis major; gathered on embed, fc2 (mlp, embed)
    # was then copied into the matmul's layout twice per block (FiTv2-XL/2, v5p-64, full remat:
    # 10% of the estimated cycles; the estimate went from 83 to 74.5 ms per step).
    ("mlp", ("tensor", "fsdp")),
    # attention kernels, stored flat (layers.DenseND): FSDP on the flat (3, H, Dh) or (H, Dh)
    # axis, for the same reason; gathered on embed, the q/k/v and output kernels were copied
    # into the matmul's layout after every gather (FiTv2-XL/2, v5p-64, 4 blocks unrolled: 5.74
    # vs 5.46 ms)
    ("qkv_heads", ("tensor", "fsdp")),
    ("embed", "fsdp"),
    ("embed_out", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("adaln", "tensor"),
    ("adaln", "fsdp"),
    ("lora", "fsdp"),
    ("adaln_hidden", "tensor"),
    ("qkv", None),
    ("kv", None),
    ("vocab", None),
    ("vocab_embed", None),
    ("patch_in", None),
    ("patch_out", None),
    ("freq", None),
    ("norm", None),
)


# a parameter this large that FSDP cannot shard is worth a warning: every chip then holds it (and,
# if trained, its EMA and Adam moments) whole, and all-reduces its whole gradient. Not always a
# loss: frozen in the HR post-training, FiTv2-XL/2's attention kernels replicated over v5e-256
# give a faster step than data 2 x FSDP 128 (84.2 vs 99.6 ms by the TPU compiler's estimate, remat
# "dots", splash), while the 256-token training's is slower (84.9 vs 36.9 ms, full remat, splash)
REPLICATED_WARNING_ELEMENTS = 2**20
_warned: set[tuple] = set()


def _warn_replicated(name: str, shape, mesh: Mesh, axis: str) -> None:
    """Warns once per (shape, axis, size) that a large array is replicated over `axis`, with the
    smallest data-parallel split of that axis that would shard it."""
    size = mesh.shape[axis]
    if math.prod(shape) < REPLICATED_WARNING_ELEMENTS or (tuple(shape), axis, size) in _warned:
        logging.info("sharding: %s %s not divisible by %s; replicated", name, shape, axis)
        return
    _warned.add((tuple(shape), axis, size))
    split = next((k for k in range(2, size + 1) if size % k == 0
                  and any(d % (size // k) == 0 for d in shape)), None)  # fmt: skip
    fix = ""
    if axis == "fsdp" and split:
        fix = (f" FSDP over {size // split} devices with {split}x the data parallelism would shard "
               f"it (from the default mesh: --config.mesh.ici='({split},-1,1)'); whether that is "
               "faster depends on the model: compare both with `train --dry_run --topology T`.")  # fmt: skip
    logging.warning("sharding: %s %s: no dimension divides by the %s axis's %d devices, so every "
                    "device holds it whole.%s", name, tuple(shape),
                    axis, size, fix)  # fmt: skip


def _axis_size(mesh: Mesh, axes) -> int:
    size = 1
    for a in (axes,) if isinstance(axes, str) else tuple(axes):
        size *= mesh.shape[a]
    return size


def fit_spec(spec: PartitionSpec, shape, mesh: Mesh, name: str, drop=()) -> PartitionSpec:
    """Makes a spec valid for `shape`: a mesh axis that does not divide its dimension moves to the
    largest other dimension it divides (e.g. FiTv2-XL's LoRA rank 288 on fsdp=64 moves to the 6D
    output dimension), or is dropped (replicated) when none fits; the mesh axes in `drop` are
    left out first."""
    dims: list[list[str]] = []
    for axes in tuple(spec) + (None,) * (len(shape) - len(spec)):
        axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
        dims.append([a for a in axes if a not in drop])
    spilled = []
    for i, group in enumerate(dims):
        while group and shape[i] % _axis_size(mesh, group):
            spilled.append(group.pop())
    for axis in spilled:
        if mesh.shape[axis] == 1:
            continue
        order = sorted(range(len(shape)), key=lambda i: -shape[i])
        for i in order:
            if shape[i] % (_axis_size(mesh, dims[i]) * mesh.shape[axis]) == 0:
                dims[i].append(axis)
                break
        else:
            _warn_replicated(name, shape, mesh, axis)
    return PartitionSpec(*[None if not g else g[0] if len(g) == 1 else tuple(g) for g in dims])


def tree_shardings(boxed_tree, mesh: Mesh, rules=LOGICAL_RULES):
    """NamedShardings for a tree of (possibly abstract) arrays boxed with logical names.

    Unboxed leaves (no names) are replicated.
    """
    specs = nn.get_partition_spec(boxed_tree)
    mesh_specs = nn.logical_to_mesh(specs, rules)
    leaves = nn.unbox(boxed_tree)

    def one(path, spec, leaf):
        name = jax.tree_util.keystr(path)
        spec = spec if isinstance(spec, PartitionSpec) else PartitionSpec()
        return NamedSharding(mesh, fit_spec(spec, leaf.shape, mesh, name))

    return jax.tree_util.tree_map_with_path(
        one, mesh_specs, leaves, is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None
    )


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) axis over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def gathered(kernel: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """`kernel` (a parameter with logical `names`, already cast to the compute dtype) constrained
    to its own sharding without the FSDP and data axes: gathered here, once, under the current
    mesh. Unless remat recomputes the block, the backward then reuses this gathered copy (a
    residual) instead of gathering the kernel again. Outside a mesh (or on one device): `kernel`."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return kernel
    spec = nn.logical_to_mesh_axes(names, LOGICAL_RULES)
    spec = fit_spec(spec, kernel.shape, mesh, "kernel", drop=("fsdp", "data"))
    return jax.lax.with_sharding_constraint(kernel, spec)
