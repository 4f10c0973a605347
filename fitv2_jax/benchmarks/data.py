"""Data pipeline benchmark: padding efficiency (bucketing, packing, pad-to-max) on an
ImageNet-like size distribution at 256 and 1024 max tokens, and the pipeline's examples/s.

    python -m fitv2_jax.bench --suite data [--images 20000] [--batch_size 256] [--repeats 3]

ImageNet-like sizes (an assumption, stated): 75% of images have a 500-px long side, the rest a
long side uniform in [200, 1600]; aspect ratios (long/short) are 4:3 45%, 3:2 15%, 1:1 10%,
16:9 5%, 5:4 10%, uniform in [1, 2.5] 15%; 70% landscape. Each image gets FiTv2's variants
(resize, plus the 256-style centre crop when both sides exceed S) via `preprocess`.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import grain
import numpy as np
from absl import flags
from array_record.python.array_record_module import ArrayRecordWriter

from fitv2_jax.cli import flags as cli
from fitv2_jax.config.defaults import data_defaults
from fitv2_jax.data.bucketing import BatchPlan, choose_buckets, variant_weights
from fitv2_jax.data.pipeline import make_train_iterator
from fitv2_jax.data.preprocess import crop_side, target_size
from fitv2_jax.data.records import array_name, encode_record, shard_stem
from fitv2_jax.utils.errors import UserError
from fitv2_jax.utils.files import write_json_atomic

FLAGS = flags.FLAGS

ASPECTS = [(4 / 3, 0.45), (1.5, 0.15), (1.0, 0.10), (16 / 9, 0.05), (1.25, 0.10), (None, 0.15)]


def imagenet_like_sizes(n: int, seed: int = 0) -> np.ndarray:
    """(n, 2) int (height, width) pixel sizes with an ImageNet-like aspect distribution."""
    rng = np.random.default_rng(seed)
    probs = np.array([p for _, p in ASPECTS])
    kinds = rng.choice(len(ASPECTS), size=n, p=probs / probs.sum())
    aspect = np.array([ASPECTS[k][0] or 0.0 for k in kinds])
    free = aspect == 0
    aspect[free] = rng.uniform(1.0, 2.5, free.sum())
    long = np.where(rng.random(n) < 0.75, 500, rng.integers(200, 1601, n))
    short = np.maximum(1, np.round(long / aspect)).astype(int)
    land = rng.random(n) < 0.7
    return np.stack([np.where(land, short, long), np.where(land, long, short)], 1)


def token_table(sizes: np.ndarray, max_tokens: int, patch: int = 2, down: int = 8) -> np.ndarray:
    """(N, 2) tokens of the (resize, crop) variants, 0 = absent; too-small images dropped."""
    m, side = patch * down, crop_side(max_tokens, patch, down)
    rows = []
    for h, w in sizes:
        t = target_size(int(h), int(w), max_tokens, patch, down)
        if t is None:
            continue
        crop = (side // m) ** 2 if (h > side and w > side) else 0
        rows.append(((t[0] // m) * (t[1] // m), crop))
    return np.asarray(rows, np.int32)


def packing_efficiency(tokens: np.ndarray, probs, length, batch, max_segments, seed=0) -> float:
    """Valid / total tokens of Grain's first-fit packer on these token counts (x is 1-wide)."""
    rng = np.random.default_rng(seed)
    choice = (rng.random(len(tokens))[:, None] > np.cumsum(probs, 1)).sum(1)
    lens = tokens[np.arange(len(tokens)), np.minimum(choice, tokens.shape[1] - 1)]
    ds = grain.MapDataset.source(list(lens)).map(
        lambda n: {"x": np.ones((n, 1), np.float32), "y": np.int32(0)}
    )
    packed = grain.experimental.FirstFitPackIterDataset(
        ds.to_iter_dataset(),
        length_struct={"x": length},
        num_packing_bins=4 * batch,
        seed=seed,
        meta_features=("y",),
        max_sequences_per_bin=max_segments,
    )
    valid = total = 0
    for row in packed:
        valid += int((row["x_segment_ids"] > 0).sum())
        total += length
    return valid / total


def _write_fake_latents(path: str, tokens: np.ndarray, max_tokens: int, n: int) -> None:
    """A prepared latent dataset of n records with these token counts (random latents)."""
    rng = np.random.default_rng(0)
    os.makedirs(path, exist_ok=True)
    stem = os.path.join(path, shard_stem("train", 0, 1))
    w = ArrayRecordWriter(stem + ".array_record", "group_size:1")
    toks = []
    for i in range(n):
        t = tokens[i % len(tokens)]
        fields, sizes, vs = {"label": i % 1000, "key": str(i)}, [], []
        for v, name in enumerate(("resize", "crop")):
            if t[v] == 0:
                continue
            h = int(np.sqrt(t[v]))
            while t[v] % h:
                h -= 1
            hw = (h, int(t[v]) // h)
            for f in (0, 1):
                fields[array_name(name, f)] = rng.normal(size=(2 * hw[0], 2 * hw[1], 4)).astype(
                    np.float32
                )
            sizes.append(hw)
            vs.append(name)
        fields.update(variants=vs, size=np.asarray(sizes, np.int32))
        fields["tokens"] = np.asarray([a * b for a, b in sizes], np.int32)
        w.write(encode_record(fields))
        toks.append([int(t[0]), int(t[1])])
    w.close()
    write_json_atomic(
        stem + ".json",
        {"read": n, "written": n, "skipped": 0, "skipped_by_reason": {}, "tokens": toks},
    )
    meta = {
        "format_version": 1,
        "encoder": {"kind": "latents", "stored_as": "float", "downsample": 8, "channels": 4},
        "patch_size": 2,
        "max_tokens": max_tokens,
        "min_tokens": 16,
        "variants": ["resize", "crop"],
        "num_classes": 1000,
        "class_names": [],
        "num_shards": {"train": 1},
    }
    write_json_atomic(os.path.join(path, "dataset.json"), meta)


def define_flags(module_name: str) -> None:
    m = module_name
    flags.DEFINE_integer("images", 100000, "synthetic ImageNet-like images", module_name=m)
    flags.DEFINE_integer("batch_size", 256, "global batch (images or rows)", module_name=m)
    flags.DEFINE_integer("pack_images", 10000, "images run through the packer", module_name=m)
    flags.DEFINE_integer("num_buckets", 8, "bucket lengths chosen", module_name=m)
    flags.DEFINE_integer("window", 0, "batches per sort window (0 = epoch)", module_name=m)
    flags.DEFINE_integer("records", 2048, "records for the examples/s run", module_name=m)
    flags.DEFINE_integer("steps", 20, "batches timed per repeat", module_name=m)
    flags.DEFINE_integer("repeats", 3, "timed runs of the pipeline, median reported",
                         module_name=m)  # fmt: skip
    for old, new in (("batch", "batch_size"), ("pack-images", "pack_images"),
                     ("num-buckets", "num_buckets")):  # fmt: skip
        cli.define_renamed(old, new)


def _padding_efficiency(sizes: np.ndarray) -> None:
    batch = FLAGS.batch_size
    print(
        f"padding efficiency (valid / padded tokens), {FLAGS.images} ImageNet-like images "
        f"({FLAGS.pack_images} for packing), global batch {batch}, Algorithm-1 variants "
        "at random; required: >= 0.97 with bucketing or packing"
    )
    print("max_tokens | pad-to-max | bucketing (buckets) | packing: rows of max_tokens, 4x")
    for max_tokens in (256, 1024):
        tok = token_table(sizes, max_tokens)
        probs = variant_weights(tok, "random")
        pad = BatchPlan(tok, batch, (max_tokens,), FLAGS.window, 0).efficiency()
        buckets = choose_buckets(tok.reshape(-1), probs.reshape(-1), FLAGS.num_buckets, 8)
        bucket = BatchPlan(tok, batch, buckets, FLAGS.window, 0).efficiency()
        sub = slice(0, FLAGS.pack_images)  # the packer runs in Python: a subset suffices
        pack1 = packing_efficiency(tok[sub], probs[sub], max_tokens, batch, 16)
        pack4 = packing_efficiency(tok[sub], probs[sub], 4 * max_tokens, max(batch // 4, 1), 16)
        print(f"{max_tokens:10d} | {pad:10.4f} | {bucket:.4f} {buckets} | {pack1:.4f}, {pack4:.4f}")


def _pipeline_rates(sizes: np.ndarray) -> None:
    batch, repeats = FLAGS.batch_size, FLAGS.repeats
    with tempfile.TemporaryDirectory() as d:
        tok = token_table(sizes[: FLAGS.records], 256)
        _write_fake_latents(d, tok, 256, FLAGS.records)
        for packing in (False, True):
            cfg = data_defaults()
            cfg.update(path=d, global_batch_size=batch, packing=packing, read_threads=2)
            rates = []
            for r in range(repeats):
                it = make_train_iterator(cfg, process_index=0, process_count=1, seed=r)
                next(it)  # warm-up: thread start, first reads
                t0 = time.perf_counter()
                n = 0
                for _ in range(FLAGS.steps):
                    b = next(it)
                    n += int(b["mask"].shape[0]) if not packing else int((b["index"] >= 0).sum())
                rates.append(n / (time.perf_counter() - t0))
            mode = "packing" if packing else "bucketing"
            print(
                f"pipeline {mode}: {statistics.median(rates):.0f} examples/s "
                f"(median of {repeats}; 256-token SD-VAE latents, batch {batch}, "
                f"{cfg.read_threads} read threads, this CPU)",
                flush=True,
            )


def main() -> None:
    names = ("images", "batch_size", "pack_images", "num_buckets", "records", "steps", "repeats")
    bad = [f"--{k} {FLAGS[k].value}" for k in names if FLAGS[k].value < 1]
    if bad or FLAGS.window < 0:
        raise UserError(f"{', '.join(bad) or '--window'}: give positive numbers (--window >= 0)")
    sizes = imagenet_like_sizes(FLAGS.images)
    _padding_efficiency(sizes)
    _pipeline_rates(sizes)
