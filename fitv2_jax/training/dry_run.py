"""Compile the real train step ahead of time on fake devices: memory per device and collectives.

    python -m fitv2_jax.train --config configs/fitv2_3b.py --dry_run --num_devices 64

The step is the train loop's own (`training.setup.build_setup`). Nothing is allocated: the state and batch are abstract (ShapeDtypeStruct with shardings), the step
is lowered and compiled for the mesh in config.mesh over N fake CPU devices, and the report gives
per-device bytes of parameters, EMA and optimizer state (from the shardings), the compiled step's
memory analysis (arguments, outputs, temporaries, peak estimate) and the collectives in its HLO.
CPU compilation approximates a TPU's memory plan (same SPMD partitioning, different fusion), so
treat the peak as an estimate; the state bytes are exact.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import jax

from fitv2_jax.training.setup import build_setup

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


def _per_device_bytes(tree, shardings) -> int:
    total = 0
    for leaf, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True):
        total += math.prod(sh.shard_shape(leaf.shape)) * leaf.dtype.itemsize
    return total


def _total_bytes(tree) -> int:
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def count_collectives(hlo_text: str) -> dict[str, int]:
    counts = Counter()
    for name in COLLECTIVES:
        # ops appear as e.g. "all-gather(" or "all-gather-start(" in optimized HLO
        counts[name] = len(re.findall(rf"\b{name}(?:-start)?\(", hlo_text))
    return dict(counts)


def dry_run(config, global_batch: int | None = None) -> dict:
    """Compiles the train step of `build_setup(config)` for the current devices; see above."""
    setup = build_setup(config, global_batch)
    n = int(config.model.context_size)
    print(f"dry run: {jax.device_count()} fake devices, mesh {dict(setup.mesh.shape)}, "
          f"global batch {setup.global_batch} x {n} tokens")  # fmt: skip
    with setup.context():
        compiled = setup.step.lower(
            setup.abstract_state_sharded(), setup.abstract_batch(n)
        ).compile()
    report = _memory_report(setup, compiled)
    _print_report(report)
    return report


def _memory_report(setup, compiled) -> dict:
    mem = compiled.memory_analysis()
    state, sh = setup.abstract_state, setup.shardings
    report = {
        "devices": jax.device_count(),
        "params_total_bytes": _total_bytes(state.params),
        "params_bytes_per_device": _per_device_bytes(state.params, sh.params),
        "ema_bytes_per_device": _per_device_bytes(state.ema_params, sh.ema_params),
        "opt_bytes_per_device": _per_device_bytes(state.opt_state, sh.opt_state),
        "opt_total_bytes": _total_bytes(state.opt_state),
        "argument_bytes": int(getattr(mem, "argument_size_in_bytes", 0)),
        "output_bytes": int(getattr(mem, "output_size_in_bytes", 0)),
        "temp_bytes": int(getattr(mem, "temp_size_in_bytes", 0)),
        "alias_bytes": int(getattr(mem, "alias_size_in_bytes", 0)),
        "collectives": count_collectives(compiled.as_text()),
    }
    report["peak_bytes_estimate"] = (report["argument_bytes"] + report["output_bytes"]
                                     + report["temp_bytes"] - report["alias_bytes"])  # fmt: skip
    return report


def _print_report(r: dict) -> None:
    gib = 2.0**30
    print(f"parameters: {r['params_total_bytes'] / gib:.2f} GiB total, "
          f"{r['params_bytes_per_device'] / gib:.3f} GiB per device "
          f"(1/{r['params_total_bytes'] / max(r['params_bytes_per_device'], 1):.1f})")  # fmt: skip
    print(f"EMA params: {r['ema_bytes_per_device'] / gib:.3f} GiB per device")
    print(f"optimizer state: {r['opt_total_bytes'] / gib:.2f} GiB total, "
          f"{r['opt_bytes_per_device'] / gib:.3f} GiB per device")  # fmt: skip
    print(f"compiled step per device: arguments {r['argument_bytes'] / gib:.3f} GiB, outputs "
          f"{r['output_bytes'] / gib:.3f} GiB (aliased {r['alias_bytes'] / gib:.3f}), temporaries "
          f"{r['temp_bytes'] / gib:.3f} GiB -> peak about {r['peak_bytes_estimate'] / gib:.2f} GiB")  # fmt: skip
    print("collectives in the HLO: " + ", ".join(f"{k} {v}" for k, v in r["collectives"].items()))
