r"""Ours against the official PyTorch FiT on this machine: forward, train step and guided velocity
evaluation on the same shapes, interleaved round by round, medians and the speed ratio.

    python -m fitv2_jax.bench --suite versus --config configs/fitv2_b.py --batch_size 8 \
        --tokens 256 --official_src /path/to/FiT --rounds 2 --remat_policy projections
    python -m fitv2_jax.bench --suite versus --config configs/demo_cpu.py --batch_size 32 \
        --tokens 64 --official_src /path/to/FiT --rounds 3 --repeats 20

`--official_src` is a local checkout of the public whlzy/FiT repository (the directory holding
`fit/`; never vendored). Each round times ours in this process (compiled once), then the
official model in a fresh subprocess (`benchmarks/_official_torch.py`: torch, all cores, no jax),
so both see the same machine state in turn. Without `--official_src` it prints ours alone.

Measured (float32, one device; the official code runs float32 on a CPU):
  forward  model.apply vs model(...) under no_grad, B images of N tokens
  train    training's own jitted step (AdamW, clip 1.0, EMA; donated state) vs the official
           train_fitv2.py step (forward, masked velocity MSE, backward, clip_grad_norm_, AdamW,
           update_ema)
  cfg      one guided velocity evaluation for B samples (`flow.guidance.cfg_velocity`: the
           model on the doubled batch) vs the official forward_with_cfg on 2B
The ratio is official seconds / our seconds: above 1 we are faster. Also printed: page faults per
train step (XLA:CPU's scratch; see `utils.host_memory`).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

import jax
from absl import flags

from fitv2_jax.benchmarks.model import square_inputs
from fitv2_jax.cli import flags as cli
from fitv2_jax.config.files import load_config
from fitv2_jax.flow.guidance import cfg_velocity
from fitv2_jax.models.fit import OWN_FIELDS
from fitv2_jax.parallel.mesh import create_mesh
from fitv2_jax.training.setup import build_setup
from fitv2_jax.utils.errors import UserError
from fitv2_jax.utils.host_memory import keep_freed_memory

FLAGS = flags.FLAGS
MEASURES = ("forward", "train", "cfg")


def define_flags(module_name: str) -> None:
    m = module_name
    flags.DEFINE_string("config", "configs/fitv2_b.py", "config file", module_name=m)
    flags.DEFINE_integer("batch_size", 8, "images per call", module_name=m)
    flags.DEFINE_integer("tokens", 256, "tokens per image (a near-square patch grid)",
                         module_name=m)  # fmt: skip
    flags.DEFINE_integer("repeats", 5, "timed calls per round, median reported", module_name=m)
    flags.DEFINE_integer("rounds", 2, "interleaved rounds (ours, then the official code)",
                         module_name=m)  # fmt: skip
    flags.DEFINE_string("official_src", None, "local checkout of the public whlzy/FiT "
                        "repository (holds fit/); without it, ours alone", module_name=m)  # fmt: skip
    flags.DEFINE_list("measures", list(MEASURES), "what to time", module_name=m)
    flags.DEFINE_string("remat_policy", None, "instead of the config's model.remat_policy "
                        "(`projections` is the CPU choice; the pod configs default to TPU's)",
                        module_name=m)  # fmt: skip
    flags.DEFINE_float("cfg_scale", 1.5, "guidance scale of the cfg measure", module_name=m)
    cli.define_renamed("batch", "batch_size")


def _timed(fn, repeats: int) -> tuple[float, float]:
    """(median seconds, median minor page faults) of fn() with its result blocked on, after
    warm-up calls until one makes no page faults (at most 3)."""

    def call() -> tuple[float, int]:
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        jax.block_until_ready(fn())
        seconds = time.perf_counter() - start
        return seconds, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0

    for _ in range(3):
        if call()[1] == 0:
            break
    seconds, faults = zip(*(call() for _ in range(repeats)), strict=True)
    return statistics.median(seconds), statistics.median(faults)


class Ours:
    """Our forward, train step and guided velocity on one device, compiled once."""

    def __init__(self, config, batch: int, tokens: int, cfg_scale: float):
        mesh = create_mesh((1, -1, 1), devices=jax.devices()[:1])
        self.setup = build_setup(config, global_batch=batch, mesh=mesh)
        model = self.setup.model
        self.state = self.setup.init_state(jax.random.key(0))
        inp = square_inputs(model, batch, tokens)
        self.tokens = int(inp["x"].shape[1])
        shapes = self.setup.abstract_batch(self.tokens)
        self.batch = {k: jax.device_put(v, shapes[k].sharding) for k, v in inp.items()
                      if k in shapes}  # fmt: skip
        self.inputs = inp
        apply = lambda p, *a: model.apply({"params": p}, *a)
        self.forward = jax.jit(apply)
        self.cfg = jax.jit(
            lambda p, x, t, y, g, m: cfg_velocity(
                lambda *a: apply(p, *a), x, t, y, g, m, None, cfg_scale=cfg_scale,
                null_label=model.num_classes, patch_size=model.patch_size,
                in_channels=model.in_channels, learn_sigma=model.learn_sigma,
            )
        )  # fmt: skip

    def time(self, measure: str, repeats: int) -> tuple[float, float]:
        i = self.inputs
        args = (i["x"], i["t"], i["y"], i["grid"], i["mask"])
        with self.setup.context():
            if measure == "forward":
                return _timed(lambda: self.forward(self.state.params, *args), repeats)
            if measure == "cfg":
                return _timed(lambda: self.cfg(self.state.params, *args), repeats)

            def step():  # the state is donated: each step takes the previous one's
                self.state, metrics = self.setup.step(self.state, self.batch)
                return metrics["loss"]

            return _timed(step, repeats)


def official(config, measures: list[str]) -> dict:
    """The official model timed in a subprocess (`_official_torch`); {} and a message if it fails."""
    params = {k: v for k, v in config.model.to_dict().items() if k not in OWN_FIELDS}
    cmd = [sys.executable, "-m", "fitv2_jax.benchmarks._official_torch",
           "--src", FLAGS.official_src, "--params", json.dumps(params, default=str),
           "--batch_size", str(FLAGS.batch_size), "--tokens", str(FLAGS.tokens),
           "--repeats", str(FLAGS.repeats), "--what", ",".join(measures),
           "--learning_rate", str(config.train.learning_rate),
           "--ema_decay", str(config.train.ema_decay)]  # fmt: skip
    env = dict(os.environ, FITV2_KEEP_FREED_MEMORY="0")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if not line:
        print(f"the official model failed:\n{out.stderr[-3000:]}", flush=True)
        return {}
    return json.loads(line[0][len("RESULT ") :])


def main() -> None:
    if min(FLAGS.batch_size, FLAGS.tokens, FLAGS.repeats, FLAGS.rounds) < 1:
        raise UserError("--batch_size, --tokens, --repeats and --rounds must be >= 1")
    bad = [m for m in FLAGS.measures if m not in MEASURES]
    if bad:
        raise UserError(f"--measures {','.join(bad)}: choose from {','.join(MEASURES)}")
    if FLAGS.official_src and not os.path.isfile(
        os.path.join(FLAGS.official_src, "fit", "model", "fit_model.py")
    ):
        raise UserError(f"--official_src {FLAGS.official_src}: no fit/model/fit_model.py there; "
                        "give a checkout of the public whlzy/FiT repository")  # fmt: skip
    config = load_config(FLAGS.config)
    config.model.dtype = "float32"  # as the official code runs on a CPU
    if FLAGS.remat_policy:
        config.model.remat_policy = FLAGS.remat_policy
    kept = keep_freed_memory()
    ours = Ours(config, FLAGS.batch_size, FLAGS.tokens, FLAGS.cfg_scale)
    print(f"config={FLAGS.config} batch={FLAGS.batch_size} tokens={ours.tokens} float32, "
          f"remat {config.model.remat_policy}, "
          f"repeats={FLAGS.repeats}, rounds={FLAGS.rounds}, freed memory kept: {kept}",
          flush=True)  # fmt: skip
    rows = {m: {"ours": [], "official": []} for m in FLAGS.measures}
    for r in range(FLAGS.rounds):
        for m in FLAGS.measures:
            seconds, faults = ours.time(m, FLAGS.repeats)
            rows[m]["ours"].append(seconds)
            print(f"round {r + 1} ours     {m:<8} {seconds * 1e3:9.1f} ms  "
                  f"({faults:.0f} page faults per call)", flush=True)  # fmt: skip
        if FLAGS.official_src:
            result = official(config, FLAGS.measures)
            for m in FLAGS.measures:
                if f"{m}_s" in result:
                    rows[m]["official"].append(result[f"{m}_s"])
                    print(f"round {r + 1} official {m:<8} {result[f'{m}_s'] * 1e3:9.1f} ms  "
                          f"(torch {result['torch']}, {result['threads']} threads)",
                          flush=True)  # fmt: skip
    print("\nmedian over rounds (ratio = official seconds / ours: > 1 means we are faster)")
    for m, row in rows.items():
        ours_s = statistics.median(row["ours"])
        line = f"{m:<8} ours {ours_s * 1e3:9.1f} ms"
        if m == "cfg":
            line += f" ({FLAGS.batch_size / ours_s:7.1f} guided evaluations/s)"
        if row["official"]:
            off = statistics.median(row["official"])
            ratios = [o / u for o, u in zip(row["official"], row["ours"], strict=False)]
            line += (f"   official {off * 1e3:9.1f} ms   ratio {off / ours_s:5.2f}x "
                     f"(per round: {', '.join(f'{x:.2f}' for x in ratios)})")  # fmt: skip
        print(line, flush=True)
