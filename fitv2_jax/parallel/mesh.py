"""Device meshes with the axes ("data", "fsdp", "tensor").

`ici` is the per-slice shape and `dcn` the shape across slices (multi-slice TPU, multi-node GPU),
both in the axis order above; one -1 in `ici` takes the remaining devices. The global mesh shape is
ici * dcn axis by axis; on a single slice, dcn is all ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from fitv2_jax.utils.errors import UserError

AXES = ("data", "fsdp", "tensor")


def resolve_shape(
    shape: Sequence[int], num_devices: int, what: str = "mesh.ici"
) -> tuple[int, ...]:
    """Replaces one -1 by what is left of num_devices; checks the product."""
    shape = [int(s) for s in shape]
    if len(shape) != len(AXES):
        raise UserError(f"{what}={shape}: give {len(AXES)} sizes for axes {AXES}.")
    if shape.count(-1) > 1:
        raise UserError(f"{what}={shape}: at most one -1.")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise UserError(f"{what}={shape}: {num_devices} devices are not divisible by {known}.")
        shape[shape.index(-1)] = num_devices // known
    if math.prod(shape) != num_devices:
        raise UserError(
            f"{what}={shape} needs {math.prod(shape)} devices but {num_devices} are available; "
            "use -1 for one axis to fill the rest."
        )
    return tuple(shape)


def _hybrid_grid_in_order(ici, dcn, devices) -> np.ndarray:
    """Hybrid layout for devices without slice_index (CPU, some GPU set-ups): consecutive blocks
    of prod(ici) devices form the slices; axis i of the result has size dcn[i] * ici[i], slice
    index major, so collectives over an ICI-only axis stay inside one block."""
    n = len(AXES)
    grid = np.asarray(devices).reshape(tuple(dcn) + tuple(ici))
    order = [k for i in range(n) for k in (i, n + i)]  # (dcn_0, ici_0, dcn_1, ici_1, ...)
    return grid.transpose(order).reshape([d * i for d, i in zip(dcn, ici, strict=True)])


def create_mesh(
    ici: Sequence[int] = (1, -1, 1),
    dcn: Sequence[int] | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """Mesh over `devices` (default: all). Example: ici=(2, 4, 1) -> data 2 x fsdp 4."""
    devices = list(jax.devices() if devices is None else devices)
    dcn = tuple(dcn) if dcn is not None else (1,) * len(AXES)
    num_slices = math.prod(dcn)
    per_slice = len(devices) // num_slices
    ici_shape = resolve_shape(ici, per_slice, "mesh.ici")
    if num_slices > 1:
        if all(hasattr(d, "slice_index") for d in devices):
            grid = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn, devices)
        else:
            grid = _hybrid_grid_in_order(ici_shape, dcn, devices)
    else:
        try:
            grid = mesh_utils.create_device_mesh(ici_shape, devices)
        except (AssertionError, NotImplementedError, ValueError):
            grid = np.asarray(devices).reshape(ici_shape)
    return Mesh(grid, AXES)


def inference_mesh(config, kind: str = "data", devices=None) -> Mesh:
    """Mesh for sampling and evaluation over `devices` (default all; evaluation on several
    hosts passes each host's own). 'data': every device on the data axis (params replicated,
    fastest to compile); 'config': the config's training mesh (params FSDP-sharded, for models
    too big for one device; ici only when the devices are one host's)."""
    if kind == "data":
        return create_mesh((-1, 1, 1), devices=devices)
    if kind == "config":
        dcn = config.mesh.dcn if devices is None else None
        return create_mesh(config.mesh.ici, dcn, devices=devices)
    raise ValueError(f"mesh kind {kind!r}: use 'data' or 'config'")
