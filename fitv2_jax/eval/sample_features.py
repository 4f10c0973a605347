"""Inception features of generated samples, saved batch by batch so a run resumes where it stopped.

    feats = sample_features(sampler, inception, plan, labels, key, options, res_dir, meta,
                            spill_dir=tmp)                  # Features + nfe per batch in info

Each batch's features go to OUT/HxW/features/batch_NNNNNN.npz as soon as they exist (written to
a temporary name, then renamed), so an interrupted run samples only the missing batches: sample
i always uses noise from (seed, i) and the same label, so a resumed run makes the samples an
uninterrupted one would. OUT/HxW/features/meta.json records the settings; features made with
other settings are refused (or discarded with overwrite=True).
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from fitv2_jax.eval.features import FeatureAccumulator, Features
from fitv2_jax.sampling.generate import SolverOptions
from fitv2_jax.sampling.images import image_grid
from fitv2_jax.sampling.sampler import Sampler
from fitv2_jax.sampling.sizes import SizePlan
from fitv2_jax.utils.errors import UserError
from fitv2_jax.utils.files import write_json_atomic

PART = "batch_{:06d}.npz"
GRID_IMAGES = 16


def _saved_parts(feature_dir: str, num_batches: int) -> dict[int, int]:
    """{batch: its sample count} of the complete batch files already saved (a half-written
    file never has the final name). Only the small `ids` member is read."""
    parts = {}
    for b in range(num_batches):
        path = os.path.join(feature_dir, PART.format(b))
        if os.path.isfile(path):
            with np.load(path) as f:
                parts[b] = len(f["ids"])
    return parts


def _read_part(feature_dir: str, b: int) -> dict[str, np.ndarray]:
    with np.load(os.path.join(feature_dir, PART.format(b))) as f:
        return {k: f[k] for k in f.files}


def _check_meta(feature_dir: str, meta: dict, overwrite: bool) -> None:
    path = os.path.join(feature_dir, "meta.json")
    if os.path.isfile(path) and not overwrite:
        with open(path) as f:
            old = json.load(f)
        diff = {k: (old.get(k), v) for k, v in meta.items() if old.get(k) != v}
        if diff:
            raise UserError(
                f"{feature_dir} holds features made with other settings "
                f"({', '.join(f'{k}: {a} -> {b}' for k, (a, b) in diff.items())}); "
                "use another output directory or --overwrite"
            )
    if overwrite:
        for old_part in glob.glob(os.path.join(feature_dir, "batch_*.npz")):
            os.remove(old_part)
    os.makedirs(feature_dir, exist_ok=True)
    write_json_atomic(path, meta, indent=2)


def _sample_missing_batches(sampler, inception, plan, labels, key, options, out_dir, todo,
                            progress, done):  # fmt: skip
    n, bs = len(labels), sampler.batch_size
    feature_dir = os.path.join(out_dir, "features")
    bar = tqdm(total=n, desc=f"samples {plan.name}", unit="img", disable=not progress, leave=False)
    bar.update(done)
    for b in todo:
        ids = np.arange(b * bs, min((b + 1) * bs, n))
        images, nfe = sampler.plan_images(plan, ids, labels[ids], key, options)
        out = inception(images)
        part = dict(pool=out["pool"], spatial=out["spatial"], ids=ids, nfe=np.int64(nfe))
        if out["logits"] is not None:
            part["logits"] = out["logits"]
        tmp = os.path.join(feature_dir, f".{PART.format(b)}.partial.npz")
        np.savez(tmp, **part)
        os.replace(tmp, os.path.join(feature_dir, PART.format(b)))
        if b == 0:
            grid = image_grid(images[:GRID_IMAGES])
            Image.fromarray(grid).save(os.path.join(out_dir, "grid.png"))
        bar.update(len(ids))
    bar.close()


def sample_features(
    sampler: Sampler,
    inception,
    plan: SizePlan,
    labels: np.ndarray,
    key,
    options: SolverOptions,
    out_dir: str,
    meta: dict,
    *,
    spill_dir: str,
    overwrite: bool = False,
    progress: bool = True,
) -> Features:
    """Features of len(labels) samples at one planned size, resumable batch by batch.

    Pool features and logits go to FeatureFiles in spill_dir; info holds nfe (per batch),
    reused_batches and new_batches. Memory does not grow with N.
    """
    n, bs = len(labels), sampler.batch_size
    num_batches = -(-n // bs)
    feature_dir = os.path.join(out_dir, "features")
    _check_meta(feature_dir, dict(meta, batch_size=bs, num_samples=n), overwrite)
    saved = _saved_parts(feature_dir, num_batches)
    todo = [b for b in range(num_batches) if b not in saved]
    _sample_missing_batches(sampler, inception, plan, labels, key, options, out_dir, todo,
                            progress, sum(saved.values()))  # fmt: skip
    acc, nfe = FeatureAccumulator(spill_dir, plan.name.replace("x", "_"), keep_raw=True), []
    for b in range(num_batches):  # one pass over the saved batches, in order
        part = _read_part(feature_dir, b)
        acc.add(dict(pool=part["pool"], spatial=part["spatial"], logits=part.get("logits")))
        nfe.append(int(part["nfe"]))
    return acc.result(nfe=nfe, reused_batches=len(saved), new_batches=len(todo))
