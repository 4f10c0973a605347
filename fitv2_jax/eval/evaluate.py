"""Sample-and-score at several resolutions: FID / sFID / IS / precision / recall per resolution.

    results = evaluate(config, "workdir/checkpoints/20000", ["256x256", "160x320", "320x320"],
                       out_dir="eval/20000", num_samples=50_000, ref_npz="VIRTUAL_imagenet256.npz")
    results = evaluate(config, params, ["256x256", "224x448"], out_dir="eval/demo",
                       num_samples=64, ref_source="demo", ref_split="heldout")

For each resolution: samples are drawn batch by batch on the mesh, squashed to 299x299 by the
Inception and reduced to features on the fly (no PNG per sample); each batch's features are
saved as OUT/HxW/features/batch_NNNNNN.npz as soon as they exist, so an interrupted run resumes
at the first missing batch (sample i always uses noise from (seed, i) and the same label, so a
resumed run makes the samples an uninterrupted one would). The reference is an ADM .npz
(precomputed mu/sigma used when present) or a dataset source whose images are resized to cover
HxW and centre-cropped, i.e. real images at the matching aspect ratio; their statistics are cached
in OUT/reference/. Writes OUT/results.json, OUT/results.md (the paper's table layout), OUT/fid.png
(FID by resolution) and OUT/HxW/grid.png.

FID with fewer samples than feature dimensions uses the exact low-rank form of the trace term
(`frechet_distance`), seconds instead of a 2048x2048 sqrtm; otherwise ADM's computation on
statistics accumulated batch by batch. Memory does not grow with the number of samples: spatial
features are reduced on the fly, and sample pool features and logits wait in a temporary file
for precision/recall and IS, which work on fixed-size blocks.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from fitv2_jax import sampling

GRID_IMAGES = 16
PART = "batch_{:06d}.npz"


# ----------------------------------------------------------------------------- metrics


def frechet_distance(features: np.ndarray, mu_ref, sigma_ref, method: str = "sqrtm") -> float:
    """FID between sample features (N, D) and a reference N(mu_ref, sigma_ref), float64.

    With N - 1 < D the sample covariance is A^T A (A: centred features / sqrt(N - 1), N x D), and
    the nonzero eigenvalues of sigma_s sigma_ref equal those of A sigma_ref A^T (N x N, symmetric
    PSD): tr sqrt(sigma_s sigma_ref) = sum sqrt(eigvalsh(A sigma_ref A^T)), exact. Otherwise
    `metrics.fid` (ADM's sqrtm, or "eigh").
    """
    from fitv2_jax.eval import metrics

    x = np.asarray(features, np.float64)
    n, d = x.shape
    if n < 2:
        raise ValueError(f"FID needs at least 2 samples, got {n}")
    mu_ref, sigma_ref = np.asarray(mu_ref, np.float64), np.asarray(sigma_ref, np.float64)
    if n - 1 >= d:
        return metrics.fid(*metrics.feature_statistics(x), mu_ref, sigma_ref, method=method)
    mu = x.mean(axis=0)
    a = (x - mu) / math.sqrt(n - 1)
    ev = np.linalg.eigvalsh(a @ sigma_ref @ a.T)
    tr_sqrt = float(np.sqrt(np.clip(ev, 0, None)).sum())
    diff = mu - mu_ref
    return float(diff @ diff + np.sum(a * a) + np.trace(sigma_ref) - 2 * tr_sqrt)


# ----------------------------------------------------------------------------- references


def cover_crop(img, height: int, width: int) -> np.ndarray:
    """PIL image -> uint8 (height, width, 3): bicubic resize to cover, then a centred crop."""
    from PIL import Image

    w0, h0 = img.size
    scale = max(height / h0, width / w0)
    nw, nh = max(width, round(w0 * scale)), max(height, round(h0 * scale))
    img = img.convert("RGB").resize((nw, nh), resample=Image.Resampling.BICUBIC)
    left, top = (nw - width) // 2, (nh - height) // 2
    return np.asarray(img.crop((left, top, left + width, top + height)), np.uint8)


def _features_of(inception, batches, num_batches: int, desc: str, progress: bool) -> dict:
    """Pool features (N, 2048) and streamed statistics of uint8 image batches (see
    `metrics.features_from_batches`; the spatial features are reduced to (mu_s, sigma_s) on the
    fly, never kept)."""
    from fitv2_jax.eval import metrics

    def counted():
        n = 0
        for images in batches:
            n += len(images)
            yield images
        if n < 2:
            raise ValueError(f"{desc}: fewer than 2 usable images")

    return metrics.features_from_batches(
        inception, counted(), total=num_batches, desc=desc, progress=progress
    )


def source_reference(
    source,
    height: int,
    width: int,
    path: str,
    inception,
    *,
    num: int | None = None,
    batch_size: int = 32,
    description: str = "",
    progress: bool = True,
) -> dict:
    """Statistics of a dataset source's images cover-cropped to height x width, cached at `path`
    (ADM keys + `pool`, readable by `evaluate_npz`). Bad images are skipped and counted."""
    from fitv2_jax.data.images import BadImage
    from fitv2_jax.eval import metrics

    if os.path.isfile(path):
        ref = metrics.read_reference(path)
        if "pool" in ref and "mu" in ref:
            with np.load(path) as f:
                skipped = int(f["skipped"]) if "skipped" in f.files else 0
            return dict(ref, num=len(ref["pool"]), skipped=skipped, path=path, cached=True)
    n = len(source) if num is None else min(int(num), len(source))
    skipped = 0

    def batches():
        nonlocal skipped
        buf = []
        for i in range(n):
            try:
                buf.append(cover_crop(source[i].load(), height, width))
            except (BadImage, OSError, ValueError):
                skipped += 1
            if len(buf) == batch_size:
                yield np.stack(buf)
                buf = []
        if buf:
            yield np.stack(buf)

    name = f"{height}x{width}"
    num_batches = -(-n // batch_size)
    feats = _features_of(inception, batches(), num_batches, f"reference {name}", progress)
    (mu, sigma), (mu_s, sigma_s) = feats["stats"], feats["spatial_stats"]
    metrics.write_statistics(
        path + ".partial.npz", mu, sigma, mu_s, sigma_s, pool=feats["pool"],
        resolution=name, source=description, skipped=skipped,
    )  # fmt: skip
    os.replace(path + ".partial.npz", path)
    out = dict(mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s, pool=feats["pool"])
    return dict(out, num=len(feats["pool"]), skipped=skipped, path=path, cached=False)


def npz_reference(path: str, cache: str, inception, batch_size: int, progress: bool) -> dict:
    """An ADM reference .npz: precomputed statistics when present, the images' pool features
    for precision/recall (computed once, cached at `cache`)."""
    from fitv2_jax.eval import metrics
    from fitv2_jax.evaluate_npz import IMAGES_KEY, NpzImages, npz_keys

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--ref_npz {path}: file not found")
    ref = metrics.read_reference(path)
    if "mu" in ref and "pool" in ref:
        return dict(ref, num=len(ref["pool"]), path=path, cached=True)
    if os.path.isfile(cache):  # the file's own statistics win over the cached computed ones
        ref = {**metrics.read_reference(cache), **ref}
        return dict(ref, num=len(ref["pool"]), path=path, cached=True)
    if IMAGES_KEY not in npz_keys(path):
        raise KeyError(f"--ref_npz {path}: needs 'arr_0' images or 'pool' features with mu/sigma")
    images = NpzImages(path)
    num_batches = -(-len(images) // batch_size)
    feats = _features_of(inception, images.batches(batch_size), num_batches, "reference", progress)
    (mu, sigma), (mu_s, sigma_s) = feats["stats"], feats["spatial_stats"]
    metrics.write_statistics(cache + ".partial.npz", mu, sigma, mu_s, sigma_s, pool=feats["pool"])
    os.replace(cache + ".partial.npz", cache)
    computed = dict(mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s, pool=feats["pool"])
    computed.update({k: v for k, v in ref.items() if k in metrics.STAT_KEYS})  # precomputed win
    return dict(computed, num=len(feats["pool"]), path=path, cached=False)


# ----------------------------------------------------------------------------- samples


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
            raise ValueError(
                f"{feature_dir} holds features made with other settings "
                f"({', '.join(f'{k}: {a} -> {b}' for k, (a, b) in diff.items())}); "
                "use another output directory or overwrite=True (--overwrite)."
            )
    if overwrite:
        for old_part in glob.glob(os.path.join(feature_dir, "batch_*.npz")):
            os.remove(old_part)
    os.makedirs(feature_dir, exist_ok=True)
    with open(path, "w") as f:
        json.dump(meta, f, indent=2)


def sample_features(
    sampler: sampling.Sampler,
    inception,
    height: int,
    width: int,
    patches: tuple[int, int],
    labels: np.ndarray,
    key,
    out_dir: str,
    meta: dict,
    gen_opts: dict,
    *,
    spill_dir: str,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Inception features of len(labels) samples at height x width, resumable batch by batch.

    Returns pool (N, 2048) and logits (N, 1008) or None as FeatureFiles in spill_dir, stats =
    (mu, sigma) and spatial_stats = (mu_s, sigma_s) accumulated over the saved batches, and,
    when N is at most the feature dimension (where `frechet_distance` uses the features
    themselves), the features in memory as `few` = dict(pool, spatial). Memory does not grow
    with N beyond that.
    """
    from PIL import Image
    from tqdm.auto import tqdm

    from fitv2_jax.eval.feature_file import FeatureFile
    from fitv2_jax.eval.inception import POOL_DIM, SPATIAL_DIM
    from fitv2_jax.eval.metrics import RunningStatistics

    n, bs = len(labels), sampler.batch_size
    num_batches = -(-n // bs)
    feature_dir = os.path.join(out_dir, "features")
    _check_meta(feature_dir, dict(meta, batch_size=bs, num_samples=n), overwrite)
    saved = _saved_parts(feature_dir, num_batches)
    reused = len(saved)
    name = f"{height}x{width}"
    todo = [b for b in range(num_batches) if b not in saved]
    bar = tqdm(total=n, desc=f"samples {name}", unit="img", disable=not progress, leave=False)
    bar.update(sum(saved.values()))
    for b in todo:
        ids = np.arange(b * bs, min((b + 1) * bs, n))
        images, nfe = sampler.images(*patches, ids, labels[ids], key, **gen_opts)
        out = inception(images)
        part = dict(pool=out["pool"], spatial=out["spatial"], ids=ids, nfe=np.int64(nfe))
        if out["logits"] is not None:
            part["logits"] = out["logits"]
        tmp = os.path.join(feature_dir, f".{PART.format(b)}.partial.npz")
        np.savez(tmp, **part)
        os.replace(tmp, os.path.join(feature_dir, PART.format(b)))
        if b == 0:
            Image.fromarray(sampling.image_grid(images[:GRID_IMAGES])).save(
                os.path.join(out_dir, "grid.png")
            )
        bar.update(len(ids))
    bar.close()

    # One pass over the saved batches, in order: statistics, features to disk.
    tag = name.replace("x", "_")
    pool = FeatureFile(os.path.join(spill_dir, f"{tag}_pool.f32"), POOL_DIM)
    logits, nfe, few = None, [], n <= max(POOL_DIM, SPATIAL_DIM)
    stats, spatial_stats = RunningStatistics(POOL_DIM), RunningStatistics(SPATIAL_DIM)
    few_parts = {"pool": [], "spatial": []}
    for b in range(num_batches):
        part = _read_part(feature_dir, b)
        pool.append(part["pool"])
        stats.update(part["pool"])
        spatial_stats.update(part["spatial"])
        if b == 0 and "logits" in part:
            logits = FeatureFile(
                os.path.join(spill_dir, f"{tag}_logits.f32"), part["logits"].shape[1]
            )
        if logits is not None:
            if "logits" not in part:  # a resumed run with other weights is refused by meta
                raise ValueError(f"{feature_dir}: {PART.format(b)} has no logits, batch 0 has")
            logits.append(part["logits"])
        nfe.append(int(part["nfe"]))
        if few:
            few_parts["pool"].append(part["pool"])
            few_parts["spatial"].append(part["spatial"])
    return dict(
        pool=pool,
        logits=logits,
        stats=stats.result(),
        spatial_stats=spatial_stats.result(),
        few={k: np.concatenate(v) for k, v in few_parts.items()} if few else None,
        nfe=nfe,
        reused_batches=reused,
        new_batches=len(todo),
    )


# ----------------------------------------------------------------------------- reports


METRICS = (("fid", "FID"), ("sfid", "sFID"), ("inception_score", "IS"), ("precision", "Prec"),
           ("recall", "Rec"))  # fmt: skip


def fmt_metric(v, digits=2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def results_markdown(results: dict) -> str:
    """The paper's layout (one row per model, FID / sFID / IS / Prec / Rec per resolution), then a
    long table with the sampling settings of each resolution."""
    res = results["resolutions"]
    names = list(res)
    head = "| model | " + " | ".join(names) + " |"
    rule = "|---|" + "---|" * len(names)
    cells = [
        " / ".join(fmt_metric(r[k], 3 if k in ("precision", "recall") else 2) for k, _ in METRICS)
        for r in res.values()
    ]
    lines = [
        f"# Evaluation of {results['model']}",
        "",
        "FID / sFID / IS / Prec / Rec per resolution (IS '-' when the Inception weights have no "
        "1008-way layer).",
        "",
        head,
        rule,
        f"| {results['model']} | " + " | ".join(cells) + " |",
        "",
        "| resolution | RoPE rule | CFG | FID | sFID | IS | Prec | Rec | samples | reference | "
        "NFE/batch |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in res.items():
        nums = " | ".join(
            fmt_metric(r[k], 3 if k in ("precision", "recall") else 2) for k, _ in METRICS
        )
        nfe = f"{np.mean(r['nfe_per_batch']):.0f}"
        lines.append(
            f"| {name} | {r['rule']} | {r['cfg_scale']:g} | {nums} | {r['num_samples']} | "
            f"{r['num_reference']} ({r['reference']}) | {nfe} |"
        )
    lines += ["", f"Settings: `{json.dumps(results['settings'])}`", ""]
    return "\n".join(lines)


def fid_chart(results: dict, path: str) -> str:
    """Bar chart of FID by resolution (Agg backend, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- entry point


def _as_sizes(resolutions) -> list[tuple[int, int]]:
    if isinstance(resolutions, str):
        return sampling.parse_sizes(resolutions)
    sizes = [sampling.parse_size(r) if isinstance(r, str) else tuple(map(int, r))
             for r in resolutions]  # fmt: skip
    return list(dict.fromkeys(sizes))


def _per_size(value, sizes, convert, what):
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            s = sampling.parse_size(k) if isinstance(k, str) else tuple(k)
            if s not in sizes:
                raise ValueError(f"{what}: {k} is not one of the resolutions")
            out[s] = convert(v)
        return {s: out.get(s) for s in sizes}
    return sampling.parse_per_size(value, sizes, convert, what)


def evaluate(
    config,
    params_or_checkpoint,
    resolutions: str | Sequence,
    *,
    out_dir: str,
    num_samples: int = 50_000,
    rules: str | dict = "auto",
    cfg_scales: float | str | dict = 1.5,
    solver: str = "dopri5",
    num_steps: int = 250,
    atol: float = 1e-6,
    rtol: float = 1e-3,
    cfg_channels: str = "official",
    scale_pow: float = 0.0,
    cfg_interval: tuple[float, float] | None = None,
    cfg_state: str = "official",
    seed: int = 0,
    batch_size: int = 32,
    ref_npz: str | dict | None = None,
    ref_source: Any = None,
    ref_root: str | None = None,
    ref_split: str = "val",
    num_ref: int | None = None,
    vae=None,
    inception=None,
    inception_weights: str | None = None,
    mesh=None,
    fid_method: str = "sqrtm",
    use_ema: bool = True,
    model_name: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    k: int = 3,
    ref_cache_dir: str | None = None,
) -> dict:
    """Samples and scores `config`'s model at each resolution; returns the results dict (also
    written to out_dir, see the module docstring).

    params_or_checkpoint: a params pytree or any path `load_inference_params` reads.
    resolutions: 'HxW,HxW' or a list of 'HxW' / (H, W). rules, cfg_scales: one value for all or
    per resolution ('256x256=none,320x320=vision-ntk' or a dict); rule 'auto' = the paper's.
    Reference: ref_npz (an ADM .npz for all resolutions, or a dict per resolution) or ref_source
    ('demo', 'folder', 'imagenet', 'tfds' with ref_root/ref_split, or a source object).
    vae: a loaded VAE for latent configs (default: load_vae(config.vae_path)). inception: a
    loaded `Inception` (default `load_inception(inception_weights)`). ref_cache_dir: where the
    reference statistics are cached (default OUT/reference); share it across checkpoints.
    """
    import jax

    from fitv2_jax.eval import metrics

    t_start = time.time()
    if jax.process_count() > 1:
        raise ValueError(
            "evaluate runs on one host (with all its devices); on a multi-host slice run it on "
            "one host, or sample with `python -m fitv2_jax.sample` on all hosts and score the "
            ".npz files with `python -m fitv2_jax.evaluate_npz`."
        )
    sizes = _as_sizes(resolutions)
    if (ref_npz is None) == (ref_source is None):
        raise ValueError("Give exactly one reference: ref_npz (--ref_npz) or ref_source.")
    if num_samples < 2 or num_samples <= k:
        raise ValueError(f"num_samples={num_samples}: need more than k={k} for precision/recall")
    latent = sampling.is_latent(config)
    if latent and vae is None:
        if not config.get("vae_path"):
            raise ValueError("A latent-space config needs a VAE: pass vae= / --vae PATH.")
        from fitv2_jax.models.vae import load_vae

        vae = load_vae(config.vae_path)
    multiple = sampling.size_multiple(config, vae)
    patches = {s: sampling.patches_for(*s, multiple) for s in sizes}
    rule_of = _per_size(rules, sizes, str, "rules")
    rule_of = {s: sampling.resolve_rule(r, config.model, *patches[s]) for s, r in rule_of.items()}
    cfg_of = _per_size(cfg_scales, sizes, float, "cfg_scales")
    if any(v is None for v in cfg_of.values()):
        raise ValueError(f"cfg_scales={cfg_scales!r} gives no value for some resolutions")
    ref_npz_of = _per_size(ref_npz, sizes, str, "ref_npz") if ref_npz is not None else None
    if ref_npz_of is not None and any(v is None for v in ref_npz_of.values()):
        raise ValueError(f"ref_npz={ref_npz!r} gives no file for some resolutions")
    for path in set((ref_npz_of or {}).values()):  # fail before hours of sampling
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--ref_npz {path}: file not found")
        metrics.read_reference(path, with_pool=False)  # validates the statistics only

    source, source_desc = ref_source, None
    if isinstance(ref_source, str):
        from fitv2_jax.data.sources import open_source

        source = open_source(ref_source, root=ref_root, split=ref_split)
        source_desc = f"{ref_source}:{ref_split}" + (f":{ref_root}" if ref_root else "")
    elif ref_source is not None:
        source_desc = type(ref_source).__name__

    checkpoint = None
    params = params_or_checkpoint
    if isinstance(params_or_checkpoint, str | os.PathLike):
        from fitv2_jax.training.checkpoint import load_inference_params

        checkpoint = os.path.abspath(params_or_checkpoint)
        params = load_inference_params(checkpoint, config.model, use_ema=use_ema)
    if inception is None:
        from fitv2_jax.eval.inception import load_inception

        inception = load_inception(inception_weights, batch_size=batch_size)
    if mesh is None:
        from fitv2_jax.parallel.mesh import create_mesh

        mesh = create_mesh((-1, 1, 1))
    sampler = sampling.Sampler(
        config.model, params, mesh, vae=vae, latent=latent, batch_size=batch_size
    )
    num_classes = int(config.model.num_classes)
    labels = np.random.default_rng([seed, 1]).integers(0, num_classes, num_samples)
    key = jax.random.key(seed)
    out_dir = os.path.abspath(out_dir)
    # reference statistics do not depend on the model: evaluations of several checkpoints can
    # share one cache directory
    ref_cache = os.path.abspath(ref_cache_dir or os.path.join(out_dir, "reference"))
    os.makedirs(ref_cache, exist_ok=True)
    model_name = model_name or (
        os.path.basename(checkpoint.rstrip("/")) if checkpoint else "params"
    )
    settings = dict(
        num_samples=num_samples, solver=solver,
        num_steps=None if solver == "dopri5" else num_steps, atol=atol, rtol=rtol,
        cfg_channels=cfg_channels, scale_pow=scale_pow,
        cfg_interval=None if cfg_interval is None else list(cfg_interval), cfg_state=cfg_state,
        seed=seed, batch_size=sampler.batch_size, params="ema" if use_ema else "raw",
        checkpoint=checkpoint, fid_method=fid_method, k=k,
    )  # fmt: skip
    results = dict(model=model_name, settings=settings, resolutions={})
    # Sample pool features and logits wait here for the metrics (12 KB per sample), not in RAM;
    # removed at the end (or, after a crash, by the finalizer at exit).
    spill = tempfile.TemporaryDirectory(prefix="fitv2_eval_")
    for size in sizes:
        t0 = time.time()
        name = sampling.size_name(*size)
        res_dir = os.path.join(out_dir, name)
        os.makedirs(res_dir, exist_ok=True)
        gen_opts = dict(
            rule=rule_of[size], cfg_scale=cfg_of[size], method=solver, num_steps=num_steps,
            atol=atol, rtol=rtol, channels=cfg_channels, scale_pow=scale_pow,
            interval=None if cfg_interval is None else tuple(cfg_interval),
            doubled_state=cfg_state == "official",
        )  # fmt: skip
        meta = {k: v for k, v in settings.items() if k not in ("fid_method", "k")}  # scoring only
        meta.update(rule=rule_of[size], cfg_scale=cfg_of[size], resolution=name)
        feats = sample_features(
            sampler, inception, *size, patches[size], labels, key, res_dir, meta, gen_opts,
            spill_dir=spill.name, overwrite=overwrite, progress=progress,
        )  # fmt: skip
        if ref_npz_of is not None:
            path = ref_npz_of[size]
            stem = os.path.basename(path).replace(".npz", "")
            tag = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:8]
            cache = os.path.join(ref_cache, f"{stem}_{tag}_pool.npz")
            ref = npz_reference(path, cache, inception, batch_size, progress)
            ref_desc = os.path.basename(path)
        else:
            tag = "".join(c if c.isalnum() else "_" for c in source_desc)
            n_tag = "all" if num_ref is None else str(num_ref)
            path = os.path.join(ref_cache, f"{tag}_{name}_n{n_tag}.npz")
            ref = source_reference(
                source, *size, path, inception, num=num_ref, batch_size=batch_size,
                description=source_desc, progress=progress,
            )  # fmt: skip
            ref_desc = f"{source_desc} cover-cropped to {name}"
        if feats["few"] is not None:  # exact low-rank form on the features themselves
            fid = frechet_distance(feats["few"]["pool"], ref["mu"], ref["sigma"], fid_method)
            sfid = frechet_distance(
                feats["few"]["spatial"], ref["mu_s"], ref["sigma_s"], fid_method
            )
        else:
            fid = metrics.fid(*feats["stats"], ref["mu"], ref["sigma"], method=fid_method)
            sfid = metrics.fid(
                *feats["spatial_stats"], ref["mu_s"], ref["sigma_s"], method=fid_method
            )
        prec = rec = None
        if "pool" in ref and len(ref["pool"]) > k:
            prec, rec = metrics.precision_recall(ref["pool"], feats["pool"], k=k)
        isc = None
        if feats["logits"] is not None:
            isc = metrics.inception_score(feats["logits"], split_size=5000)
        results["resolutions"][name] = dict(
            height=size[0], width=size[1], patches=list(patches[size]),
            tokens=patches[size][0] * patches[size][1], rule=rule_of[size],
            cfg_scale=cfg_of[size], fid=fid, sfid=sfid, inception_score=isc, precision=prec,
            recall=rec, num_samples=len(feats["pool"]), num_reference=int(ref["num"]),
            reference=ref_desc, reference_file=ref.get("path"),
            nfe_per_batch=feats["nfe"], reused_batches=feats["reused_batches"],
            new_batches=feats["new_batches"], grid=os.path.join(res_dir, "grid.png"),
            seconds=round(time.time() - t0, 2),
        )  # fmt: skip
        for store in (feats["pool"], feats["logits"]):
            if store is not None:
                store.close()
                os.remove(store.path)
        _write_reports(results, out_dir)  # after every resolution: partial results are kept
    spill.cleanup()
    results["seconds"] = round(time.time() - t_start, 2)
    _write_reports(results, out_dir)
    fid_chart(results, os.path.join(out_dir, "fid.png"))
    return results


def _write_reports(results: dict, out_dir: str) -> None:
    tmp = os.path.join(out_dir, "results.json.partial")
    with open(tmp, "w") as f:
        json.dump(results, f, indent=2)
    os.replace(tmp, os.path.join(out_dir, "results.json"))
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(results_markdown(results))
