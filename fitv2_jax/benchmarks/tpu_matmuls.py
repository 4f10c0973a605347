r"""The MFU ceiling of a train step on a TPU slice: every matmul of the step, traced at the
per-chip batch and priced alone by the TPU compiler (libtpu, no TPU needed; about 20 s a row).

    python -m fitv2_jax.bench --suite tpu_matmuls --configs configs/fitv2_xl.py \
        --topologies v5p-64 --global_batch 256,1024

FSDP and data parallelism give every chip global_batch / chips images and the whole of every
weight (gathered), so a chip's matmuls are those of the step traced for that many images on one
device. They are summed per step (scans by their trip count, recomputed blocks again) and set
against the model's FLOPs (`models.summary.train_step_flops`): with the linear layers alone the
MFU is at most model FLOPs / (their seconds x the chip's bf16 peak); the attention maps' batched
dots are printed apart (priced alone they are dearer than inside the compiled step, which fuses
them with the softmax). Also printed: the step time a target MFU needs, and what is left of it
beside the linear layers. Compare with the whole step's estimate (`bench --suite tpu` or
`train --dry_run --topology T`). Compiler estimates, not measurements (fitv2_jax/parallel/cost.py).
"""

from __future__ import annotations

import os

import jax
from absl import flags

from fitv2_jax.config.files import load_config
from fitv2_jax.models.summary import train_step_flops
from fitv2_jax.parallel.matmuls import price_dots, traced_dots
from fitv2_jax.parallel.mesh import create_mesh
from fitv2_jax.parallel.topology import per_device, topology_devices
from fitv2_jax.training.setup import build_setup
from fitv2_jax.utils.errors import UserError

FLAGS = flags.FLAGS


def define_flags(module_name: str) -> None:
    m = module_name
    flags.DEFINE_list("configs", ["configs/fitv2_xl.py"], "config files", module_name=m)
    flags.DEFINE_list("topologies", ["v5p-64"], "TPU slices (see train --topology)",
                      module_name=m)  # fmt: skip
    flags.DEFINE_list("global_batch", ["256"], "global batch sizes", module_name=m)
    flags.DEFINE_list("remat", ["config"], "remat policies ('config': the config's own)",
                      module_name=m)  # fmt: skip
    flags.DEFINE_float("target_mfu", 0.5, "the MFU whose step time is printed", module_name=m)
    flags.DEFINE_integer("top", 8, "distinct matmuls listed per row", module_name=m)


def step_dots(config, batch_per_chip: int):
    """{Dot: calls} of the train step for `batch_per_chip` images on one (CPU) device: traced,
    not compiled; XLA attention, so the attention maps are dots too."""
    config.model.attention_backend = "xla"
    mesh = create_mesh((1, 1, 1), devices=jax.devices("cpu")[:1])
    setup = build_setup(config, batch_per_chip, mesh=mesh)
    with setup.context():
        abstract = (setup.abstract_state_sharded(), setup.abstract_batch())
        return traced_dots(jax.make_jaxpr(setup.step)(*abstract))


def _row(config_path: str, topology: str, global_batch: int, remat: str) -> None:
    config = load_config(config_path)
    if remat != "config":
        config.model.remat_policy = remat
    devices, chip, chips = topology_devices(topology, 1)
    if global_batch % len(devices):
        raise UserError(f"--global_batch {global_batch} is not a multiple of {topology}'s "
                        f"{len(devices)} chips")  # fmt: skip
    per_chip, tokens = global_batch // len(devices), int(config.model.context_size)
    priced = price_dots(step_dots(config, per_chip), devices[0])
    peak = per_device(chip, len(devices), chips)[1]
    model_flops = train_step_flops(
        config.model, global_batch, tokens, config.train.trainable
    ) / len(devices)
    name = os.path.basename(config_path).removesuffix(".py")
    print(
        f"\n{name} on {topology} ({len(devices)} chips, {peak / 1e12:.0f} TFLOP/s bf16 each), "
        f"global batch {global_batch} = {per_chip} per chip x {tokens} tokens, remat "
        f"{config.model.remat_policy}: model {model_flops / 1e12:.3f} TFLOP per chip per step"
    )
    print(f"  {'calls':>5}  {'lhs x rhs':<44}{'ms/step':>9}{'% of peak':>11}")
    for p in priced[: FLAGS.top]:
        shapes = f"{p.dot.lhs_shape} x {p.dot.rhs_shape}"
        print(f"  {p.calls:>5}  {shapes:<44}{p.total_seconds * 1e3:>9.3f}"
              f"{100 * p.dot.flops / (p.seconds * peak):>10.0f}%")  # fmt: skip
    linear = [p for p in priced if not p.dot.batched]
    seconds = sum(p.total_seconds for p in linear)
    flops = sum(p.calls * p.dot.flops for p in linear)
    batched = sum(p.total_seconds for p in priced if p.dot.batched)
    target = model_flops / (FLAGS.target_mfu * peak)
    print(
        f"  linear layers: {seconds * 1e3:.2f} ms a step at {100 * flops / (seconds * peak):.1f}%"
        f" of the peak, so an MFU of at most {100 * model_flops / (seconds * peak):.1f}%"
    )
    print(f"  batched dots (attention maps), priced alone: {batched * 1e3:.2f} ms")
    left = (f"{(target - seconds) * 1e3:.2f} ms beside the linear layers" if target > seconds
            else "out of reach, the linear layers alone take longer")  # fmt: skip
    print(f"  {100 * FLAGS.target_mfu:.0f}% MFU is a step of {target * 1e3:.2f} ms: {left}")


def main() -> None:
    print("compiler estimates (libtpu's cost model), not measurements")
    for c in FLAGS.configs:
        for t in FLAGS.topologies:
            for b in FLAGS.global_batch:
                for r in FLAGS.remat:
                    _row(c, t, int(b), r)
