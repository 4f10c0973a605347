"""Sampling throughput: `python -m fitv2_jax.bench --suite sample [--configs ... --steps 10]`.

For each config (default configs/tiny.py and configs/fitv2_b.py, random weights: speed does not
depend on their values) at 256 tokens (a 16 x 16 patch grid, i.e. 256 x 256 pixels for the
latent configs), with classifier-free guidance on (one model call on the doubled batch per
velocity evaluation), reports the median over repeats (compilation excluded) of
  - velocity evaluations per second (one evaluation = the guided velocity of the whole batch),
  - images per second of a whole Euler solve of --steps steps (--steps evaluations per image),
and the images/s that the evaluation rate implies at the official 250 evaluations per image.
"""

import functools
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from tqdm import tqdm

from fitv2_jax.cli import flags as cli
from fitv2_jax.config.files import load_config
from fitv2_jax.data.tokens import make_grid
from fitv2_jax.flow import guidance, solvers
from fitv2_jax.models.build import build_model
from fitv2_jax.utils.errors import UserError
from fitv2_jax.utils.files import write_json_atomic

FLAGS = flags.FLAGS


def define_flags(module_name: str) -> None:
    m = module_name
    flags.DEFINE_list("configs", ["configs/tiny.py", "configs/fitv2_b.py"],
                      "comma-separated config files (run from the repo root)",
                      module_name=m)  # fmt: skip
    flags.DEFINE_integer("batch_size", 2, "images per batch", module_name=m)
    flags.DEFINE_integer("side", 16, "patch grid side (16 -> 256 tokens)", module_name=m)
    flags.DEFINE_integer("steps", 10, "Euler steps per image", module_name=m)
    flags.DEFINE_float("cfg_scale", 1.5, "guidance scale (> 1 = on)", module_name=m)
    flags.DEFINE_integer("repeats", 3, "timed runs, median reported", module_name=m)
    flags.DEFINE_string("out", None, "also write the results to this JSON file", module_name=m)
    for old, new in (("batch", "batch_size"), ("cfg-scale", "cfg_scale"), ("json", "out")):
        cli.define_renamed(old, new)


def _median_seconds(fn, repeats: int, desc: str) -> float:
    jax.block_until_ready(fn())  # compile + warm up
    times = []
    for _ in tqdm(range(repeats), desc=desc, leave=False):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_config(path: str) -> dict:
    mcfg = load_config(path).model
    model = build_model(mcfg)
    p, c = mcfg.patch_size, mcfg.in_channels
    h = w = FLAGS.side
    n = h * w
    b = FLAGS.batch_size
    grid = jnp.broadcast_to(jnp.asarray(make_grid(h, w)), (b, 2, n))
    mask = jnp.ones((b, n), jnp.float32)
    y = jax.random.randint(jax.random.key(1), (b,), 0, mcfg.num_classes)
    z = jax.random.normal(jax.random.key(2), (b, n, p * p * c), jnp.float32)
    t = jnp.full((b,), 0.5, jnp.float32)
    params = jax.jit(functools.partial(model.init, train=False))(
        jax.random.key(0), z, t, y, grid, mask
    )["params"]

    def velocity_fn(params):
        apply = lambda x, t, y, g, m, s: model.apply({"params": params}, x, t, y, g, m, size=s)
        return guidance.make_velocity_fn(
            apply,
            y,
            grid,
            mask,
            cfg_scale=FLAGS.cfg_scale,
            null_label=mcfg.num_classes,
            patch_size=p,
            in_channels=c,
            learn_sigma=mcfg.learn_sigma,
        )

    # params are jit arguments, not closed-over constants (no 0.5 GB constants in the program)
    one_eval = jax.jit(lambda prm, x, t: velocity_fn(prm)(x, t))
    solve = jax.jit(lambda prm, x: solvers.euler(velocity_fn(prm), x, FLAGS.steps)[0])
    name = os.path.basename(path).removesuffix(".py")
    sec_eval = _median_seconds(lambda: one_eval(params, z, t), FLAGS.repeats, f"{name} eval")
    sec_solve = _median_seconds(lambda: solve(params, z), FLAGS.repeats, f"{name} solve")
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    return {
        "config": path,
        "params_M": n_params / 1e6,
        "tokens": n,
        "batch": b,
        "cfg_scale": FLAGS.cfg_scale,
        "evals_per_s": 1.0 / sec_eval,
        "euler_steps": FLAGS.steps,
        "images_per_s": b / sec_solve,
        "images_per_s_at_250_evals": b / (250 * sec_eval),
    }


def main() -> None:
    if min(FLAGS.batch_size, FLAGS.side, FLAGS.steps, FLAGS.repeats) < 1:
        raise UserError("--batch_size, --side, --steps and --repeats must be >= 1")
    results = []
    for path in FLAGS.configs:
        r = bench_config(path.strip())
        results.append(r)
        print(
            f"sample {r['config']} ({r['params_M']:.1f}M params) {r['tokens']} tokens batch "
            f"{r['batch']} cfg {r['cfg_scale']}, median of {FLAGS.repeats}: "
            f"{r['evals_per_s']:.3f} guided evals/s, {r['images_per_s']:.4f} images/s with "
            f"{r['euler_steps']} Euler steps ({r['images_per_s_at_250_evals']:.5f} at 250 evals)",
            flush=True,
        )
    if FLAGS.out:
        write_json_atomic(FLAGS.out, results, indent=2)
        print(f"results written to {FLAGS.out}")
    else:
        print("done (pass --out FILE to keep the numbers)")
