r"""Train-step throughput: step time, tokens/s and MFU against an in-process matmul peak, on one
device and sharded data x fsdp over fake CPU devices, measured side by side.

    python -m fitv2_jax.bench --suite train --configs configs/tiny.py,configs/fitv2_b.py \
        --batch_size 8 --tokens 256 --devices 1,8

Each (config, device count) runs in its own process (the fake-device count must be set before jax
starts: the child gets JAX_NUM_CPU_DEVICES and JAX_PLATFORMS=cpu) on the same synthetic
full-length batch; the table gives medians and the ratio to the one-device step. The step is
training's own (`fitv2_jax.training.setup.build_setup`: optimizer, shardings, donated state).
Fake CPU devices share the same cores, so on a small machine sharding can only cost
(collectives, smaller matmuls): the ratio measures that overhead, not a speed-up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
from absl import flags

from fitv2_jax.benchmarks.model import DTYPES, square_inputs
from fitv2_jax.cli import flags as cli
from fitv2_jax.config.files import load_config
from fitv2_jax.models.summary import summarize, train_step_flops
from fitv2_jax.parallel.mesh import create_mesh
from fitv2_jax.training.setup import build_setup
from fitv2_jax.utils.errors import UserError
from fitv2_jax.utils.timing import matmul_peak_flops, median_seconds

FLAGS = flags.FLAGS


def define_flags(module_name: str) -> None:
    m = module_name
    flags.DEFINE_list("configs", ["configs/tiny.py", "configs/fitv2_b.py"],
                      "comma-separated config files", module_name=m)  # fmt: skip
    flags.DEFINE_integer("batch_size", 8, "global batch (a multiple of every device count)",
                         module_name=m)  # fmt: skip
    flags.DEFINE_integer("tokens", 256, "tokens per image", module_name=m)
    flags.DEFINE_list("devices", ["1", "8"], "fake CPU device counts to compare", module_name=m)
    flags.DEFINE_enum("dtype", "float32", DTYPES, "compute dtype", module_name=m)
    flags.DEFINE_integer("repeats", 5, "timed steps, median reported", module_name=m)
    # The child process of one (config, device count); kept out of --help.
    flags.DEFINE_bool("worker", False, "internal: time one config on this process's devices",
                      module_name=__name__)  # fmt: skip
    cli.define_renamed("batch", "batch_size")


def worker(config_path: str) -> dict:
    """Times training's jitted step on all devices of this process (data x fsdp mesh)."""
    config = load_config(config_path)
    config.model.dtype = FLAGS.dtype
    n, b = jax.device_count(), FLAGS.batch_size
    mesh = create_mesh((2 if n % 2 == 0 and n > 1 else 1, -1, 1))
    setup = build_setup(config, global_batch=b, mesh=mesh)
    state = setup.init_state(jax.random.key(0))
    inp = square_inputs(setup.model, b, FLAGS.tokens)
    tokens = int(inp["x"].shape[1])
    shapes = setup.abstract_batch(tokens)
    batch = {k: jax.device_put(v, shapes[k].sharding) for k, v in inp.items() if k in shapes}
    losses = []

    def step():  # the state is donated: each step takes the previous one's
        nonlocal state
        state, metrics = setup.step(state, batch)
        losses.append(metrics["loss"])
        return metrics["loss"]

    with setup.context():
        seconds = median_seconds(step, repeats=FLAGS.repeats)
    s = summarize(config.model, tokens=tokens)
    flops = train_step_flops(config.model, b, tokens, config.train.trainable)
    peak = matmul_peak_flops(2048, repeats=7)
    return dict(
        config=config_path, devices=n, mesh=dict(mesh.shape), batch=b, tokens=tokens,
        step_ms=1e3 * seconds, tokens_per_s=b * tokens / seconds,
        gflops_per_s=flops / seconds / 1e9, peak_gflops=peak / 1e9, mfu=flops / seconds / peak,
        params_m=s["total_params"] / 1e6, dtype=FLAGS.dtype,
        loss_finite=bool(np.isfinite(float(losses[-1]))),
    )  # fmt: skip


def run_worker(config: str, n: int) -> dict | None:
    """worker() in a fresh process with n fake CPU devices; None (and its stderr) if it fails."""
    env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(n), JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "fitv2_jax.bench", "--suite", "train", "--worker",
           "--configs", config, "--devices", str(n), "--batch_size", str(FLAGS.batch_size),
           "--tokens", str(FLAGS.tokens), "--dtype", FLAGS.dtype,
           "--repeats", str(FLAGS.repeats)]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if not line:
        print(f"{config} on {n} devices failed:\n{out.stderr[-2000:]}", flush=True)
        return None
    return json.loads(line[0][len("RESULT ") :])


def _device_counts() -> list[int]:
    try:
        counts = [int(d) for d in FLAGS.devices]
    except ValueError as e:
        raise UserError(f"--devices {','.join(FLAGS.devices)}: give integers, e.g. 1,8") from e
    bad = [n for n in counts if n < 1 or FLAGS.batch_size % n]
    if bad:
        raise UserError(f"--batch_size {FLAGS.batch_size} is not a positive multiple of the "
                        f"device counts {bad} (the batch is split over all devices)")  # fmt: skip
    return counts


def main() -> None:
    if min(FLAGS.batch_size, FLAGS.tokens, FLAGS.repeats) < 1:
        raise UserError("--batch_size, --tokens and --repeats must be >= 1")
    counts = _device_counts()
    if FLAGS.worker:
        if len(FLAGS.configs) != 1 or counts != [jax.device_count()]:
            raise UserError(f"--worker times one config on this process's "
                            f"{jax.device_count()} devices")  # fmt: skip
        print("RESULT " + json.dumps(worker(FLAGS.configs[0])), flush=True)
        return
    rows = []
    for config in FLAGS.configs:
        for n in counts:
            r = run_worker(config, n)
            if r is None:
                continue
            rows.append(r)
            print(f"{r['config']:<22} {r['devices']} dev {str(r['mesh']):<40} step "
                  f"{r['step_ms']:9.1f} ms  {r['tokens_per_s']:9.0f} tok/s  "
                  f"{r['gflops_per_s']:7.1f} GFLOP/s  MFU {r['mfu']:6.1%} "
                  f"(peak {r['peak_gflops']:.0f} GFLOP/s)", flush=True)  # fmt: skip
    base = {r["config"]: r["step_ms"] for r in rows if r["devices"] == 1}
    for r in rows:
        if r["devices"] > 1 and r["config"] in base:
            print(f"{r['config']}: {r['devices']} fake devices / 1 device step time = "
                  f"{r['step_ms'] / base[r['config']]:.2f}x")  # fmt: skip
