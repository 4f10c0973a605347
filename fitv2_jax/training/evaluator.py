"""Evaluation during training, as big_vision's evaluators: the EMA weights scored every
`config.train.eval_every` steps with the scoring code of `python -m fitv2_jax.evaluate`.

    evaluator = TrainingEvaluator(config, workdir)       # config.eval says what and against what
    scores = evaluator(step, state.ema_params, writer)   # {"32x32": {"fid": ..., "kid": ...}}

Per size: FID / KID / sFID / IS / precision / recall, written as `eval/<HxW>/<metric>` scalars
(TensorBoard and metrics.jsonl), into WORKDIR/eval/step_NNNNNNNN/ (results.md, grids, the
per-batch features, so an interrupted evaluation resumes) and into the per-step table
WORKDIR/eval/scores.json + scores.md, drawn as WORKDIR/eval/fid_over_steps.png.
Every host samples its share on its own devices (`eval.multi_size`); the first one writes.
Sample i has the same noise and label at every step, so the scores compare across steps.
"""

from __future__ import annotations

import json

import jax
import numpy as np
from jax.experimental import multihost_utils

from fitv2_jax.eval.features import load_inception
from fitv2_jax.eval.multi_size import evaluate_sizes
from fitv2_jax.eval.reference import Reference, check_reference_files
from fitv2_jax.eval.report import fid_over_steps_chart, fmt_score, pyplot
from fitv2_jax.eval.scoring import SCORES
from fitv2_jax.parallel.mesh import inference_mesh
from fitv2_jax.sampling.generate import SolverOptions
from fitv2_jax.sampling.sampler import Sampler
from fitv2_jax.sampling.sizes import is_latent, plan_sizes
from fitv2_jax.utils import paths
from fitv2_jax.utils.errors import UserError
from fitv2_jax.utils.files import write_json_atomic, write_text_atomic
from fitv2_jax.weights.vae import load_vae

SCORES_JSON = "scores.json"


def host_params(params) -> dict:
    """Numpy copies of (possibly multi-host sharded) params, the whole arrays on every host."""

    def get(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(a, tiled=True))
        return np.asarray(a)

    return jax.tree.map(get, params)


def _reference(ec, cache_dir: str) -> Reference:
    npz, source = ec.ref_npz or None, ec.ref_source or None
    if (npz is None) == (source is None):
        raise UserError("config.train.eval_every > 0 needs one reference: set "
                        "config.eval.ref_npz (ADM .npz) or config.eval.ref_source "
                        "(demo | folder | imagenet | tfds, with config.eval.ref_root)")  # fmt: skip
    return Reference(npz=npz, source=source, root=ec.ref_root or None, split=ec.ref_split,
                     num=ec.num_ref or None, cache_dir=cache_dir)  # fmt: skip


class TrainingEvaluator:
    """Scores EMA params at a step; checks the config and the reference when built, so a
    mistake stops the run before its first step, not hours later."""

    def __init__(self, config, workdir: str):
        self.config, self.ec = config, config.eval
        self.dir = paths.join(paths.absolute(workdir), "eval")
        self.reference = _reference(self.ec, paths.join(self.dir, "reference"))
        self.vae = None
        if is_latent(config):
            if not config.vae_path:
                raise UserError("config.train.eval_every > 0 on a latent config needs "
                                "config.vae_path (the SD VAE) to decode samples")  # fmt: skip
            self.vae = load_vae(config.vae_path)
        sizes = self.ec.sizes or ",".join(f"{h}x{w}" for h, w in config.train.sample_sizes)
        self.plans = plan_sizes(config, sizes, self.ec.rule, self.ec.cfg_scale, self.vae)
        self.options = SolverOptions(self.ec.solver, int(self.ec.num_steps))
        if self.ec.num_samples <= self.ec.k:
            raise UserError(f"config.eval.num_samples={self.ec.num_samples}: need more than "
                            f"config.eval.k={self.ec.k} for precision/recall")  # fmt: skip
        check_reference_files(self.reference, self.plans)
        pyplot()  # matplotlib (the eval extra) draws the charts: missing, say so now
        self.main = jax.process_index() == 0

    def scores(self) -> dict[str, dict]:
        """{step (str): {size: {metric: value}}} of the evaluations so far."""
        path = paths.join(self.dir, SCORES_JSON)
        if not paths.isfile(path):
            return {}
        return json.loads(paths.read_text(path))

    def done(self, step: int) -> bool:
        return str(step) in self.scores()

    def __call__(self, step: int, ema_params, writer, progress: bool = False) -> dict:
        ec = self.ec
        mesh = inference_mesh(self.config, "data", jax.local_devices())  # each host alone
        sampler = Sampler(self.config.model, host_params(ema_params), mesh, vae=self.vae,
                          latent=is_latent(self.config), batch_size=ec.batch_size)  # fmt: skip
        results = evaluate_sizes(
            sampler, self.plans, self.reference, out_dir=paths.join(self.dir, f"step_{step:08d}"),
            num_samples=int(ec.num_samples), options=self.options,
            inception=load_inception(batch_size=sampler.batch_size), seed=int(ec.seed),
            k=int(ec.k), fid_method=ec.fid_method, model_name=f"step {step}",
            progress=progress and self.main, settings=dict(step=step),
        )  # fmt: skip
        keys = [k for k, _ in SCORES] + ["kid_std"]
        by_size = {name: {k: r.get(k) for k in keys} for name, r in results["resolutions"].items()}
        writer.write_scalars(step, {f"eval/{name}/{k}": v for name, s in by_size.items()
                                    for k, v in s.items() if v is not None})  # fmt: skip
        if self.main:
            table = self.scores() | {str(step): by_size}
            write_json_atomic(paths.join(self.dir, SCORES_JSON), table, indent=1)
            write_text_atomic(paths.join(self.dir, "scores.md"), scores_markdown(table))
            fid_over_steps_chart(table, paths.join(self.dir, "fid_over_steps.png"))
            line = "  ".join(f"{name} FID {fmt_score('fid', s['fid'])} KID x1e3 "
                             f"{fmt_score('kid', s['kid'])}" for name, s in by_size.items())  # fmt: skip
            print(f"eval step {step}: {line} ({results['seconds']:.0f} s)", flush=True)
        return by_size


def scores_markdown(table: dict) -> str:
    """The per-step table: one row per evaluated step, FID / KID x1e3 per size."""
    steps = sorted(table, key=int)
    sizes = list(table[steps[-1]])
    head = "| step | " + " | ".join(f"{s} FID | {s} KID x1e3" for s in sizes) + " |"
    lines = ["# FID and KID over training steps (EMA weights)", "", head,
             "|---|" + "---|---|" * len(sizes)]  # fmt: skip
    for step in steps:
        row = table[step]
        cells = [f"{fmt_score('fid', row.get(s, {}).get('fid'))} | "
                 f"{fmt_score('kid', row.get(s, {}).get('kid'))}" for s in sizes]  # fmt: skip
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
