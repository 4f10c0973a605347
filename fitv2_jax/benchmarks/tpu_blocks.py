r"""A few unrolled blocks of a config's train step, compiled for a TPU slice by libtpu (no TPU
needed), in variants side by side: the compiler's estimated step time and its ratio to the first
variant, where the estimated cycles go, and the largest (module, op kind, fwd/bwd) groups.

    python -m fitv2_jax.bench --suite tpu_blocks --config configs/fitv2_xl.py --topology v5p-64 \
        --variant "" --variant "model.gather_attention_once=True"

The quick probe behind the README's "4 unrolled XL blocks" figures: FiTv2-XL/2 with 8 blocks on
v5p-64 compiles in about 140 s a variant on a 2-core host (4 blocks: 70-90 s), against 15 minutes
for the whole step's two programs. Take a probe's ratio as a direction, not as the step's: gains
shrink with the blocks (measured, v5p-64: `model.gather_attention_once=True` 6% at 4 blocks, 2%
on the whole XL step; the softmax shift of `models.softmax_attention` 5% at 4 blocks, 1.3% at
8, 1% on the whole step), so confirm one with `train --dry_run --topology T`.
Every variant starts from the config with `--blocks` blocks, all unrolled, no remat, then
applies its own space-separated overrides (`model.remat_policy=dots mesh.ici=(2,-1,1)`), typed
as `--config.a.b=v` is. The program compiled is the estimate's (windowed einsums off,
`parallel.cost`): its FLOPs are printed against the model's own count for those blocks. A
block's cost here is not a whole step's: the embedder, final layer and optimizer are a larger
share of 4 blocks than of 36. Compiler estimates, not measurements.
"""

from __future__ import annotations

import shlex
import time

from absl import flags

from fitv2_jax.config.files import load_config
from fitv2_jax.models.summary import train_step_flops
from fitv2_jax.parallel.cost import ESTIMATE_OPTIONS, program_cost
from fitv2_jax.parallel.mesh import create_mesh
from fitv2_jax.parallel.topology import per_device, topology_devices
from fitv2_jax.training.dry_run import compile_step, cycle_report

FLAGS = flags.FLAGS


def define_flags(module_name: str) -> None:
    m = module_name
    flags.DEFINE_string("config", "configs/fitv2_xl.py", "config file", module_name=m)
    flags.DEFINE_string("topology", "v5p-64", "TPU slice (see train --topology)", module_name=m)
    flags.DEFINE_integer("blocks", 8, "blocks compiled, all unrolled", module_name=m)
    flags.DEFINE_integer("global_batch", 256, "global batch", module_name=m)
    flags.DEFINE_multi_string("variant", [""], "space-separated config overrides of one "
                              "variant (repeat the flag; the first is the baseline)",
                              module_name=m)  # fmt: skip
    flags.DEFINE_integer("top", 12, "cycle groups listed per variant", module_name=m)


def blocks_config(path: str, blocks: int, variant: str):
    """The config with `blocks` unrolled blocks, no remat, then the variant's overrides."""
    base = [f"model.depth={blocks}", f"model.scan_unroll={blocks}", "model.remat_policy=none"]
    return load_config(path, base + shlex.split(variant))


def _variant(variant: str, devices, peak: float, baseline: float | None) -> float:
    config = blocks_config(FLAGS.config, FLAGS.blocks, variant)
    mesh = create_mesh(config.mesh.ici, config.mesh.dcn, devices=devices)
    start = time.perf_counter()
    compiled = compile_step(config, FLAGS.global_batch, mesh, ESTIMATE_OPTIONS)[1]
    flops, seconds = program_cost(compiled)
    tokens = int(config.model.context_size)
    model_flops = train_step_flops(config.model, FLAGS.global_batch, tokens) / len(devices)
    ratio = f", {seconds / baseline:.3f}x the first" if baseline else ""
    print(f"\n[{variant or 'baseline'}] {seconds * 1e3:.3f} ms{ratio} (MFU "
          f"{100 * model_flops / (seconds * peak):.1f}%; the compiler's FLOPs "
          f"{flops / model_flops:.3f}x the model's; compiled in "
          f"{time.perf_counter() - start:.0f} s)")  # fmt: skip
    profile = cycle_report(compiled.as_text(), FLAGS.top)
    print("  cycles (collectives carry none): " + ", ".join(
        f"{k} {100 * v:.1f}%" for k, v in profile["cycle_kinds"].items() if v >= 0.005))  # fmt: skip
    for row in profile["cycle_top"]:
        print(f"  {100 * row['share']:5.1f}%  {row['where']} ({row['kind']}, {row['direction']})")
    return seconds


def main() -> None:
    print("compiler estimates (libtpu's cost model), not measurements")
    devices, chip, chips = topology_devices(FLAGS.topology, 1)
    peak = per_device(chip, len(devices), chips)[1]
    print(f"{FLAGS.config}: {FLAGS.blocks} unrolled blocks on {FLAGS.topology} "
          f"({len(devices)} devices), global batch {FLAGS.global_batch}")  # fmt: skip
    baseline = None
    for variant in FLAGS.variant:
        seconds = _variant(variant, devices, peak, baseline)
        baseline = baseline or seconds
