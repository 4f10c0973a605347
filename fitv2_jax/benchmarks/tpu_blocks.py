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

What a part of the block costs in the estimate, by leaving it out (`--ablate`, repeatable: one
more row each, the first variant without those parts; a measuring device, not a model):

    python -m fitv2_jax.bench --suite tpu_blocks --config configs/fitv2_xl.py --blocks 36 \
        --ablate norms,modulation,gates,adaln

  norms       every `Norm` of models.fit an identity (the blocks' two LayerNorms, the final one)
  modulation  `modulate(x, shift, scale)` returns x
  gates       the residual branches' gates are 1 (`x + h`)
  adaln       the blocks' and final layer's adaLN(-LoRA) modulations are zeros (no matmuls);
              the shared global adaLN stays
Why: the estimate is not the sum of the ops' `estimated_cycles` the profile lists (a 7 MB
relayout copy beside a matmul, v5p: 103k cycles, 8 us more in the estimate; 4 unrolled XL
blocks without their modulation estimate slower), so a part's price is read by difference.
Differences are not additive: XLA fuses what is left differently.
"""

from __future__ import annotations

import contextlib
import shlex
import time
from unittest import mock

import jax.numpy as jnp
from absl import flags

from fitv2_jax.config.files import load_config
from fitv2_jax.models import fit
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
    flags.DEFINE_multi_string("ablate", [], "comma-separated parts left out of the first "
                              f"variant, one more row per flag: {', '.join(ABLATIONS)} "
                              "(module doc)", module_name=m)  # fmt: skip


def _identity_norm(*args, **kwargs):
    return lambda x: x


def _zero_modulation(hidden_size, chunks, *args, **kwargs):
    return lambda c: jnp.zeros((*c.shape[:-1], chunks * hidden_size), c.dtype)


# part -> (name in models.fit, its stand-in)
ABLATIONS = {
    "norms": ("Norm", _identity_norm),
    "modulation": ("modulate", lambda x, shift, scale: x),
    "gates": ("per_token", lambda gate: 1.0),
    "adaln": ("Modulation", _zero_modulation),
}


def ablation_parts(text: str) -> tuple[str, ...]:
    """The parts an `--ablate` value names ("norms,gates"), checked against `ABLATIONS`."""
    parts = tuple(text.split(",")) if text else ()
    unknown = sorted(set(parts) - set(ABLATIONS))
    if unknown:
        raise ValueError(f"--ablate {','.join(unknown)}: expected some of {', '.join(ABLATIONS)}")
    return parts


@contextlib.contextmanager
def ablated(parts: list[str]):
    """models.fit with these parts (`ABLATIONS`) replaced by their stand-ins, while traced."""
    with contextlib.ExitStack() as stack:
        for part in ablation_parts(",".join(parts)):
            stack.enter_context(mock.patch.object(fit, *ABLATIONS[part]))
        yield


def blocks_config(path: str, blocks: int, variant: str):
    """The config with `blocks` unrolled blocks, no remat, then the variant's overrides."""
    base = [f"model.depth={blocks}", f"model.scan_unroll={blocks}", "model.remat_policy=none"]
    return load_config(path, base + shlex.split(variant))


def _variant(variant: str, devices, peak: float, baseline: float | None,
             ablate: tuple[str, ...] = ()) -> float:  # fmt: skip
    config = blocks_config(FLAGS.config, FLAGS.blocks, variant)
    mesh = create_mesh(config.mesh.ici, config.mesh.dcn, devices=devices)
    start = time.perf_counter()
    with ablated(list(ablate)):
        compiled = compile_step(config, FLAGS.global_batch, mesh, ESTIMATE_OPTIONS)[1]
    flops, seconds = program_cost(compiled)
    tokens = int(config.model.context_size)
    model_flops = train_step_flops(
        config.model, FLAGS.global_batch, tokens, config.train.trainable
    ) / len(devices)
    ratio = f", {seconds / baseline:.3f}x the first" if baseline else ""
    name = (variant or "baseline") + (f", without {', '.join(ablate)}" if ablate else "")
    print(f"\n[{name}] {seconds * 1e3:.3f} ms{ratio} (MFU "
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
    # a misspelt part fails now, not after the first compile
    ablations = [ablation_parts(text) for text in FLAGS.ablate]
    print("compiler estimates (libtpu's cost model), not measurements")
    devices, chip, chips = topology_devices(FLAGS.topology, 1)
    peak = per_device(chip, len(devices), chips)[1]
    print(f"{FLAGS.config}: {FLAGS.blocks} unrolled blocks on {FLAGS.topology} "
          f"({len(devices)} devices), global batch {FLAGS.global_batch}")  # fmt: skip
    baseline = None
    for variant in FLAGS.variant:
        seconds = _variant(variant, devices, peak, baseline)
        baseline = baseline or seconds
    for parts in ablations:  # the model's FLOPs stay the MFU's numerator
        _variant(FLAGS.variant[0], devices, peak, baseline, parts)
