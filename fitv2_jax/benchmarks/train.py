"""Train-step throughput: step time, tokens/s and MFU against an in-process matmul peak, on one
device and sharded data x fsdp over fake CPU devices, measured side by side.

    python -m fitv2_jax.bench --suite train --configs configs/tiny.py,configs/fitv2_b.py \
        --batch 8 --tokens 256 --devices 1,8

Each (config, device count) runs in its own process (the fake-device count must be set before jax
starts) on the same synthetic full-length batch; the table gives medians and the ratio to the
one-device step. Fake CPU devices share the same 2 cores, so on this machine sharding can only
cost (collectives, smaller matmuls): the ratio measures that overhead, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def worker(args) -> dict:
    import flax.linen as nn
    import jax
    import numpy as np

    from fitv2_jax.benchmarks.model import square_inputs
    from fitv2_jax.benchmarks.timing import matmul_peak_flops, median_seconds
    from fitv2_jax.config_file import load_config
    from fitv2_jax.models.fit import FiT
    from fitv2_jax.models.summary import summarize
    from fitv2_jax.parallel.mesh import create_mesh
    from fitv2_jax.parallel.rules import LOGICAL_RULES, batch_sharding
    from fitv2_jax.training.state import init_state, make_optimizer, state_shardings
    from fitv2_jax.training.step import make_train_step

    config = load_config(args.config)
    config.model.dtype = args.dtype
    n = jax.device_count()
    mesh = create_mesh((2 if n % 2 == 0 and n > 1 else 1, -1, 1))
    model = FiT(**config.model)
    tx_factory = lambda p: make_optimizer(config.train, args.batch, p)
    abstract, shardings = state_shardings(model, tx_factory, mesh)
    tx = tx_factory(abstract.params)
    state = jax.jit(lambda k: init_state(model, tx_factory, k), out_shardings=shardings)(
        jax.random.key(0)
    )
    inp = square_inputs(model, args.batch, args.tokens)
    batch = {k: jax.device_put(v, batch_sharding(mesh, v.ndim)) for k, v in inp.items()}
    step = jax.jit(
        make_train_step(model, config, tx),
        in_shardings=(shardings, None),
        out_shardings=(shardings, None),
    )

    def run(state, batch):
        with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
            return step(state, batch)[1]["loss"]

    seconds = median_seconds(run, state, batch, repeats=args.repeats)
    s = summarize(config.model, tokens=inp["x"].shape[1])
    flops = 6.0 * (s["total_gmacs"] + s["attention_map_gmacs"]) * 1e9 * args.batch
    peak = matmul_peak_flops(2048, repeats=7)
    return dict(
        config=args.config, devices=n, mesh=dict(mesh.shape), batch=args.batch, tokens=int(inp["x"].shape[1]),
        step_ms=1e3 * seconds, tokens_per_s=args.batch * inp["x"].shape[1] / seconds,
        gflops_per_s=flops / seconds / 1e9, peak_gflops=peak / 1e9, mfu=flops / seconds / peak,
        params_m=s["total_params"] / 1e6, dtype=args.dtype, loss_finite=bool(np.isfinite(float(run(state, batch)))),
    )  # fmt: skip


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m fitv2_jax.bench --suite train")
    parser.add_argument("--configs", default="configs/tiny.py,configs/fitv2_b.py")
    parser.add_argument("--config", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--devices", default="1,8", help="fake CPU device counts to compare")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return

    rows = []
    for config in args.configs.split(","):
        for n in [int(d) for d in args.devices.split(",")]:
            env = dict(
                os.environ,
                XLA_FLAGS=f"--xla_force_host_platform_device_count={n}",
                JAX_PLATFORMS="cpu",
            )
            cmd = [sys.executable, "-m", "fitv2_jax.benchmarks.train", "--worker", "--config", config,
                   "--batch", str(args.batch), "--tokens", str(args.tokens), "--dtype", args.dtype,
                   "--repeats", str(args.repeats)]  # fmt: skip
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if not line:
                print(f"{config} on {n} devices failed:\n{out.stderr[-2000:]}")
                continue
            rows.append(json.loads(line[0][7:]))
            r = rows[-1]
            print(f"{r['config']:<22} {r['devices']} dev {str(r['mesh']):<40} step {r['step_ms']:9.1f} ms  "
                  f"{r['tokens_per_s']:9.0f} tok/s  {r['gflops_per_s']:7.1f} GFLOP/s  MFU {r['mfu']:6.1%} "
                  f"(peak {r['peak_gflops']:.0f} GFLOP/s)", flush=True)  # fmt: skip
    base = {r["config"]: r["step_ms"] for r in rows if r["devices"] == 1}
    for r in rows:
        if r["devices"] > 1 and r["config"] in base:
            print(
                f"{r['config']}: {r['devices']} fake devices / 1 device step time = {r['step_ms'] / base[r['config']]:.2f}x"
            )


if __name__ == "__main__":
    main(sys.argv[1:])
