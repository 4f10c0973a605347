"""Compile the real train step ahead of time on fake devices: memory per device and collectives.

    python -m fitv2_jax.train --config configs/fitv2_3b.py --dry_run --num_devices 64

Nothing is allocated: the state and batch are abstract (ShapeDtypeStruct with shardings), the step
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

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


def _per_device_bytes(tree, shardings) -> int:
    import jax

    total = 0
    for leaf, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True):
        total += math.prod(sh.shard_shape(leaf.shape)) * leaf.dtype.itemsize
    return total


def _total_bytes(tree) -> int:
    import jax

    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def count_collectives(hlo_text: str) -> dict[str, int]:
    counts = Counter()
    for name in COLLECTIVES:
        # ops appear as e.g. "all-gather(" or "all-gather-start(" in optimized HLO
        counts[name] = len(re.findall(rf"\b{name}(?:-start)?\(", hlo_text))
    return dict(counts)


def dry_run(config, global_batch: int | None = None) -> dict:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from fitv2_jax.models.fit import FiT
    from fitv2_jax.parallel.mesh import create_mesh
    from fitv2_jax.parallel.rules import LOGICAL_RULES
    from fitv2_jax.training.state import make_optimizer, state_shardings
    from fitv2_jax.training.step import make_train_step

    mesh = create_mesh(config.mesh.ici, config.mesh.dcn)
    model = FiT(**config.model)
    gb = int(global_batch or config.data.global_batch_size)
    tx_factory = lambda params: make_optimizer(config.train, gb, params)
    abstract, shardings = state_shardings(model, tx_factory, mesh)
    tx = tx_factory(abstract.params)

    n = int(config.model.context_size)
    c = config.model.patch_size**2 * config.model.in_channels
    batch_axes = ("data", "fsdp")
    shapes = dict(x=((gb, n, c), jnp.float32), grid=((gb, 2, n), jnp.int32), mask=((gb, n), jnp.float32),
                  y=((gb,), jnp.int32), size=((gb, 2), jnp.int32))  # fmt: skip
    batch = {
        k: jax.ShapeDtypeStruct(
            s, d, sharding=NamedSharding(mesh, PartitionSpec(batch_axes, *[None] * (len(s) - 1)))
        )
        for k, (s, d) in shapes.items()
    }
    state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract, shardings
    )
    step = jax.jit(
        make_train_step(model, config, tx),
        in_shardings=(shardings, {k: v.sharding for k, v in batch.items()}),
        out_shardings=(shardings, None),
        donate_argnums=(0,),
    )
    print(
        f"dry run: {jax.device_count()} fake devices, mesh {dict(mesh.shape)}, global batch {gb} x {n} tokens"
    )
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        compiled = step.lower(state, batch).compile()
    mem = compiled.memory_analysis()
    hlo = compiled.as_text()

    report = {
        "devices": jax.device_count(),
        "params_total_bytes": _total_bytes(abstract.params),
        "params_bytes_per_device": _per_device_bytes(abstract.params, shardings.params),
        "ema_bytes_per_device": _per_device_bytes(abstract.ema_params, shardings.ema_params),
        "opt_bytes_per_device": _per_device_bytes(abstract.opt_state, shardings.opt_state),
        "opt_total_bytes": _total_bytes(abstract.opt_state),
        "argument_bytes": int(getattr(mem, "argument_size_in_bytes", 0)),
        "output_bytes": int(getattr(mem, "output_size_in_bytes", 0)),
        "temp_bytes": int(getattr(mem, "temp_size_in_bytes", 0)),
        "alias_bytes": int(getattr(mem, "alias_size_in_bytes", 0)),
        "collectives": count_collectives(hlo),
    }
    report["peak_bytes_estimate"] = (
        report["argument_bytes"]
        + report["output_bytes"]
        + report["temp_bytes"]
        - report["alias_bytes"]
    )
    gib = 2.0**30
    print(f"parameters: {report['params_total_bytes'] / gib:.2f} GiB total, "
          f"{report['params_bytes_per_device'] / gib:.3f} GiB per device "
          f"(1/{report['params_total_bytes'] / max(report['params_bytes_per_device'], 1):.1f})")  # fmt: skip
    print(f"EMA params: {report['ema_bytes_per_device'] / gib:.3f} GiB per device")
    print(f"optimizer state: {report['opt_total_bytes'] / gib:.2f} GiB total, "
          f"{report['opt_bytes_per_device'] / gib:.3f} GiB per device")  # fmt: skip
    print(f"compiled step per device: arguments {report['argument_bytes'] / gib:.3f} GiB, outputs "
          f"{report['output_bytes'] / gib:.3f} GiB (aliased {report['alias_bytes'] / gib:.3f}), temporaries "
          f"{report['temp_bytes'] / gib:.3f} GiB -> peak about {report['peak_bytes_estimate'] / gib:.2f} GiB")  # fmt: skip
    print(
        "collectives in the HLO: " + ", ".join(f"{k} {v}" for k, v in report["collectives"].items())
    )
    return report
