"""Inception features of generated samples, saved batch by batch so a run resumes where it stopped.

    feats = sample_features(sampler, inception, plan, labels, key, options, res_dir, meta,
                            spill_dir=tmp)                  # Features + nfe per batch in info

Each batch's features go to OUT/HxW/features/batch_NNNNNN.npz as soon as they exist (written to
a temporary name, then renamed), so an interrupted run samples only the missing batches: sample
i always uses noise from (seed, i) and the same label, so a resumed run makes the samples an
uninterrupted one would. OUT/HxW/features/meta.json records the settings; features made with
other settings are refused (or discarded with overwrite=True).

On several hosts (jax.distributed) each host samples the batches b with b % process_count ==
process_index on its own devices, with no cross-host traffic, and saves them to its OUT; the
features are gathered once per size (`gather_parts`), so every host returns all of them.
Sample i is the same whichever host makes it, so the scores equal one host's. OUT may be a
URL (gs://...): the parts are then objects there, written whole.
"""

from __future__ import annotations

import contextlib
import json

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from fitv2_jax.eval.features import (
    NUM_LOGITS,
    POOL_DIM,
    SPATIAL_DIM,
    FeatureAccumulator,
    Features,
)
from fitv2_jax.sampling.generate import SolverOptions
from fitv2_jax.sampling.images import display_scale, image_grid
from fitv2_jax.sampling.sampler import Sampler
from fitv2_jax.sampling.sizes import SizePlan
from fitv2_jax.utils import paths
from fitv2_jax.utils.errors import UserError
from fitv2_jax.utils.files import save_png, savez_atomic, write_json_atomic

PART = "batch_{:06d}.npz"
GRID_IMAGES = 16


def _saved_parts(feature_dir: str, batches: list[int]) -> dict[int, int]:
    """{batch: its sample count} of the complete batch files already saved (a half-written
    file never has the final name). Only the small `ids` member is read."""
    parts = {}
    for b in batches:
        path = paths.join(feature_dir, PART.format(b))
        if paths.isfile(path):
            with paths.load_npz(path) as f:
                parts[b] = len(f["ids"])
    return parts


def _read_part(feature_dir: str, b: int) -> dict[str, np.ndarray]:
    with paths.load_npz(paths.join(feature_dir, PART.format(b))) as f:
        return {k: f[k] for k in f.files}


def _check_meta(feature_dir: str, meta: dict, overwrite: bool) -> None:
    path = paths.join(feature_dir, "meta.json")
    if paths.isfile(path) and not overwrite:
        old = json.loads(paths.read_text(path))
        diff = {k: (old.get(k), v) for k, v in meta.items() if old.get(k) != v}
        if diff:
            raise UserError(
                f"{feature_dir} holds features made with other settings "
                f"({', '.join(f'{k}: {a} -> {b}' for k, (a, b) in diff.items())}); "
                "use another output directory or --overwrite"
            )
    if overwrite:
        for old_part in paths.glob(feature_dir, "batch_*.npz"):
            with contextlib.suppress(FileNotFoundError):  # another host sharing OUT was first
                paths.remove(old_part)
    paths.makedirs(feature_dir)
    write_json_atomic(path, meta, indent=2)


def _sample_missing_batches(sampler, inception, plan, labels, key, options, out_dir, todo,
                            progress, total, done):  # fmt: skip
    n, bs = len(labels), sampler.batch_size
    feature_dir = paths.join(out_dir, "features")
    bar = tqdm(total=total, desc=f"samples {plan.name}", unit="img", disable=not progress,
               leave=False)  # fmt: skip
    bar.update(done)
    for b in todo:
        ids = np.arange(b * bs, min((b + 1) * bs, n))
        images, nfe = sampler.plan_images(plan, ids, labels[ids], key, options)
        out = inception(images)
        part = dict(pool=out["pool"], spatial=out["spatial"], ids=ids, nfe=np.int64(nfe))
        if out["logits"] is not None:
            part["logits"] = out["logits"]
        savez_atomic(paths.join(feature_dir, PART.format(b)), **part)
        if b == 0:
            grid = image_grid(images[:GRID_IMAGES], scale=display_scale(*images.shape[1:3]))
            save_png(paths.join(out_dir, "grid.png"), grid)
        bar.update(len(ids))
    bar.close()


def _gather_chunked(x: np.ndarray, rows: int, chunk: int = 2048) -> np.ndarray:
    """(P, rows, ...) from every host's x (<= rows rows, zero-padded), in row chunks so a device
    never holds more than P x chunk rows at once."""
    x = np.concatenate([x, np.zeros((rows - len(x), *x.shape[1:]), x.dtype)])
    if rows == 0:
        return np.zeros((jax.process_count(), *x.shape), x.dtype)
    return np.concatenate([np.asarray(multihost_utils.process_allgather(x[i : i + chunk]))
                           for i in range(0, rows, chunk)], axis=1)  # fmt: skip


def gather_parts(feature_dir: str, num_batches: int, sizes: list[int],
                 has_logits: bool) -> list[dict]:  # fmt: skip
    """Every batch's saved part in batch order, each host contributing the batches it owns
    (b % process_count == process_index); sizes[b] = samples in batch b. One gather per key
    (a host may own no batch: the shapes come from the Inception's, not from the parts)."""
    pi, pc = jax.process_index(), jax.process_count()
    if pc == 1:
        return [_read_part(feature_dir, b) for b in range(num_batches)]
    owned = [[b for b in range(num_batches) if b % pc == p] for p in range(pc)]
    rows = max(sum(sizes[b] for b in bs) for bs in owned)
    mine = [_read_part(feature_dir, b) for b in owned[pi]]
    empty = {"pool": np.zeros((0, POOL_DIM), np.float32), "ids": np.zeros((0,), np.int64),
             "spatial": np.zeros((0, SPATIAL_DIM), np.float32),
             "logits": np.zeros((0, NUM_LOGITS), np.float32)}  # fmt: skip
    keys = ["pool", "spatial", "ids"] + (["logits"] if has_logits else [])
    gathered = {k: _gather_chunked(np.concatenate([empty[k]] + [m[k] for m in mine]), rows)
                for k in keys}  # fmt: skip
    nfe = _gather_chunked(np.asarray([int(m["nfe"]) for m in mine], np.int64),
                          max(len(bs) for bs in owned))  # fmt: skip
    parts: list[dict] = [{} for _ in range(num_batches)]
    for p, bs in enumerate(owned):
        start = 0
        for j, b in enumerate(bs):
            cut = slice(start, start + sizes[b])
            parts[b] = {k: gathered[k][p][cut] for k in keys} | {"nfe": nfe[p][j]}
            start += sizes[b]
    return parts


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
    reused_batches and new_batches (this host's). Memory does not grow with N on one host; on
    several, the gathered features of one size pass through RAM once.
    """
    n, bs = len(labels), sampler.batch_size
    num_batches = -(-n // bs)
    sizes = [min(bs, n - b * bs) for b in range(num_batches)]
    feature_dir = paths.join(out_dir, "features")
    _check_meta(feature_dir, dict(meta, batch_size=bs, num_samples=n), overwrite)
    if jax.process_count() > 1:  # no host writes a part before every host has cleared old ones
        multihost_utils.sync_global_devices(f"fitv2_jax features {plan.name}")
    mine = [b for b in range(num_batches) if b % jax.process_count() == jax.process_index()]
    saved = _saved_parts(feature_dir, mine)
    todo = [b for b in mine if b not in saved]
    _sample_missing_batches(sampler, inception, plan, labels, key, options, out_dir, todo,
                            progress, sum(sizes[b] for b in mine), sum(saved.values()))  # fmt: skip
    acc, nfe = FeatureAccumulator(spill_dir, plan.name.replace("x", "_"), keep_raw=True), []
    parts = gather_parts(
        feature_dir, num_batches, sizes, bool(getattr(inception, "has_logits", False))
    )
    for part in parts:  # in batch order
        acc.add(dict(pool=part["pool"], spatial=part["spatial"], logits=part.get("logits")))
        nfe.append(int(part["nfe"]))
    return acc.result(nfe=nfe, reused_batches=len(saved), new_batches=len(todo))
