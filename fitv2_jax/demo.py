r"""The embedded default, end to end on a CPU: `python -m fitv2_jax.demo --out demo_out`.

1. prepare  crops of scikit-image's bundled photos at nine aspect ratios (train split: the left
            65% of each photo; the held-out right 35% is never trained on) -> ArrayRecord shards
2. train    configs/demo_cpu.py, checkpoints every 250 steps (rerun = resume), step 200 kept
3. evaluate the early (step 200) and the final EMA weights: samples at four sizes, two of them
            never trained on, FID/sFID/precision/recall against held-out crops of the same size
            with the real FID Inception weights
4. report   demo_out/report.md: loss curve, sample grids per size, FID early vs final

Every stage resumes: rerunning after an interruption continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

DEFAULT_RESOLUTIONS = "32x32,24x40,16x64,48x48"
CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo_cpu.py"
)


def prepare_data(out: str) -> str:
    from fitv2_jax.prepare import main as prepare

    data = os.path.join(out, "data")
    prepare(["--source", "demo", "--out", data, "--max-tokens", "64", "--patch-size", "4"])
    return data


def loss_curve(workdir: str, path: str) -> list[dict]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {}
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            rows[r["step"]] = r  # a resumed run rewrites steps after its checkpoint
    rows = [rows[s] for s in sorted(rows)]
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


def write_report(
    out: str, config, rows, early: dict, final: dict, early_step: int, minutes: dict
) -> str:
    lines = [
        "# FiTv2 demo report",
        "",
        f"Pixel-space FiTv2 ({config.model.depth} blocks, D={config.model.hidden_size}, "
        f"{config.model.num_heads} heads, {config.model.patch_size}x{config.model.patch_size} px patches, "
        f"<= {config.model.context_size} tokens) trained for {rows[-1]['step']} steps on crops of "
        "scikit-image's photos (7 classes, 9 aspect ratios); EMA weights, Euler sampler, CFG 1.5.",
        "",
        f"Loss: {rows[0]['loss']:.3f} at step {rows[0]['step']} -> {rows[-1]['loss']:.3f} at step {rows[-1]['step']}.",
        "",
        "![loss](loss.png)",
        "",
        f"## FID against held-out crops (early = step {early_step}, final = step {rows[-1]['step']})",
        "",
        "| size | tokens | RoPE rule | FID early | FID final | sFID final | Prec final | Rec final |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in final["resolutions"].items():
        e = early["resolutions"][name]

        def f(v):
            return "-" if v is None else f"{v:.2f}"

        lines.append(
            f"| {name} | {r['tokens']} | {r['rule']} | {f(e['fid'])} | {f(r['fid'])} | {f(r['sfid'])} "
            f"| {f(r['precision'])} | {f(r['recall'])} |"
        )
    lines += [
        "",
        "Sizes above the 64-token training context use the paper's VisionNTK + attention scale.",
        "",
    ]
    lines += ["## Samples (final EMA weights, random labels; early ones in grids/*_early.png)", ""]
    for name in final["resolutions"]:
        lines += [f"### {name}", "", f"![{name}](grids/{name}_final.png)", ""]
    lines += [
        "## Timing",
        "",
        "| stage | minutes |",
        "|---|---|",
        *[f"| {k} | {v:.1f} |" for k, v in minutes.items()],
        "",
        "Per-checkpoint details: `eval/early/results.md`, `eval/final/results.md`.",
    ]
    path = os.path.join(out, "report.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(
        prog="python -m fitv2_jax.demo", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", default="demo_out", help="output directory (rerun to resume)")
    parser.add_argument(
        "--steps", type=int, default=None, help="training steps (default: the config's)"
    )
    parser.add_argument(
        "--early_step", type=int, default=200, help="the early checkpoint scored against the final"
    )
    parser.add_argument(
        "--resolutions", default=DEFAULT_RESOLUTIONS, help="HxW list for sampling + FID"
    )
    parser.add_argument(
        "--num_samples", type=int, default=128, help="samples per size per checkpoint"
    )
    parser.add_argument("--sample_steps", type=int, default=25, help="Euler steps")
    args = parser.parse_args(argv)

    import jax

    from fitv2_jax.config_file import load_config
    from fitv2_jax.eval.evaluate import evaluate
    from fitv2_jax.eval.inception import load_inception
    from fitv2_jax.training.loop import train_and_evaluate

    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    config = load_config(CONFIG)
    if args.steps:
        config.train.total_steps = args.steps
    config.train.keep_steps = (args.early_step,)
    minutes = {}

    t = time.time()
    print("== 1/4 prepare the offline dataset", flush=True)
    config.data.path = prepare_data(out)
    minutes["prepare"] = (time.time() - t) / 60

    t = time.time()
    print(
        f"== 2/4 train {config.train.total_steps} steps on {jax.device_count()} device(s)",
        flush=True,
    )
    workdir = os.path.join(out, "train")
    train_and_evaluate(config, workdir)
    minutes["train"] = (time.time() - t) / 60

    t = time.time()
    print("== 3/4 sample and score the early and the final checkpoint", flush=True)
    inception = load_inception()
    ckpts = os.path.join(workdir, "checkpoints")
    final_step = max(int(s) for s in os.listdir(ckpts) if s.isdigit())
    results = {}
    for tag, step in (("early", args.early_step), ("final", final_step)):
        print(f"-- {tag}: step {step}", flush=True)
        results[tag] = evaluate(
            config, os.path.join(ckpts, str(step)), args.resolutions,
            out_dir=os.path.join(out, "eval", tag), ref_cache_dir=os.path.join(out, "eval", "reference"),
            num_samples=args.num_samples, solver="euler", num_steps=args.sample_steps, cfg_scales=1.5,
            ref_source="demo", ref_split="heldout", batch_size=100, inception=inception, model_name=f"step {step}",
        )  # fmt: skip
    minutes["sample + evaluate"] = (time.time() - t) / 60

    print("== 4/4 report", flush=True)
    rows = loss_curve(workdir, os.path.join(out, "loss.png"))
    os.makedirs(os.path.join(out, "grids"), exist_ok=True)
    for name, r in results["final"]["resolutions"].items():
        shutil.copy(r["grid"], os.path.join(out, "grids", f"{name}_final.png"))
        shutil.copy(
            results["early"]["resolutions"][name]["grid"],
            os.path.join(out, "grids", f"{name}_early.png"),
        )
    report = write_report(
        out, config, rows, results["early"], results["final"], args.early_step, minutes
    )
    print("\n" + open(os.path.join(out, "eval", "final", "results.md"), encoding="utf-8").read())
    print(f"Report: {report}")
    return report


if __name__ == "__main__":
    main()
