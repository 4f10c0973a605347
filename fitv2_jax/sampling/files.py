"""Sample to files: per size PNGs, a grid and an ADM .npz, plus a JSON record of the run.

    info = sample_to_files(sampler, plans, labels, jax.random.key(0), SolverOptions(), "samples/xl")

Output, per size: OUT/HxW/000000.png ..., OUT/HxW/grid.png and OUT/HxW/samples_HxW.npz (arr_0:
uint8 N x H x W x 3, the input of `python -m fitv2_jax.evaluate_npz` and ADM's evaluator; arr_1:
the class labels), plus OUT/sample_info.json with every setting and the solver's evaluations.
On several hosts every host samples its share and the first host writes. OUT may be a URL
(gs://...): every file is then an object written whole.
"""

from __future__ import annotations

import time

import jax
import numpy as np
from tqdm.auto import tqdm

from fitv2_jax.data.npz import NpzStreamWriter
from fitv2_jax.sampling.generate import SolverOptions
from fitv2_jax.sampling.images import display_scale, image_grid
from fitv2_jax.sampling.sampler import Sampler
from fitv2_jax.sampling.sizes import SizePlan
from fitv2_jax.utils import paths
from fitv2_jax.utils.files import save_png, write_json_atomic


def _sample_one_size(sampler, plan, labels, key, options, size_dir, png, grid_images, bar):
    """All samples of one size; returns (nfe per batch, npz path or None when not writing)."""
    n, bs = len(labels), sampler.batch_size
    writes = jax.process_index() == 0
    npz_path = paths.join(size_dir, f"samples_{plan.name}.npz")
    if writes:
        paths.makedirs(size_dir)
        npz = NpzStreamWriter(npz_path, (n, plan.height, plan.width, 3))
    grid, nfes = [], []
    try:
        for start in range(0, n, bs):
            ids = np.arange(start, min(start + bs, n))
            images, nfe = sampler.plan_images(plan, ids, labels[ids], key, options)
            nfes.append(nfe)
            bar.update(len(ids))
            if not writes:
                continue
            npz.write(images)
            if png:
                for i, img in zip(ids, images, strict=True):
                    save_png(paths.join(size_dir, f"{i:06d}.png"), img)
            grid.extend(images[: max(0, grid_images - len(grid))])
    except BaseException:
        if writes:
            npz.abort()
        raise
    if writes:
        npz.close(arr_1=labels.astype(np.int64))
        grid = image_grid(np.stack(grid), scale=display_scale(plan.height, plan.width))
        save_png(paths.join(size_dir, "grid.png"), grid)
    return nfes, npz_path


def sample_to_files(
    sampler: Sampler,
    plans: list[SizePlan],
    labels: np.ndarray,
    key: jax.Array,
    options: SolverOptions,
    out_dir: str,
    *,
    png: bool = True,
    grid_images: int = 64,
    progress: bool = True,
    info: dict | None = None,
) -> dict:
    """len(labels) samples at every planned size (sample i: label i, noise from (key, i)).
    Returns the sample_info dict (also written as OUT/sample_info.json): `info` plus settings,
    and per size its rule, CFG scale, evaluations per batch, seconds and files."""
    for plan in plans:  # every size fits before anything is written
        sampler.check_fits(plan.h, plan.w)
    out_dir = paths.absolute(out_dir)
    if jax.process_index() == 0:  # the writer
        paths.check_writable_dir(out_dir, "--out")
    info = dict(info or {}, **options.describe(), batch_size=sampler.batch_size,
                devices=int(sampler.mesh.devices.size), sizes={})  # fmt: skip
    bar = tqdm(total=len(plans) * len(labels), unit="img", disable=not progress, desc="sampling")
    for plan in plans:
        bar.set_description(f"sampling {plan.name} ({plan.rule}, cfg {plan.cfg_scale:g})")
        size_dir, start = paths.join(out_dir, plan.name), time.time()
        nfes, npz = _sample_one_size(sampler, plan, labels, key, options, size_dir, png,
                                     grid_images, bar)  # fmt: skip
        info["sizes"][plan.name] = dict(
            height=plan.height, width=plan.width, patches=[plan.h, plan.w], tokens=plan.tokens,
            rule=plan.rule, cfg_scale=plan.cfg_scale, nfe_per_batch=nfes,
            seconds=round(time.time() - start, 2), npz=npz,
            grid=paths.join(size_dir, "grid.png"),
        )  # fmt: skip
    bar.close()
    info["labels"] = np.asarray(labels).tolist()
    if jax.process_index() == 0:
        write_json_atomic(paths.join(out_dir, "sample_info.json"), info, indent=2)
    return info
