"""The embedded default, end to end on a CPU: `run_demo(DemoOptions(out="demo_out"))`.

1. prepare  crops of scikit-image's bundled photos at nine aspect ratios (train split: the left
            65% of each photo; the held-out right 35% is never trained on) -> ArrayRecord shards
2. train    configs/demo_cpu.py, checkpoints every 250 steps (rerun = resume), step 200 kept
3. evaluate the early (step 200) and the final EMA weights: samples at four sizes, two of them
            never trained on, FID/sFID/precision/recall against held-out crops of the same size
            with the real FID Inception weights
4. report   OUT/report.md: loss curve, sample grids per size, FID early vs final

Every stage resumes: rerunning after an interruption continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time

import jax

from fitv2_jax.config.files import load_config
from fitv2_jax.data.encoders import PixelEncoder
from fitv2_jax.data.shard_writer import PrepareSettings, prepare_split
from fitv2_jax.data.sources import open_source
from fitv2_jax.eval.features import load_inception
from fitv2_jax.eval.multi_size import evaluate_sizes
from fitv2_jax.eval.reference import Reference
from fitv2_jax.eval.report import pyplot
from fitv2_jax.parallel.mesh import inference_mesh
from fitv2_jax.sampling.generate import SolverOptions
from fitv2_jax.sampling.sampler import Sampler
from fitv2_jax.sampling.sizes import plan_sizes
from fitv2_jax.training.loop import train
from fitv2_jax.utils.files import write_text_atomic
from fitv2_jax.weights.checkpoints import CHECKPOINT_DIR
from fitv2_jax.weights.fit import load_fit_params

CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "configs",
    "demo_cpu.py",
)


@dataclasses.dataclass(frozen=True)
class DemoOptions:
    out: str = "demo_out"
    steps: int | None = None  # training steps (None: the config's)
    early_step: int = 200  # the early checkpoint scored against the final one
    sizes: str = "32x32,24x40,16x64,48x48"
    num_samples: int = 128  # samples per size per checkpoint
    num_steps: int = 25  # Euler steps


def loss_curve(workdir: str, path: str) -> list[dict]:
    """The loss over steps from WORKDIR/metrics.jsonl, drawn to `path`; returns the rows."""
    rows = {}
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            rows[r["step"]] = r  # a resumed run rewrites steps after its checkpoint
    rows = [rows[s] for s in sorted(rows)]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("rectified-flow loss (valid tokens)")
    ax.set_title("FiTv2 demo: training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return rows


def _f(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def write_report(out: str, config, rows, early: dict, final: dict, early_step: int,
                 minutes: dict) -> str:  # fmt: skip
    m = config.model
    lines = [
        "# FiTv2 demo report", "",
        f"Pixel-space FiTv2 ({m.depth} blocks, D={m.hidden_size}, {m.num_heads} heads, "
        f"{m.patch_size}x{m.patch_size} px patches, <= {m.context_size} tokens) trained for "
        f"{rows[-1]['step']} steps on crops of scikit-image's photos (7 classes, 9 aspect "
        "ratios); EMA weights, Euler sampler, CFG 1.5.", "",
        f"Loss: {rows[0]['loss']:.3f} at step {rows[0]['step']} -> {rows[-1]['loss']:.3f} at "
        f"step {rows[-1]['step']}.", "", "![loss](loss.png)", "",
        f"## FID against held-out crops (early = step {early_step}, final = step "
        f"{rows[-1]['step']})", "",
        "| size | tokens | RoPE rule | FID early | FID final | sFID final | Prec final | Rec final |",
        "|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for name, r in final["resolutions"].items():
        e = early["resolutions"][name]
        lines.append(f"| {name} | {r['tokens']} | {r['rule']} | {_f(e['fid'])} | {_f(r['fid'])} "
                     f"| {_f(r['sfid'])} | {_f(r['precision'])} | {_f(r['recall'])} |")  # fmt: skip
    lines += ["", "Sizes above the 64-token training context use the paper's VisionNTK + "
              "attention scale.", "",
              "## Samples (final EMA weights, random labels; early ones in grids/*_early.png)", ""]  # fmt: skip
    for name in final["resolutions"]:
        lines += [f"### {name}", "", f"![{name}](grids/{name}_final.png)", ""]
    lines += ["## Timing", "", "| stage | minutes |", "|---|---|",
              *[f"| {k} | {v:.1f} |" for k, v in minutes.items()], "",
              "Per-checkpoint details: `eval/early/results.md`, `eval/final/results.md`."]  # fmt: skip
    return write_text_atomic(os.path.join(out, "report.md"), "\n".join(lines) + "\n")


def _evaluate_checkpoints(config, workdir: str, out: str, o: DemoOptions) -> dict:
    ckpts = os.path.join(workdir, CHECKPOINT_DIR)
    final_step = max(int(s) for s in os.listdir(ckpts) if s.isdigit())
    inception = load_inception()
    plans = plan_sizes(config, o.sizes, "auto", 1.5)
    reference = Reference(source="demo", split="heldout",
                          cache_dir=os.path.join(out, "eval", "reference"))  # fmt: skip
    results = {}
    for tag, step in (("early", o.early_step), ("final", final_step)):
        print(f"-- {tag}: step {step}", flush=True)
        params = load_fit_params(os.path.join(ckpts, str(step)), config.model)
        sampler = Sampler(config.model, params, inference_mesh(config), latent=False,
                          batch_size=100)  # fmt: skip
        results[tag] = evaluate_sizes(
            sampler, plans, reference, out_dir=os.path.join(out, "eval", tag),
            num_samples=o.num_samples, options=SolverOptions("euler", o.num_steps),
            inception=inception, model_name=f"step {step}",
        )  # fmt: skip
    return results


def run_demo(o: DemoOptions) -> str:
    """Runs the four stages into o.out; returns the report's path."""
    out = os.path.abspath(o.out)
    os.makedirs(out, exist_ok=True)
    config = load_config(CONFIG)
    if o.steps:
        config.train.total_steps = o.steps
    config.train.keep_steps = (o.early_step,)
    minutes, t = {}, time.time()
    print("== 1/4 prepare the offline dataset", flush=True)
    config.data.path = os.path.join(out, "data")
    prepare_split(open_source("demo"), PixelEncoder(),
                  PrepareSettings(out=config.data.path, max_tokens=64, patch_size=4,
                                  source_kind="demo"))  # fmt: skip
    minutes["prepare"], t = (time.time() - t) / 60, time.time()
    print(f"== 2/4 train {config.train.total_steps} steps on {jax.device_count()} device(s)",
          flush=True)  # fmt: skip
    workdir = os.path.join(out, "train")
    train(config, workdir)
    minutes["train"], t = (time.time() - t) / 60, time.time()
    print("== 3/4 sample and score the early and the final checkpoint", flush=True)
    results = _evaluate_checkpoints(config, workdir, out, o)
    minutes["sample + evaluate"] = (time.time() - t) / 60
    print("== 4/4 report", flush=True)
    rows = loss_curve(workdir, os.path.join(out, "loss.png"))
    os.makedirs(os.path.join(out, "grids"), exist_ok=True)
    for name in results["final"]["resolutions"]:
        for tag in ("early", "final"):
            shutil.copy(results[tag]["resolutions"][name]["grid"],
                        os.path.join(out, "grids", f"{name}_{tag}.png"))  # fmt: skip
    report = write_report(out, config, rows, results["early"], results["final"], o.early_step,
                          minutes)  # fmt: skip
    with open(os.path.join(out, "eval", "final", "results.md"), encoding="utf-8") as f:
        print("\n" + f.read())
    return report
