"""Sample-and-score at several sizes: FID / KID / sFID / IS / precision / recall per size.

    plans = sampling.plan_sizes(config, "256x256,160x320,320x320", rule="auto", cfg_scale=1.5)
    results = evaluate_sizes(sampler, plans, Reference(npz="VIRTUAL_imagenet256_labeled.npz"),
                             out_dir="eval/xl", num_samples=50_000, options=SolverOptions())

For each size: samples are drawn batch by batch on the sampler's mesh, squashed to 299x299 by the
Inception and reduced to features on the fly (no PNG per sample), saved per batch so an
interrupted run resumes (`sample_features`); the reference comes from an ADM .npz or real images
cover-cropped to the size (`reference`); `scoring.score` computes the metrics. Writes
OUT/results.json and OUT/results.md after every size, OUT/fid.png and OUT/HxW/grid.png.
Memory does not grow with the number of samples.

On several hosts (jax.distributed) the sampler's mesh is each host's own devices: every host
samples its share of the batches, the features are gathered once per size, every host computes
the same scores and the first one writes the reports. OUT (and the reference cache) may be a
URL (gs://...); the temporary feature files stay local.
"""

from __future__ import annotations

import tempfile
import time

import jax
import numpy as np

from fitv2_jax.eval.features import load_inception
from fitv2_jax.eval.reference import Reference, check_reference_files, reference_features
from fitv2_jax.eval.report import fid_chart, write_reports
from fitv2_jax.eval.sample_features import sample_features
from fitv2_jax.eval.scoring import score
from fitv2_jax.sampling.generate import SolverOptions
from fitv2_jax.sampling.sampler import Sampler
from fitv2_jax.sampling.sizes import SizePlan
from fitv2_jax.utils import paths
from fitv2_jax.utils.errors import UserError

SCORING_ONLY = ("fid_method", "k")  # settings that change the scores but not the samples


def evaluation_labels(num_samples: int, num_classes: int, seed: int) -> np.ndarray:
    """The class of sample i: uniform, from the seed (the same for every size and resume)."""
    return np.random.default_rng([seed, 1]).integers(0, num_classes, num_samples)


def _evaluate_one(sampler, inception, plan, reference, labels, key, options, settings,
                  out_dir, ref_cache, spill, overwrite, progress) -> dict:  # fmt: skip
    start = time.time()
    res_dir = paths.join(out_dir, plan.name)
    paths.makedirs(res_dir)
    meta = {k: v for k, v in settings.items() if k not in SCORING_ONLY}
    meta.update(rule=plan.rule, cfg_scale=plan.cfg_scale, resolution=plan.name)
    feats = sample_features(sampler, inception, plan, labels, key, options, res_dir, meta,
                            spill_dir=spill, overwrite=overwrite, progress=progress)  # fmt: skip
    ref = reference_features(reference, plan.height, plan.width, inception, cache_dir=ref_cache,
                             batch_size=sampler.batch_size, progress=progress)  # fmt: skip
    scores = score(feats, ref, k=settings["k"], fid_method=settings["fid_method"])
    feats.close()
    return dict(
        height=plan.height, width=plan.width, patches=[plan.h, plan.w], tokens=plan.tokens,
        rule=plan.rule, cfg_scale=plan.cfg_scale, **scores, num_samples=feats.num,
        num_reference=ref.num, reference=ref.info.get("description", ""),
        reference_file=ref.info.get("path"), reference_skipped=ref.info.get("skipped", 0),
        nfe_per_batch=feats.info["nfe"], reused_batches=feats.info["reused_batches"],
        new_batches=feats.info["new_batches"], grid=paths.join(res_dir, "grid.png"),
        seconds=round(time.time() - start, 2),
    )  # fmt: skip


def evaluate_sizes(
    sampler: Sampler,
    plans: list[SizePlan],
    reference: Reference,
    *,
    out_dir: str,
    num_samples: int,
    options: SolverOptions,
    inception=None,
    seed: int = 0,
    k: int = 3,
    fid_method: str = "sqrtm",
    model_name: str = "model",
    overwrite: bool = False,
    progress: bool = True,
    settings: dict | None = None,
) -> dict:
    """Samples and scores at every planned size; returns the results dict (also written to
    out_dir). inception: a loaded `Inception` (default: `load_inception()`); settings: extra
    entries recorded with the results (checkpoint, params) that also guard resumed features."""
    start = time.time()
    if k < 1:
        raise UserError(f"--k {k}: precision/recall need k >= 1 nearest neighbours")
    if num_samples <= k:
        raise UserError(f"--num_samples {num_samples}: need more than k={k} for precision/recall")
    check_reference_files(reference, plans)  # fail before hours of sampling
    for plan in plans:
        sampler.check_fits(plan.h, plan.w)
    inception = inception or load_inception(batch_size=sampler.batch_size)
    labels = evaluation_labels(num_samples, int(sampler.model_cfg["num_classes"]), seed)
    out_dir = paths.check_writable_dir(paths.absolute(out_dir), "--out")
    # reference statistics do not depend on the model: evaluations of several checkpoints can
    # share one cache directory
    ref_cache = paths.absolute(reference.cache_dir or paths.join(out_dir, "reference"))
    paths.makedirs(ref_cache)
    settings = dict(settings or {}, num_samples=num_samples, **options.describe(), seed=seed,
                    batch_size=sampler.batch_size, fid_method=fid_method, k=k)  # fmt: skip
    results = dict(model=model_name, settings=settings, resolutions={})
    writes = jax.process_index() == 0  # every host scores the gathered features; one writes
    # Sample pool features and logits wait here for the metrics (12 KB per sample), not in RAM.
    with tempfile.TemporaryDirectory(prefix="fitv2_eval_") as spill:
        for plan in plans:
            results["resolutions"][plan.name] = _evaluate_one(
                sampler, inception, plan, reference, labels, jax.random.key(seed), options,
                settings, out_dir, ref_cache, spill, overwrite, progress,
            )  # fmt: skip
            if writes:
                write_reports(results, out_dir)  # after every size: partial results are kept
    results["seconds"] = round(time.time() - start, 2)
    if writes:
        write_reports(results, out_dir)
        fid_chart(results, paths.join(out_dir, "fid.png"))
    return results
