"""Reference statistics: ADM reference batches, and real images cover-cropped to each size.

    ref = npz_reference("VIRTUAL_imagenet256_labeled.npz", cache, inception)  # its mu/sigma win
    ref = source_reference(source, 160, 320, cache, inception)    # real images at 160x320
    stats = read_reference(path); write_statistics(path, mu, sigma, mu_s, sigma_s, pool=pool)

Both return `Features`. Statistics files use ADM's keys (`mu`, `sigma`, `mu_s`, `sigma_s`, plus
the reference pool features under `pool`, so precision/recall work without the images); ADM's
evaluator and `python -m fitv2_jax.evaluate_npz` read them. The cache directory may be a URL
(gs://...); reference .npz inputs are local files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import zipfile

import numpy as np
from PIL import Image

from fitv2_jax.data.images import BadImage
from fitv2_jax.data.npz import IMAGES_KEY, NpzArray, NpzImages, npz_keys
from fitv2_jax.data.sources import open_source
from fitv2_jax.eval.features import Features, features_from_batches
from fitv2_jax.sampling.sizes import parse_per_size, size_name
from fitv2_jax.utils import paths
from fitv2_jax.utils.errors import MissingFileError, UserError
from fitv2_jax.utils.files import savez_atomic

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


@dataclasses.dataclass(frozen=True)
class Reference:
    """Where each size's reference statistics come from: give `npz` or `source`.

    npz: an ADM reference .npz for all sizes, or {"HxW": path} / "HxW=a.npz,HxW=b.npz" per size.
    source: demo | folder | imagenet | tfds (with root, split) or a source object: real images
    resized to cover each size and centre-cropped; `num` of them (None: all). cache_dir: where
    computed statistics are kept (share it across checkpoints).
    """

    npz: str | dict | None = None
    source: object = None
    root: str | None = None
    split: str = "val"
    num: int | None = None
    cache_dir: str | None = None

    def __post_init__(self):
        if (self.npz is None) == (self.source is None):
            raise UserError("give one reference: --ref_npz FILE or --ref_source NAME")
        if self.source in ("folder", "imagenet") and not self.root:
            raise UserError(f"--ref_source {self.source} needs --ref_root PATH")
        if self.num is not None and self.num < 2:
            raise UserError(f"--num_ref {self.num}: give at least 2 reference images")


def read_reference(path: str, with_pool: bool = True) -> dict[str, np.ndarray]:
    """The precomputed statistics (mu, sigma, mu_s, sigma_s) and `pool` features of a reference
    .npz, whichever it has (images under `arr_0` are left on disk: stream them separately; so is
    `pool` with with_pool=False)."""
    if not paths.isfile(path):
        raise MissingFileError(f"{path}: reference file not found")
    out = {}
    with paths.load_npz(path) as f:
        keys = set(f.files)
        present = [k for k in STAT_KEYS if k in keys]
        if present and len(present) != len(STAT_KEYS):
            missing = [k for k in STAT_KEYS if k not in keys]
            raise UserError(f"{path}: has {present} but lacks {missing}; needs all four or none")
        for k in (*present, *(["pool"] if with_pool and "pool" in keys else [])):
            out[k] = f[k]
    if "mu" in out:
        for mu, sigma in (("mu", "sigma"), ("mu_s", "sigma_s")):
            d = out[mu].shape
            if len(d) != 1 or out[sigma].shape != (d[0], d[0]):
                raise UserError(
                    f"{path}: '{mu}' {out[mu].shape} and '{sigma}' {out[sigma].shape} must be "
                    "(D,) and (D, D)"
                )
    return out


def write_statistics(
    path: str,
    mu: np.ndarray,
    sigma: np.ndarray,
    mu_s: np.ndarray,
    sigma_s: np.ndarray,
    pool: np.ndarray | None = None,
    **meta,
) -> str:
    """Write statistics in ADM's keys (readable by ADM's evaluator and `read_reference`).

    pool: optional (N, 2048) reference features for precision/recall; meta: extra small arrays
    or strings (e.g. resolution="256x256", source="imagenet/val").
    """
    arrays = {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}
    if pool is not None:
        arrays["pool"] = np.asarray(pool, np.float32)
    arrays.update({k: np.asarray(v) for k, v in meta.items()})
    paths.makedirs(paths.dirname(paths.absolute(path)))
    return savez_atomic(path, **arrays)  # hosts sharing a cache never share a temporary file


def cover_crop(img: Image.Image, height: int, width: int) -> np.ndarray:
    """PIL image -> uint8 (height, width, 3): bicubic resize to cover, then a centred crop."""
    w0, h0 = img.size
    scale = max(height / h0, width / w0)
    nw, nh = max(width, round(w0 * scale)), max(height, round(h0 * scale))
    img = img.convert("RGB").resize((nw, nh), resample=Image.Resampling.BICUBIC)
    left, top = (nw - width) // 2, (nh - height) // 2
    return np.asarray(img.crop((left, top, left + width, top + height)), np.uint8)


def _features_from_file(file: str, **info) -> Features:
    ref = read_reference(file)
    stats = (ref["mu"], ref["sigma"]), (ref["mu_s"], ref["sigma_s"])
    return Features(*stats, pool=ref.get("pool"), num=len(ref.get("pool", ())), info=info)


def source_reference(source, height: int, width: int, path: str, inception, *,
                     num: int | None = None, batch_size: int = 32, description: str = "",
                     progress: bool = True) -> Features:  # fmt: skip
    """Features of a dataset source's images cover-cropped to height x width, cached at `path`.
    Images that cannot be read are skipped and counted in info["skipped"]."""
    if paths.isfile(path):
        with paths.load_npz(path) as f:
            skipped = int(f["skipped"]) if "skipped" in f.files else 0
        return _features_from_file(path, path=path, cached=True, skipped=skipped)
    n = len(source) if num is None else min(int(num), len(source))
    skipped = []

    def batches():
        buf = []
        for i in range(n):
            try:
                buf.append(cover_crop(source[i].load(), height, width))
            except (BadImage, OSError, ValueError) as e:
                skipped.append(f"{getattr(source[i], 'key', i)}: {e}")
            if len(buf) == batch_size:
                yield np.stack(buf)
                buf = []
        if buf:
            yield np.stack(buf)

    name = f"{height}x{width}"
    feats = features_from_batches(inception, batches(), -(-n // batch_size),
                                  f"reference {name}", progress=progress)  # fmt: skip
    write_statistics(path, *feats.stats, *feats.spatial_stats, pool=feats.pool,
                     resolution=name, source=description, skipped=len(skipped))  # fmt: skip
    feats.info = dict(path=path, cached=False, skipped=len(skipped), skipped_images=skipped[:20])
    return feats


def npz_reference(path: str, cache: str, inception, batch_size: int = 32,
                  progress: bool = True) -> Features:  # fmt: skip
    """An ADM reference .npz: its precomputed statistics when present, and the pool features of
    its images for precision/recall (computed once, cached at `cache`)."""
    if not os.path.isfile(path):
        raise MissingFileError(f"--ref_npz {path}: file not found")
    ref = read_reference(path)
    if "mu" in ref and "pool" in ref:
        return _features_from_file(path, path=path, cached=True)
    if paths.isfile(cache):  # the file's own statistics win over the cached computed ones
        feats = _features_from_file(cache, path=path, cached=True)
    else:
        if IMAGES_KEY not in npz_keys(path):
            raise UserError(f"--ref_npz {path}: needs 'arr_0' images or 'pool' features with "
                            "mu/sigma")  # fmt: skip
        images = NpzImages(path)
        feats = features_from_batches(inception, images.batches(batch_size),
                                      -(-len(images) // batch_size), "reference", progress=progress)  # fmt: skip
        write_statistics(cache, *feats.stats, *feats.spatial_stats, pool=feats.pool)
        feats.info = dict(path=path, cached=False)
    if "mu" in ref:
        feats.stats, feats.spatial_stats = (ref["mu"], ref["sigma"]), (ref["mu_s"], ref["sigma_s"])
        feats.raw = None  # the file's statistics, not these images', define the reference
    return feats


def reference_features(reference: Reference, height: int, width: int, inception, *,
                       cache_dir: str, batch_size: int = 32, progress: bool = True) -> Features:  # fmt: skip
    """The reference `Features` for one size, computed or read from `cache_dir`."""
    name = f"{height}x{width}"
    if reference.npz is not None:
        path = npz_for_size(reference, (height, width))
        stem = os.path.basename(path).replace(".npz", "")
        tag = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:8]
        feats = npz_reference(path, paths.join(cache_dir, f"{stem}_{tag}_pool.npz"), inception,
                              batch_size, progress)  # fmt: skip
        feats.info["description"] = os.path.basename(path)
        return feats
    source, desc = reference.source, type(reference.source).__name__
    if isinstance(source, str):
        desc = f"{source}:{reference.split}" + (f":{reference.root}" if reference.root else "")
        source = open_source(source, root=reference.root, split=reference.split)
    tag = "".join(c if c.isalnum() else "_" for c in desc)
    n_tag = "all" if reference.num is None else str(reference.num)
    path = paths.join(cache_dir, f"{tag}_{name}_n{n_tag}.npz")
    feats = source_reference(source, height, width, path, inception, num=reference.num,
                             batch_size=batch_size, description=desc, progress=progress)  # fmt: skip
    feats.info["description"] = f"{desc} cover-cropped to {name}"
    if feats.info.get("skipped"):
        examples = "; ".join(feats.info.get("skipped_images", [])[:3])
        print(f"warning: {feats.info['skipped']} reference images of {desc} could not be read "
              f"and were left out of {name}'s statistics ({examples or 'see ' + path})",
              file=sys.stderr, flush=True)  # fmt: skip
    return feats


def npz_for_size(reference: Reference, size: tuple[int, int]) -> str:
    """The reference .npz of one size (one file for all, or per size)."""
    path = parse_per_size(reference.npz, [size], str, "--ref_npz")[size]
    if path is None:
        raise UserError(f"--ref_npz {reference.npz!r} gives no file for {size_name(*size)}")
    return path


def check_reference_files(reference: Reference, plans) -> None:
    """Every reference .npz exists and holds images or statistics with pool features, all
    well-formed (checked from the headers: no image is read)."""
    if reference.npz is None:
        return
    for path in {npz_for_size(reference, (p.height, p.width)) for p in plans}:
        if not os.path.isfile(path):
            raise MissingFileError(f"--ref_npz {path}: file not found")
        images, pre = check_archive(path, "reference")
        if images is None and "mu" not in pre:
            raise UserError(f"--ref_npz {path}: no images and no statistics")


def check_archive(path: str, role: str) -> tuple[NpzImages | None, dict]:
    """Validates one input before any work. Returns its images (None for a reference made of
    `pool` features) and its precomputed statistics (without the pool). Errors name the file
    and the key."""
    if not os.path.isfile(path):
        raise MissingFileError(f"{path}: {role} file not found")
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path}: {role} is not an .npz archive (expected np.savez output)")
    keys = npz_keys(path)
    pre = read_reference(path, with_pool=False)  # checks mu/sigma/mu_s/sigma_s when present
    if IMAGES_KEY in keys:
        return NpzImages(path), pre
    if role == "reference" and "pool" in keys and "mu" in pre:
        pool = NpzArray(path, "pool")
        if len(pool.shape) != 2 or pool.shape[1] != pre["mu"].shape[0]:
            raise UserError(f"{path}: 'pool' has shape {pool.shape}; expected (N, "
                            f"{pre['mu'].shape[0]}) features matching 'mu'")  # fmt: skip
        return None, pre
    need = "'arr_0' (images), or 'pool' features with 'mu', 'sigma', 'mu_s', 'sigma_s'"
    raise UserError(f"{path}: no {need if role == 'reference' else repr(IMAGES_KEY)} in the "
                    f"{role} archive (it has {sorted(keys)})")  # fmt: skip
