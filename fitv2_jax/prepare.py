r"""Prepare a dataset once: preprocess (FiT resize rule + Algorithm-1 crop, both flips), encode
(pixels or SD-VAE latents) and write ArrayRecord shards that `fitv2_jax.data.pipeline` reads.

  # the offline demo set, pixel space, 64 tokens of 2x2 patches (16x16-pixel images):
  python -m fitv2_jax.prepare --source demo --out /tmp/demo_px --max-tokens 64 --patch-size 2
  # ImageNet train as SD-VAE latents for 256-token pre-training:
  python -m fitv2_jax.prepare --source imagenet --root /data/imagenet --split train \
      --out /data/in1k_latents_256 --vae /weights/sd-vae-ft-ema --max-tokens 256 --patch-size 2

On several hosts run the same command on every host: shard i is written by the host with
`i % process_count == process_index` (jax.process_index()/process_count() unless given). Rerunning
skips finished shards and redoes half-written ones. Bad images are skipped and counted; the
final summary says how many images were read, written and skipped, and why.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tqdm import tqdm

from fitv2_jax.data import preprocess
from fitv2_jax.data.encoders import PixelEncoder, VaeEncoder
from fitv2_jax.data.images import BadImage
from fitv2_jax.data.records import (
    DATASET_JSON,
    array_name,
    encode_record,
    shard_stem,
    sum_stats,
    write_json_atomic,
)
from fitv2_jax.data.sources import open_source

FORMAT_VERSION = 1
VARIANTS = ["resize", "crop"]


def load_variants(item, max_tokens: int, patch_size: int, downsample: int, min_tokens: int):
    """Decode one source item and make its Algorithm-1 variants (uint8 arrays); raises
    BadImage (with a reason) to skip it. Thread-safe: PIL releases the GIL while decoding."""
    try:
        img = item.load()
    except FileNotFoundError as e:
        raise BadImage("missing_file", str(e)) from e
    vs = preprocess.variants(img, max_tokens, patch_size, downsample, min_tokens)
    if not vs:
        raise BadImage("too_small", f"{img.size[0]}x{img.size[1]} px")
    return {name: np.asarray(v, np.uint8) for name, v in vs.items()}


def encode_batch(items_vs: list, encoder, patch_size: int) -> list[dict]:
    """[(item, variants)] -> record fields per item, both flips of every variant encoded.

    Arrays of the same shape (across items, variants and flips) go through the encoder in one
    call: a VAE on an accelerator wants batches, and ImageNet has a few dominant sizes.
    """
    m = patch_size * encoder.downsample
    groups: dict[tuple, list] = {}
    for j, (_, vs) in enumerate(items_vs):
        for name, a in vs.items():
            groups.setdefault(a.shape, []).append((j, name, a))
    out = [{} for _ in items_vs]
    for members in groups.values():
        # flips do not commute with a VAE: encode the flipped image, don't flip the latent
        x = np.stack([f for _, _, a in members for f in (a, a[:, ::-1])])
        z = encoder.encode(x)
        for k, (j, name, _) in enumerate(members):
            for flip in (0, 1):
                out[j][array_name(name, flip)] = z[2 * k + flip]
    for (item, vs), fields in zip(items_vs, out, strict=True):
        sizes = [(a.shape[0] // m, a.shape[1] // m) for a in vs.values()]
        fields.update(label=int(item.label), key=item.key, variants=list(vs))
        fields["size"] = np.asarray(sizes, np.int32)
        fields["tokens"] = np.asarray([h * w for h, w in sizes], np.int32)
    return out


def _decoded(source, lo: int, hi: int, downsample: int, args):
    """Yields (item, variants or None, BadImage or None) in order; decodes on args.workers threads."""

    def work(i):
        item = source[i]
        try:
            vs = load_variants(item, args.max_tokens, args.patch_size, downsample, args.min_tokens)
            return item, vs, None
        except BadImage as e:
            return item, None, e

    if args.workers <= 1:
        yield from map(work, range(lo, hi))
        return
    chunk = 8 * args.workers  # bounded look-ahead: decoded images wait for the encoder
    with ThreadPoolExecutor(args.workers) as pool:
        for c in range(lo, hi, chunk):
            yield from pool.map(work, range(c, min(c + chunk, hi)))


def _write_shard(source, lo: int, hi: int, stem: str, encoder, args, bar) -> dict:
    from array_record.python.array_record_module import ArrayRecordWriter

    final = stem + ".array_record"
    tmp = final + ".tmp"
    if os.path.exists(tmp):
        os.remove(tmp)  # a half-written shard from an interrupted run: redo it
    writer = ArrayRecordWriter(tmp, "group_size:1")  # group 1: cheap random access
    reasons: Counter = Counter()
    tokens, written = [], 0
    pending: list = []

    def flush():
        nonlocal written
        for fields in encode_batch(pending, encoder, args.patch_size):
            writer.write(encode_record(fields))
            t = dict(zip(fields["variants"], fields["tokens"].tolist(), strict=True))
            tokens.append([t.get(v, 0) for v in VARIANTS])
            written += 1
        bar.update(len(pending))
        pending.clear()

    for item, vs, bad in _decoded(source, lo, hi, encoder.downsample, args):
        if bad is not None:
            reasons[bad.reason] += 1
            bar.update(1)
            if args.verbose:
                tqdm.write(f"skip {item.key}: {bad}")
            continue
        pending.append((item, vs))
        if len(pending) >= args.encode_batch:
            flush()
    flush()
    writer.close()
    os.replace(tmp, final)
    stats = {
        "read": hi - lo,
        "written": written,
        "skipped": sum(reasons.values()),
        "skipped_by_reason": dict(reasons),
        "tokens": tokens,
    }
    write_json_atomic(stem + ".json", stats)  # last: marks the shard finished
    return stats


def _dataset_meta(args, encoder, source, num_shards: int) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "encoder": encoder.describe(),
        "patch_size": args.patch_size,
        "max_tokens": args.max_tokens,
        "min_tokens": args.min_tokens,
        "variants": VARIANTS,
        "num_classes": source.num_classes,
        "class_names": list(source.class_names),
        "num_shards": {args.split: num_shards},
        "sources": {args.split: {"kind": args.source, "root": args.root}},
    }


def _merge_meta(path: str, meta: dict) -> None:
    """Write dataset.json, or add this split to an existing one if the settings agree."""
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        for k in ("format_version", "encoder", "patch_size", "max_tokens", "variants"):
            if old.get(k) != meta[k]:
                raise ValueError(
                    f"{path} was prepared with {k}={old.get(k)!r}, this run has {meta[k]!r}: "
                    "use another --out directory or the same settings."
                )
        split = next(iter(meta["num_shards"]))
        old_n = old["num_shards"].get(split)
        if old_n is not None and old_n != meta["num_shards"][split]:
            raise ValueError(
                f"{path}: split {split!r} was started with {old_n} shards, this run asks for "
                f"{meta['num_shards'][split]}: pass --num-shards {old_n} to resume."
            )
        old["num_shards"].update(meta["num_shards"])
        old.setdefault("sources", {}).update(meta["sources"])
        meta = old
    write_json_atomic(path, meta)


def prepare(args, source=None, encoder=None) -> dict:
    """Write this host's shards of one split; returns the summary dict (also printed)."""
    if source is None:
        source = open_source(
            args.source,
            args.root,
            args.split,
            val_labels=args.val_labels,
            tfds_name=args.tfds_name,
            tfds_data_dir=args.tfds_data_dir,
            demo_crops=args.demo_crops,
        )
    if encoder is None:
        encoder = VaeEncoder(args.vae, args.dtype) if args.vae else PixelEncoder()
    n = len(source) if args.limit is None else min(len(source), args.limit)
    num_shards = args.num_shards or max(1, math.ceil(n / args.records_per_shard))
    pi, pc = args.process_index, args.process_count
    if pi is None or pc is None:
        import jax

        pi = jax.process_index() if pi is None else pi
        pc = jax.process_count() if pc is None else pc
    os.makedirs(args.out, exist_ok=True)
    _merge_meta(
        os.path.join(args.out, DATASET_JSON), _dataset_meta(args, encoder, source, num_shards)
    )

    mine = [j for j in range(num_shards) if j % pc == pi]
    bounds = [(j * n // num_shards, (j + 1) * n // num_shards) for j in range(num_shards)]
    todo, done_stats = [], []
    for j in mine:
        stem = os.path.join(args.out, shard_stem(args.split, j, num_shards))
        if os.path.isfile(stem + ".json"):
            with open(stem + ".json") as f:
                done_stats.append(json.load(f))
        else:
            todo.append((j, stem))
    total = sum(bounds[j][1] - bounds[j][0] for j, _ in todo)
    new_stats = []
    with tqdm(
        total=total, desc=f"prepare {args.split}", unit="img", disable=not args.progress
    ) as bar:
        for j, stem in todo:
            lo, hi = bounds[j]
            new_stats.append(_write_shard(source, lo, hi, stem, encoder, args, bar))
    s_new, s_all = sum_stats(new_stats), sum_stats(done_stats + new_stats)
    summary = {
        "out": args.out,
        "split": args.split,
        "shards_this_host": len(mine),
        "shards_written_now": len(todo),
        "shards_already_done": len(mine) - len(todo),
        "this_run": s_new,
        "all_shards_this_host": s_all,
        "source_problems": {k: v for k, v in getattr(source, "problems", {}).items() if v},
    }
    _print_summary(summary)
    return summary


def _print_summary(s: dict) -> None:
    a = s["all_shards_this_host"]
    why = ", ".join(f"{r}: {c}" for r, c in sorted(a["skipped_by_reason"].items())) or "none"
    print(
        f"shards on this host: {s['shards_this_host']} "
        f"({s['shards_written_now']} written now, {s['shards_already_done']} already done)"
    )
    print(f"images read {a['read']}, written {a['written']}, skipped {a['skipped']} ({why})")
    for k, v in s["source_problems"].items():
        print(f"source {k}: {len(v)} ({', '.join(v[:5])}{', ...' if len(v) > 5 else ''})")
    print(f"prepared dataset: {s['out']} (split {s['split']})")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fitv2_jax.prepare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--source",
        required=True,
        choices=["imagenet", "folder", "tfds", "demo"],
        help="imagenet: ROOT/train/<wnid>/*.JPEG (+ ROOT/val); folder: any "
        "ROOT/<class>/<image> tree; tfds: a prepared tensorflow-datasets dataset; "
        "demo: crops of scikit-image's bundled photos (offline)",
    )
    p.add_argument("--root", help="dataset folder (imagenet, folder)")
    p.add_argument(
        "--split",
        default="train",
        help="train | val (imagenet, tfds) | heldout (demo); names the shard files",
    )
    p.add_argument("--out", required=True, help="output directory of the prepared dataset")
    p.add_argument(
        "--vae",
        help="SD-VAE weights (diffusers folder or .safetensors/.ckpt): write "
        "latents; omit for a pixel-space dataset",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float16"],
        help="stored latent dtype (pixels are always uint8)",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=256,
        help="token budget per image: 256 for pre-training, 1024 for high-res",
    )
    p.add_argument("--patch-size", type=int, default=2, help="model patch size p")
    p.add_argument(
        "--min-tokens",
        type=int,
        default=preprocess.MIN_TOKENS,
        help="smaller images are skipped (reason too_small)",
    )
    p.add_argument("--records-per-shard", type=int, default=1024)
    p.add_argument("--workers", type=int, default=4, help="threads decoding and resizing images")
    p.add_argument(
        "--encode-batch",
        type=int,
        default=32,
        help="images gathered before encoding; same-size arrays share one VAE call",
    )
    p.add_argument("--num-shards", type=int, help="overrides --records-per-shard")
    p.add_argument("--limit", type=int, help="only the first N images (smoke tests)")
    p.add_argument("--val-labels", help="labels file for a flat ImageNet val/ folder")
    p.add_argument("--tfds-name", default="imagenet2012")
    p.add_argument("--tfds-data-dir", help="tfds data_dir (default $TFDS_DATA_DIR)")
    p.add_argument("--demo-crops", type=int, default=36, help="crops per photo (demo)")
    p.add_argument("--process-index", type=int, help="default jax.process_index()")
    p.add_argument("--process-count", type=int, help="default jax.process_count()")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--verbose", action="store_true", help="print every skipped image")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.max_tokens < args.min_tokens:
        raise SystemExit(f"--max-tokens {args.max_tokens} is below --min-tokens {args.min_tokens}")
    try:
        return prepare(args)
    except (FileNotFoundError, ValueError, ImportError) as e:
        raise SystemExit(f"error: {e}") from e


if __name__ == "__main__":
    main()
