"""TPU topologies without a TPU: compile-only devices from libtpu, and what each chip offers.

    devices, chip = topology_devices("v5p-64")          # 32 chips, 1 slice
    devices, chip = topology_devices("v5e:16x16", num_slices=2)

libtpu (`pip install -e ".[tpu]"`) runs the real TPU compiler on any host: a jit lowered over a
Mesh of these devices and compiled gives the TPU program, its memory plan and its cost estimate.
Names: Cloud TPU pod names ("v5p-64": the number counts TensorCores for v4 and v5p, two per chip,
and chips for v5e and v6e) or libtpu's "<kind>:<chip grid>" ("v5p:4x4x2", "v6e:8x8").
Chip facts are per chip from the Cloud TPU documentation (HBM; dense bf16 peak; bidirectional ICI
bandwidth, which its pages give for v5e 400, v5p 1200 and v6e 800 GB/s and not for v4); per device
they are divided by the devices each chip shows. v4 and v5p chips are asked for as megacore (one device
of two TensorCores per chip), as JAX runs them on a real slice; left to its default, libtpu shows
a v4 chip as two one-core devices, and the dry run compiled a program for twice the devices that a
v4 slice gives (v4-32: 32 instead of 16).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

from jax.experimental import topologies

from fitv2_jax.utils.errors import UserError


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str  # v4, v5p, v5e, v6e
    hbm_gib: float  # per chip
    bf16_tflops: float  # dense peak per chip
    cores_in_name: int  # how many units of a pod name ("v5p-64") one chip is
    dims: int  # chip grid dimensions (3D torus or 2D)
    device_kind: str  # jax's `device_kind` of its devices
    ici_gbytes_per_s: float | None = None  # bidirectional, all links of a chip; None: undocumented


CHIPS = {
    "v4": Chip("v4", 32.0, 275.0, 2, 3, "TPU v4"),
    "v5p": Chip("v5p", 95.0, 459.0, 2, 3, "TPU v5", 1200.0),
    "v5e": Chip("v5e", 16.0, 197.0, 1, 2, "TPU v5 lite", 400.0),
    "v6e": Chip("v6e", 32.0, 918.0, 1, 2, "TPU v6 lite", 800.0),
}


def chip_grid(chips: int, dims: int) -> tuple[int, ...]:
    """The usual slice shape for a power-of-two chip count: 32 chips in 3D -> (4, 4, 2);
    256 in 2D -> (16, 16). Dimensions grow in turn from (2, 2, 1) / (1, 1)."""
    if chips < 1 or chips & (chips - 1):
        raise UserError(f"--topology: {chips} chips is not a power of two; give the grid "
                        "explicitly, e.g. v5p:4x4x2")  # fmt: skip
    grid = [2, 2, 1] if dims == 3 and chips >= 4 else [1] * dims
    order = [2, 0, 1] if dims == 3 else [0, 1]
    i = 0
    while math.prod(grid) < chips:
        grid[order[i % dims]] *= 2
        i += 1
    if math.prod(grid) != chips:
        raise UserError(f"--topology: {chips} chips do not form a {dims}D slice")
    return tuple(sorted(grid, reverse=True))


def parse_topology(name: str) -> tuple[Chip, str, int]:
    """'v5p-64' or 'v5p:4x4x2' -> (chip, libtpu topology name, chips)."""
    m = re.fullmatch(r"(v4|v5p|v5e|v6e)(?:-(\d+)|:(\d+(?:x\d+)*))", name.strip().lower())
    if not m:
        raise UserError(f"--topology={name!r}: expected a pod name such as v5p-64, v5e-256, "
                        f"v6e-64, v4-32, or kind:grid such as v5p:4x4x2 (kinds {sorted(CHIPS)})")  # fmt: skip
    chip = CHIPS[m.group(1)]
    if m.group(2):
        count = int(m.group(2))
        if count % chip.cores_in_name:
            raise UserError(f"--topology={name}: {chip.name} pod names count TensorCores, "
                            f"{chip.cores_in_name} per chip; {count} is not a multiple")  # fmt: skip
        grid = chip_grid(count // chip.cores_in_name, chip.dims)
    else:
        grid = tuple(int(g) for g in m.group(3).split("x"))
        if len(grid) != chip.dims:
            raise UserError(f"--topology={name}: {chip.name} grids have {chip.dims} dimensions")
    return chip, f"{chip.name}:{'x'.join(map(str, grid))}", math.prod(grid)


def topology_devices(name: str, num_slices: int = 1):
    """Compile-only TPU devices of `num_slices` slices of `name`, and the chip. Needs libtpu."""
    chip, libtpu_name, chips = parse_topology(name)
    # compile-only: no chip is opened, so processes need not take libtpu's host lock in turn
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        topo = topologies.get_topology_desc(
            topology_name=libtpu_name,
            platform="tpu",
            num_slices=num_slices,
            **({"chip_config_name": "megacore"} if chip.cores_in_name == 2 else {}),
        )
    except Exception as e:  # noqa: BLE001 - libtpu missing or a topology it rejects
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"--topology={name} ({libtpu_name}, {num_slices} slice(s)): libtpu "
                        f"cannot describe it: {text}. Install it with pip install -e \".[tpu]\"; "
                        "slices must be a multiple of one host's chips") from e  # fmt: skip
    return list(topo.devices), chip, chips * num_slices


def per_device(chip: Chip, num_devices: int, num_chips: int) -> tuple[float, float]:
    """(HBM bytes, bf16 FLOP/s) of one device: the chip's, divided by devices per chip."""
    share = num_chips / num_devices
    return chip.hbm_gib * 2.0**30 * share, chip.bf16_tflops * 1e12 * share


def ici_send_rate(chip: Chip, num_devices: int, num_chips: int) -> float | None:
    """Bytes per second one device can send over ICI with every link of its chip busy: half the
    chip's bidirectional bandwidth (it receives as much as it sends), divided by devices per chip;
    None where Cloud TPU documents no figure (v4)."""
    if chip.ici_gbytes_per_s is None:
        return None
    return chip.ici_gbytes_per_s * 1e9 / 2 * num_chips / num_devices
