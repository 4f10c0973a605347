r"""Sampling and FID feature extraction compiled for a TPU slice (libtpu, no TPU needed): per-chip
memory, and the compiler's estimated time of one guided velocity evaluation (the model on the
CFG-doubled batch) and of one Inception batch, turned into images/s for a 50K-sample FID.

    python -m fitv2_jax.bench --suite tpu_sample --topology v5p-8 --nfe 150 \
        --sizes configs/fitv2_xl.py:256x256,configs/fitv2_hr_xl.py:512x512

Sampling runs data-parallel (params replicated, batch over every chip: `inference_mesh`), the
way `sample` and `evaluate` run. images/s = chips x batch / (nfe x evaluation seconds + Inception
seconds per batch); `--nfe` is dopri5's evaluations per sample, which depends on the weights:
measure it with your checkpoint (`sample` and `evaluate` print NFE per batch) and pass it here.
Estimates are the compiler's cost model (fitv2_jax/parallel/cost.py), not measurements.
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
from absl import flags
from jax.sharding import NamedSharding, PartitionSpec

from fitv2_jax.config.files import load_config
from fitv2_jax.flow.guidance import cfg_velocity
from fitv2_jax.models.build import abstract_params
from fitv2_jax.models.inception import InceptionV3, preprocess
from fitv2_jax.parallel.cost import ESTIMATE_OPTIONS, configured_cost, program_cost
from fitv2_jax.parallel.mesh import create_mesh
from fitv2_jax.parallel.topology import per_device, topology_devices
from fitv2_jax.sampling.rules import model_for_size, resolve_rule
from fitv2_jax.training.dry_run import peak_bytes
from fitv2_jax.utils.errors import UserError

FLAGS = flags.FLAGS
GIB = 2.0**30


def define_flags(module_name: str) -> None:
    m = module_name
    flags.DEFINE_string("topology", "v5p-8", "TPU slice (see train --topology)", module_name=m)
    flags.DEFINE_list("sizes", ["configs/fitv2_xl.py:256x256", "configs/fitv2_hr_xl.py:512x512"],
                      "CONFIG:HxW image sizes", module_name=m)  # fmt: skip
    flags.DEFINE_integer("batch_per_chip", 32, "samples per chip per call", module_name=m)
    flags.DEFINE_float("cfg_scale", 1.5, "guidance scale (> 1: the doubled batch)", module_name=m)
    flags.DEFINE_integer("nfe", None, "dopri5 evaluations per sample, measured with your "
                         "weights; without it only per-evaluation figures", module_name=m)  # fmt: skip


def _sharded(tree, mesh, spec_of):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                        sharding=NamedSharding(mesh, spec_of(a))), tree)  # fmt: skip


def velocity_cost(config, h: int, w: int, mesh, batch: int):
    """(memory analysis of the real program, estimated seconds) of one guided evaluation."""
    vae_factor, p = (8 if config.get("latent", True) else 1), int(config.model.patch_size)
    gh, gw = h // vae_factor // p, w // vae_factor // p
    n, c = gh * gw, p * p * int(config.model.in_channels)
    rule = resolve_rule("auto", config.model, gh, gw)
    replicated, rows = (lambda a: PartitionSpec()), (lambda a: PartitionSpec("data"))
    args = dict(x=((batch, n, c), jnp.float32), t=((batch,), jnp.float32),
                y=((batch,), jnp.int32), grid=((batch, 2, n), jnp.int32),
                mask=((batch, n), jnp.float32), size=((batch, 2), jnp.int32))  # fmt: skip
    inputs = _sharded({k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in args.items()}, mesh, rows)

    def compiled(unroll, options=None):
        cfg = copy.deepcopy(config.model)
        cfg.scan_unroll = unroll
        model = model_for_size(cfg, gh, gw, rule)
        params = _sharded(abstract_params(cfg), mesh, replicated)

        def evaluate(params, a):
            apply = lambda *xs: model.apply({"params": params}, *xs)
            return cfg_velocity(apply, a["x"], a["t"], a["y"], a["grid"], a["mask"], a["size"],
                                cfg_scale=FLAGS.cfg_scale, null_label=int(cfg.num_classes),
                                patch_size=p, in_channels=int(cfg.in_channels),
                                learn_sigma=bool(cfg.learn_sigma))  # fmt: skip

        with jax.set_mesh(mesh):
            return jax.jit(evaluate).lower(params, inputs).compile(compiler_options=options)

    unroll, depth = int(config.model.get("scan_unroll", 1)), int(config.model.depth)
    memory = compiled(unroll).memory_analysis()
    _, seconds = configured_cost(lambda u: compiled(u, ESTIMATE_OPTIONS), depth, unroll)
    return memory, seconds


def inception_cost(h: int, w: int, mesh, batch: int):
    net = InceptionV3(with_logits=True)
    images = jax.ShapeDtypeStruct((batch, h, w, 3), jnp.uint8,
                                  sharding=NamedSharding(mesh, PartitionSpec("data")))  # fmt: skip
    params = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros((1, 299, 299, 3))))
    params = _sharded(params["params"], mesh, lambda a: PartitionSpec())
    with jax.set_mesh(mesh):
        c = jax.jit(lambda p, x: net.apply({"params": p}, preprocess(x))).lower(params, images)
        c = c.compile()
    return c.memory_analysis(), program_cost(c)[1]


def main() -> None:
    devices, chip, chips = topology_devices(FLAGS.topology)
    mesh = create_mesh((-1, 1, 1), devices=devices)
    hbm, _ = per_device(chip, len(devices), chips)
    batch = FLAGS.batch_per_chip * len(devices)
    print(f"{FLAGS.topology}: {len(devices)} devices, {FLAGS.batch_per_chip} samples per chip, "
          f"cfg {FLAGS.cfg_scale}, HBM {hbm / GIB:.0f} GiB per chip (compiler estimates)")  # fmt: skip
    print("| config | size | velocity eval | peak / chip | Inception batch | peak / chip | "
          "images/s (50K FID: minutes) |\n|---|---|---|---|---|---|---|")  # fmt: skip
    for item in FLAGS.sizes:
        path, _, size = item.partition(":")
        try:
            h, w = (int(v) for v in size.lower().split("x"))
        except ValueError as e:
            raise UserError(f"--sizes {item!r}: expected CONFIG:HxW") from e
        config = load_config(path)
        vmem, vel = velocity_cost(config, h, w, mesh, batch)
        imem, inc = inception_cost(h, w, mesh, batch)
        rate = "-"
        if FLAGS.nfe:
            per_batch = FLAGS.nfe * vel + inc
            ips = batch / per_batch
            rate = f"{ips:.0f} ({50_000 / ips / 60:.1f} min)"
        name = path.rsplit("/", 1)[-1].removesuffix(".py")
        print(f"| {name} | {h}x{w} | {vel * 1e3:.1f} ms | {peak_bytes(vmem) / GIB:.1f} GiB | "
              f"{inc * 1e3:.1f} ms | {peak_bytes(imem) / GIB:.1f} GiB | {rate} |", flush=True)  # fmt: skip
