"""The embedded default, end to end on a CPU: `run_demo(DemoOptions(out="demo_out"))`.

1. prepare  crops of scikit-image's bundled photos at nine aspect ratios (train split: the left
            65% of each photo; the held-out right 35% is never trained on) -> ArrayRecord shards
2. train    configs/demo_cpu.py, checkpoints every 250 steps (rerun = resume); every
            `eval_every` steps the EMA weights are sampled at four sizes, two of them never
            trained on, and scored (FID/KID/sFID/precision/recall) against held-out crops of the
            same size with the real FID Inception weights: evaluation during training
            (`training.evaluator`), the code `python -m fitv2_jax.evaluate` scores with
3. report   OUT/report.md: loss curve, FID over training steps per size, the score table, sample
            grids of the first and the last evaluation (small samples upscaled to be seen)

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
from fitv2_jax.eval.report import fmt_score, pyplot
from fitv2_jax.training.evaluator import scores_markdown
from fitv2_jax.training.loop import train
from fitv2_jax.utils.files import write_text_atomic

CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "configs",
    "demo_cpu.py",
)


@dataclasses.dataclass(frozen=True)
class DemoOptions:
    out: str = "demo_out"
    steps: int | None = None  # training steps (None: the config's)
    eval_every: int | None = None  # steps between evaluations (None: the config's)
    sizes: str | None = None  # HxW list for evaluation (None: the config's)
    num_samples: int | None = None  # samples per size per evaluation (None: the config's)
    num_steps: int | None = None  # Euler steps (None: the config's)


def loss_curve(workdir: str, path: str) -> list[dict]:
    """The loss over steps from WORKDIR/metrics.jsonl, drawn to `path`; returns the rows."""
    rows = {}
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if "loss" in r:  # evaluation rows carry eval/* scalars only
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


def write_report(out: str, config, rows, table: dict, final: dict, minutes: dict) -> str:
    """OUT/report.md from the loss rows, the per-step score table (WORKDIR/eval/scores.json)
    and the last evaluation's results."""
    m, steps = config.model, sorted(table, key=int)
    lines = [
        "# FiTv2 demo report", "",
        f"Pixel-space FiTv2 ({m.depth} blocks, D={m.hidden_size}, {m.num_heads} heads, "
        f"{m.patch_size}x{m.patch_size} px patches, <= {m.context_size} tokens) trained for "
        f"{rows[-1]['step']} steps on crops of scikit-image's photos (7 classes, 9 aspect "
        "ratios); EMA weights, Euler sampler, CFG 1.5.", "",
        f"Loss: {rows[0]['loss']:.3f} at step {rows[0]['step']} -> {rows[-1]['loss']:.3f} at "
        f"step {rows[-1]['step']}.", "", "![loss](loss.png)", "",
        f"## FID over training (evaluated every {config.train.eval_every} steps during training, "
        f"{config.eval.num_samples} samples per size against held-out crops of that size)", "",
        "![FID over training](fid_over_steps.png)", "",
        scores_markdown(table).split("\n", 2)[2].strip(), "",
        f"## Final scores (step {steps[-1]})", "",
        "| size | tokens | RoPE rule | FID | KID x1e3 | sFID | Prec | Rec |",
        "|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for name, r in final["resolutions"].items():
        cells = " | ".join(
            fmt_score(k, r[k]) for k in ("fid", "kid", "sfid", "precision", "recall")
        )
        lines.append(f"| {name} | {r['tokens']} | {r['rule']} | {cells} |")
    lines += ["", "Sizes above the 64-token training context use the paper's VisionNTK + "
              "attention scale.", "",
              f"## Samples (EMA weights at step {steps[0]} and at step {steps[-1]}, random labels)",
              ""]  # fmt: skip
    for name in final["resolutions"]:
        lines += [f"### {name}", "", f"step {steps[0]}: ![{name} first](grids/{name}_first.png)",
                  "", f"step {steps[-1]}: ![{name} last](grids/{name}_last.png)", ""]  # fmt: skip
    lines += ["## Timing", "", "| stage | minutes |", "|---|---|",
              *[f"| {k} | {v:.1f} |" for k, v in minutes.items()], "",
              "Per-evaluation details: `train/eval/step_NNNNNNNN/results.md`; the table as JSON: "
              "`train/eval/scores.json`; TensorBoard: `train/tensorboard`."]  # fmt: skip
    return write_text_atomic(os.path.join(out, "report.md"), "\n".join(lines) + "\n")


def demo_config(o: DemoOptions, out: str):
    config = load_config(CONFIG)
    config.data.path = os.path.join(out, "data")
    if o.steps:
        config.train.total_steps = o.steps
    if o.eval_every:
        config.train.eval_every = o.eval_every
    for key in ("sizes", "num_samples", "num_steps"):
        if getattr(o, key) is not None:
            config.eval[key] = getattr(o, key)
    return config


def run_demo(o: DemoOptions) -> str:
    """Runs the three stages into o.out; returns the report's path."""
    out = os.path.abspath(o.out)
    os.makedirs(out, exist_ok=True)
    config = demo_config(o, out)
    minutes, t = {}, time.time()
    print("== 1/3 prepare the offline dataset", flush=True)
    prepare_split(open_source("demo"), PixelEncoder(),
                  PrepareSettings(out=config.data.path, max_tokens=64, patch_size=4,
                                  source_kind="demo"))  # fmt: skip
    minutes["prepare"], t = (time.time() - t) / 60, time.time()
    print(f"== 2/3 train {config.train.total_steps} steps on {jax.device_count()} device(s), "
          f"scoring the EMA weights every {config.train.eval_every} steps", flush=True)  # fmt: skip
    workdir = os.path.join(out, "train")
    train(config, workdir)
    minutes["train + evaluations"] = (time.time() - t) / 60
    print("== 3/3 report", flush=True)
    rows = loss_curve(workdir, os.path.join(out, "loss.png"))
    eval_dir = os.path.join(workdir, "eval")
    with open(os.path.join(eval_dir, "scores.json"), encoding="utf-8") as f:
        table = json.load(f)
    steps = sorted(table, key=int)
    with open(os.path.join(eval_dir, f"step_{int(steps[-1]):08d}", "results.json")) as f:
        final = json.load(f)
    shutil.copy(
        os.path.join(eval_dir, "fid_over_steps.png"), os.path.join(out, "fid_over_steps.png")
    )
    os.makedirs(os.path.join(out, "grids"), exist_ok=True)
    for name in final["resolutions"]:
        for tag, step in (("first", steps[0]), ("last", steps[-1])):
            shutil.copy(os.path.join(eval_dir, f"step_{int(step):08d}", name, "grid.png"),
                        os.path.join(out, "grids", f"{name}_{tag}.png"))  # fmt: skip
    report = write_report(out, config, rows, table, final, minutes)
    with open(os.path.join(eval_dir, "scores.md"), encoding="utf-8") as f:
        print("\n" + f.read())
    return report
