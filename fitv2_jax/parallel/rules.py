"""The one table mapping logical axis names to mesh axes, and shardings derived from it.

Parameters carry logical names (`nn.with_logical_partitioning` in fitv2_jax.models); activations
are constrained with `nn.with_logical_constraint`. A logical name may appear more than once: the
first rule whose mesh axis is still unused in that array wins (flax semantics), so a kernel
(lora, adaln) shards adaln over "tensor" and lora over "fsdp". A dimension that a mesh axis does
not divide is left replicated (logged), so any config runs on any mesh.
"""

from __future__ import annotations

import logging

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
    ("patch_in", None),
    ("patch_out", None),
    ("freq", None),
    ("norm", None),
)


def _fit_spec(spec: PartitionSpec, shape, mesh: Mesh, name: str) -> PartitionSpec:
    """Drops mesh axes that do not divide their dimension."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=False):
        if axes is None:
            fitted.append(None)
            continue
        group = (axes,) if isinstance(axes, str) else tuple(axes)
        size = 1
        for a in group:
            size *= mesh.shape[a]
        if dim % size:
            logging.info("sharding: %s dim %d not divisible by %s=%d; replicated", name, dim, group, size)
            fitted.append(None)
        else:
            fitted.append(axes)
    return PartitionSpec(*fitted)


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
        return NamedSharding(mesh, _fit_spec(spec, leaf.shape, mesh, name))

    return jax.tree_util.tree_map_with_path(
        one, mesh_specs, leaves, is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None
    )


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) axis over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
