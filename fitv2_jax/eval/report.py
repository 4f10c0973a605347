"""Evaluation reports: results.md (the paper's table), results.json and a FID chart.

write_reports(results, out_dir)       # OUT/results.json, OUT/results.md
fid_chart(results, "OUT/fid.png")     # FID by size (needs matplotlib: the [eval] extra)

OUT may be a local path or a URL (gs://...).
"""

from __future__ import annotations

import json

import numpy as np

from fitv2_jax.eval.scoring import SCORES
from fitv2_jax.utils import paths
from fitv2_jax.utils.errors import UserError
from fitv2_jax.utils.files import save_figure, write_json_atomic, write_text_atomic


def pyplot():
    """matplotlib.pyplot with the Agg backend (no display), or an error naming the extra."""
    try:
        import matplotlib
    except ImportError as e:
        raise UserError("charts need matplotlib: pip install 'fitv2_jax[eval]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fmt_metric(v, digits=2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def fmt_score(key: str, v) -> str:
    """A score as the tables print it: KID x 1e3 (its "KID x1e3" label in `SCORES`), precision and
    recall with 3 digits, the others with 2; '-' when it is None."""
    if key == "kid" and v is not None:
        v = v * 1e3
    return fmt_metric(v, 3 if key in ("precision", "recall") else 2)


def results_markdown(results: dict) -> str:
    """The paper's layout (one row per model, FID / KID x1e3 / sFID / IS / Prec / Rec per
    resolution), then a long table with the sampling settings of each resolution."""
    res = results["resolutions"]
    names = list(res)
    labels = [label for _, label in SCORES]
    head = "| model | " + " | ".join(names) + " |"
    rule = "|---|" + "---|" * len(names)
    cells = [" / ".join(fmt_score(k, r.get(k)) for k, _ in SCORES) for r in res.values()]
    lines = [
        f"# Evaluation of {results['model']}",
        "",
        f"{' / '.join(labels)} per resolution (IS '-' when the Inception weights have no "
        "1008-way layer, KID '-' when the reference has no pool features).",
        "",
        head,
        rule,
        f"| {results['model']} | " + " | ".join(cells) + " |",
        "",
        "| resolution | RoPE rule | CFG | " + " | ".join(labels) + " | samples | reference | "
        "NFE/batch |",
        "|---|---|---|" + "---|" * len(labels) + "---|---|---|",
    ]
    for name, r in res.items():
        nums = " | ".join(fmt_score(k, r.get(k)) for k, _ in SCORES)
        nfe = f"{np.mean(r['nfe_per_batch']):.0f}"
        lines.append(
            f"| {name} | {r['rule']} | {r['cfg_scale']:g} | {nums} | {r['num_samples']} | "
            f"{r['num_reference']} ({r['reference']}) | {nfe} |"
        )
    lines += ["", f"Settings: `{json.dumps(results['settings'])}`", ""]
    return "\n".join(lines)


def fid_chart(results: dict, path: str) -> str:
    """Bar chart of FID by resolution (Agg backend, no display needed)."""
    plt = pyplot()
    names = list(results["resolutions"])
    fids = [results["resolutions"][n]["fid"] for n in names]
    colors = ["tab:blue" if results["resolutions"][n]["rule"] == "none" else "tab:orange"
              for n in names]  # fmt: skip
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2.5, 3.6))
    bars = ax.bar(names, fids, color=colors)
    ax.bar_label(bars, labels=[f"{f:.2f}" for f in fids], fontsize=8)
    ax.set_ylabel("FID (lower is better)")
    ax.set_xlabel("resolution (height x width); orange = RoPE extrapolation rule")
    ax.set_title(f"{results['model']}: FID-{results['settings']['num_samples']} by resolution")
    fig.tight_layout()
    save_figure(path, fig, dpi=120)
    plt.close(fig)
    return path


def fid_over_steps_chart(table: dict, path: str) -> str:
    """FID per size over training steps; table: {step: {size: {"fid": ...}}} (as
    WORKDIR/eval/scores.json)."""
    plt = pyplot()
    steps = sorted(table, key=int)
    sizes = list(table[steps[-1]])
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    for size in sizes:
        pts = [(int(s), table[s][size]["fid"]) for s in steps
               if table[s].get(size, {}).get("fid") is not None]  # fmt: skip
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", lw=1.5, label=size)
    ax.set_xlabel("training step")
    ax.set_ylabel("FID (EMA weights, lower is better)")
    ax.set_title("FID over training, per sample size")
    ax.grid(alpha=0.3)
    ax.legend(title="height x width", fontsize=8)
    fig.tight_layout()
    save_figure(path, fig)
    plt.close(fig)
    return path


def write_reports(results: dict, out_dir: str) -> None:
    """OUT/results.json and OUT/results.md, each replaced atomically."""
    write_json_atomic(paths.join(out_dir, "results.json"), results, indent=2)
    write_text_atomic(paths.join(out_dir, "results.md"), results_markdown(results))
