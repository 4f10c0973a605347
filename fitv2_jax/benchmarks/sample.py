"""Sampling throughput: `python -m fitv2_jax.bench --suite sample [--configs ... --steps 10]`.

For each config (default configs/tiny.py and configs/fitv2_b.py, random weights: speed does not
depend on their values) at 256 tokens (a 16 x 16 patch grid, i.e. 256 x 256 pixels for the
latent configs), with classifier-free guidance on (one model call on the doubled batch per
velocity evaluation), reports the median over repeats (compilation excluded) of
  - velocity evaluations per second (one evaluation = the guided velocity of the whole batch),
  - images per second of a whole Euler solve of --steps steps (--steps evaluations per image),
and the images/s that the evaluation rate implies at the official 250 evaluations per image.
"""

import argparse
import functools
import importlib.util
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from fitv2_jax.data.tokens import make_grid
from fitv2_jax.flow import guidance, solvers
from fitv2_jax.models.fit import FiT

DEFAULT_CONFIGS = "configs/tiny.py,configs/fitv2_b.py"


def load_config(path: str):
    if not os.path.isfile(path):
        raise SystemExit(f"--configs: no such config file {path!r} (run from the repo root)")
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _median_seconds(fn, repeats: int, desc: str) -> float:
    jax.block_until_ready(fn())  # compile + warm up
    times = []
    for _ in tqdm(range(repeats), desc=desc, leave=False):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_config(path: str, args) -> dict:
    mcfg = load_config(path).model
    model = FiT(**mcfg)
    p, c = mcfg.patch_size, mcfg.in_channels
    h = w = args.side
    n = h * w
    b = args.batch
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
            cfg_scale=args.cfg_scale,
            null_label=mcfg.num_classes,
            patch_size=p,
            in_channels=c,
            learn_sigma=mcfg.learn_sigma,
        )

    # params are jit arguments, not closed-over constants (no 0.5 GB constants in the program)
    one_eval = jax.jit(lambda prm, x, t: velocity_fn(prm)(x, t))
    solve = jax.jit(lambda prm, x: solvers.euler(velocity_fn(prm), x, args.steps)[0])
    name = os.path.basename(path)[:-3]
    sec_eval = _median_seconds(lambda: one_eval(params, z, t), args.repeats, f"{name} eval")
    sec_solve = _median_seconds(lambda: solve(params, z), args.repeats, f"{name} solve")
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    return {
        "config": path,
        "params_M": n_params / 1e6,
        "tokens": n,
        "batch": b,
        "cfg_scale": args.cfg_scale,
        "evals_per_s": 1.0 / sec_eval,
        "euler_steps": args.steps,
        "images_per_s": b / sec_solve,
        "images_per_s_at_250_evals": b / (250 * sec_eval),
    }


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m fitv2_jax.bench --suite sample",
        description="Velocity evaluations/s and images/s of FiT sampling with CFG (random "
        "weights) at 256 tokens. Run from the repo root.",
    )
    parser.add_argument(
        "--configs", default=DEFAULT_CONFIGS, help=f"comma-separated files ({DEFAULT_CONFIGS})"
    )
    parser.add_argument("--batch", type=int, default=2, help="images per batch (default 2)")
    parser.add_argument("--side", type=int, default=16, help="patch grid side (16 -> 256 tokens)")
    parser.add_argument("--steps", type=int, default=10, help="Euler steps per image (10)")
    parser.add_argument("--cfg-scale", type=float, default=1.5, help="guidance (1.5; > 1 = on)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs, median reported")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if min(args.batch, args.side, args.steps, args.repeats) < 1:
        parser.error("--batch, --side, --steps and --repeats must be >= 1")
    results = []
    for path in args.configs.split(","):
        r = bench_config(path.strip(), args)
        results.append(r)
        print(
            f"sample {r['config']} ({r['params_M']:.1f}M params) {r['tokens']} tokens batch "
            f"{r['batch']} cfg {r['cfg_scale']}, median of {args.repeats}: "
            f"{r['evals_per_s']:.3f} guided evals/s, {r['images_per_s']:.4f} images/s with "
            f"{r['euler_steps']} Euler steps ({r['images_per_s_at_250_evals']:.5f} at 250 evals)",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"results written to {args.json}")
    else:
        print("done (pass --json FILE to keep the numbers)")
