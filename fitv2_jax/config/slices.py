"""Per-slice presets of the pod configs: `--config configs/fitv2_xl.py:v5e-256`.

    config = with_preset(config, PRESETS, preset, default="v5p-64")   # in a config's get_config
    note = slice_note(config, "v5e", 256)    # None, or what to pass on that slice instead

A pod config's own settings are the fastest the README's TPU table found for its default slice
(v5p-64); on another slice other settings win (a mesh whose FSDP axis divides the kernels, the
blocks scanned and recomputed where a chip holds one image). The config file's PRESETS give
them per slice as dotted overrides, applied after `get_config`'s own and before the command
line's `--config.a.b=value`. `config.mesh.slices` records the slices the settings are for (the
chosen one and those whose preset is the same) and `config.mesh.slice_presets` the slices the
file has presets for, so that a run or a dry run on another slice says which preset to take
(`slice_note`). Which settings, and the compiler's
estimates behind them: the config's docstring and `python -m fitv2_jax.bench --suite tpu
--presets`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections

from fitv2_jax.parallel.topology import CHIPS, parse_topology
from fitv2_jax.utils.errors import UserError

Presets = Mapping[str, Mapping[str, Any]]


def slice_name(kind: str, chips: int) -> str:
    """The Cloud TPU pod name of `chips` chips of a kind ("v5p", 32 -> "v5p-64": v4 and v5p
    names count TensorCores, two per chip)."""
    return f"{kind}-{chips * CHIPS[kind].cores_in_name}"


def canonical(name: str) -> str:
    """A slice as its pod name: "v5p:4x4x2" or "V5P-64" -> "v5p-64" (UserError if unknown)."""
    chip, _, chips = parse_topology(name)
    return slice_name(chip.name, chips)


def with_preset(config: ml_collections.ConfigDict, presets: Presets, preset: str | None,
                default: str) -> ml_collections.ConfigDict:  # fmt: skip
    """The config with its preset for slice `preset` applied (none: the config's own settings,
    which are for slice `default`); records which slices they suit in config.mesh (module doc)."""
    config.mesh.slice_presets = tuple(presets)
    name = default
    if preset:
        try:
            name = canonical(preset)
        except UserError:
            name = None
        if name not in presets:
            raise UserError(f"config preset {preset!r}: this config has presets for "
                            f"{', '.join(presets)} (append one to the file: --config "
                            f"configs/fitv2_xl.py:v5e-256). Without one it keeps its {default} "
                            "settings; any field can still be set with --config.a.b=value.")  # fmt: skip
    overrides = dict(presets.get(name, {}))
    same = [n for n, o in presets.items() if dict(o) == overrides]  # in the file's order
    config.mesh.slices = tuple(same if name in same else [name, *same])
    for dotted in overrides:  # update_from_flattened_dict would add a misspelt field silently
        *parents, leaf = dotted.split(".")
        node = config
        for part in parents:
            node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            raise KeyError(f"{dotted} (a preset for {name} in the config file's PRESETS)")
    config.update_from_flattened_dict(overrides)
    return config


def slice_note(config: ml_collections.ConfigDict, kind: str, chips: int) -> str | None:
    """What to say when `config` runs on `chips` chips (per slice) of `kind` but its settings
    are for another slice: None when they match, or when the config names no slice (the small
    configs, which have no presets)."""
    ours = tuple(config.mesh.get("slices", ()) or ())
    if not ours or kind not in CHIPS:
        return None
    running = slice_name(kind, chips)
    if running in ours:
        return None
    presets = tuple(config.mesh.get("slice_presets", ()) or ())
    head = f"the config's settings are for {' and '.join(ours)}, not this {running}"
    if running in presets:
        return (f"{head}; the config file has a preset for {running}: append ':{running}' to "
                f"--config (e.g. --config configs/fitv2_xl.py:{running}).")  # fmt: skip
    return (f"{head} (its presets: {', '.join(presets)}); none was estimated for {running}: "
            f"compare remat, attention and mesh settings with `train --dry_run --topology "
            f"{running}` (README, TPU table).")  # fmt: skip


def live_slice(devices) -> tuple[str, int] | None:
    """(chip kind, chips per slice) of the TPU devices a run has, or None off TPU or for a chip
    kind the presets do not know. One device per chip (megacore on v4 and v5p)."""
    if not devices or devices[0].platform != "tpu":
        return None
    kind = _KINDS.get(str(devices[0].device_kind).strip().lower())
    if kind is None:
        return None
    slices = {getattr(d, "slice_index", 0) for d in devices}
    return kind, len(devices) // max(len(slices), 1)


# jax's device_kind of each chip kind (`Chip.device_kind`), and the other names runtimes give
_KINDS = {chip.device_kind.lower(): name for name, chip in CHIPS.items()} | {
    "tpu v5p": "v5p", "tpu v5e": "v5e", "tpu v6e": "v6e"}  # fmt: skip
