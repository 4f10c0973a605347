"""Preparing a dataset once: preprocess (FiT resize rule + Algorithm-1 crop, both flips), encode
(pixels or SD-VAE latents) and write the ArrayRecord shards that `data.pipeline` reads.

    summary = prepare_split(open_source("demo"), PixelEncoder(), PrepareSettings(out="/tmp/px"))

On several hosts every host runs the same call: shard i is written by the host with
`i % process_count == process_index`. Rerunning skips finished shards and redoes half-written
ones. Bad images are skipped and counted; the summary says how many images were read, written
and skipped, and why.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from tqdm import tqdm

from fitv2_jax.data import preprocess
from fitv2_jax.data.images import BadImage
from fitv2_jax.data.records import DATASET_JSON, array_name, encode_record, shard_stem, sum_stats
from fitv2_jax.data.tokens import unpatchify
from fitv2_jax.utils.errors import UserError
from fitv2_jax.utils.files import write_json_atomic


@dataclasses.dataclass(frozen=True)
class PrepareSettings:
    """How to prepare one split (the `prepare` command's flags of the same names)."""

    out: str
    split: str = "train"
    max_tokens: int = 256  # token budget per image: 256 for pre-training, 1024 for high-res
    patch_size: int = 2
    min_tokens: int = preprocess.MIN_TOKENS  # smaller images are skipped (too_small)
    resize_rule: str = "official"  # preprocess.RESIZE_RULES
    records_per_shard: int = 1024
    num_shards: int | None = None  # overrides records_per_shard
    limit: int | None = None  # only the first N images
    workers: int = 4  # threads decoding and resizing images
    encode_batch: int = 32  # images gathered before encoding; same-size arrays share a call
    process_index: int | None = None  # default jax.process_index()
    process_count: int | None = None  # default jax.process_count()
    log_skipped: bool = False  # print every skipped image
    progress: bool = True
    source_kind: str = ""  # recorded in dataset.json
    source_root: str | None = None

    def __post_init__(self):
        for name in ("max_tokens", "patch_size", "min_tokens", "records_per_shard", "workers",
                     "encode_batch"):  # fmt: skip
            if getattr(self, name) < 1:
                raise UserError(f"--{name} {getattr(self, name)}: give a positive number")
        if self.max_tokens < self.min_tokens:
            raise UserError(f"--max_tokens {self.max_tokens} is below --min_tokens "
                            f"{self.min_tokens}")  # fmt: skip
        if self.resize_rule not in preprocess.RESIZE_RULES:
            raise UserError(f"--resize_rule {self.resize_rule}: use one of "
                            f"{', '.join(preprocess.RESIZE_RULES)}")  # fmt: skip
        if self.num_shards is not None and self.num_shards < 1:
            raise UserError(f"--num_shards {self.num_shards}: give a positive number")


FORMAT_VERSION = 1
VARIANTS = ["resize", "crop"]


def load_variants(item, max_tokens: int, patch_size: int, downsample: int, min_tokens: int,
                  rule: str = "official"):  # fmt: skip
    """Decode one source item and make its Algorithm-1 variants (uint8 arrays); raises
    BadImage (with a reason) to skip it. Thread-safe: PIL releases the GIL while decoding."""
    try:
        img = item.load()
    except FileNotFoundError as e:
        raise BadImage("missing_file", str(e)) from e
    vs = preprocess.variants(img, max_tokens, patch_size, downsample, min_tokens, rule)
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


def _decoded(source, lo: int, hi: int, downsample: int, s: PrepareSettings):
    """Yields (item, variants or None, BadImage or None) in order; decodes on s.workers threads."""

    def work(i):
        item = source[i]
        try:
            vs = load_variants(item, s.max_tokens, s.patch_size, downsample, s.min_tokens,
                               s.resize_rule)  # fmt: skip
            return item, vs, None
        except BadImage as e:
            return item, None, e

    if s.workers <= 1:
        yield from map(work, range(lo, hi))
        return
    chunk = 8 * s.workers  # bounded look-ahead: decoded images wait for the encoder
    with ThreadPoolExecutor(s.workers) as pool:
        for c in range(lo, hi, chunk):
            yield from pool.map(work, range(c, min(c + chunk, hi)))


def _image_records(source, lo: int, hi: int, encoder, s: PrepareSettings):
    """(key, record fields or BadImage) per item in order: decoded on threads, encoded in
    batches of s.encode_batch (bad images are reported at once)."""
    pending: list = []

    def flush():
        done = encode_batch(pending, encoder, s.patch_size)
        out = [(item.key, fields) for (item, _), fields in zip(pending, done, strict=True)]
        pending.clear()
        return out

    for item, vs, bad in _decoded(source, lo, hi, encoder.downsample, s):
        if bad is not None:
            yield item.key, bad
            continue
        pending.append((item, vs))
        if len(pending) >= s.encode_batch:
            yield from flush()
    yield from flush()


def _latent_records(source, lo: int, hi: int, patch_size: int):
    """(key, record fields or BadImage) per pre-encoded item (official latent files): both
    flips of every variant, tokens unpatchified back to (h*p, w*p, C) latents."""
    for i in range(lo, hi):
        item = source[i]
        try:
            latents, label = item.load()
        except BadImage as e:
            yield item.key, e
            continue
        fields, sizes = {}, []
        for name, flips in latents.items():  # flips: (2, h, w, p*p*C) tokens
            if flips.dtype.name == "bfloat16":  # records store numpy dtypes
                flips = flips.astype(np.float32)
            _, h, w, d = flips.shape
            for flip in (0, 1):
                fields[array_name(name, flip)] = unpatchify(flips[flip].reshape(h * w, d), h, w,
                                                            patch_size)  # fmt: skip
            sizes.append((h, w))
        fields.update(label=int(label), key=item.key, variants=list(latents))
        fields["size"] = np.asarray(sizes, np.int32)
        fields["tokens"] = np.asarray([h * w for h, w in sizes], np.int32)
        yield item.key, fields


def _write_shard(records, n: int, stem: str, s: PrepareSettings, bar) -> dict:
    """Writes the n records of one shard to a temporary file, renamed when complete; its
    counts file, written last, marks the shard finished."""
    final = stem + ".array_record"
    tmp = final + ".tmp"
    if os.path.exists(tmp):
        os.remove(tmp)  # a half-written shard from an interrupted run: redo it
    writer = ArrayRecordWriter(tmp, "group_size:1")  # group 1: cheap random access
    reasons: Counter = Counter()
    tokens, written = [], 0
    for key, fields in records:
        bar.update(1)
        if isinstance(fields, BadImage):
            reasons[fields.reason] += 1
            if s.log_skipped:
                tqdm.write(f"skip {key}: {fields}")
            continue
        writer.write(encode_record(fields))
        t = dict(zip(fields["variants"], fields["tokens"].tolist(), strict=True))
        tokens.append([t.get(v, 0) for v in VARIANTS])
        written += 1
    writer.close()
    os.replace(tmp, final)
    stats = {
        "read": n,
        "written": written,
        "skipped": sum(reasons.values()),
        "skipped_by_reason": dict(reasons),
        "tokens": tokens,
    }
    write_json_atomic(stem + ".json", stats)  # last: marks the shard finished
    return stats


def _dataset_meta(s: PrepareSettings, encoder, source, num_shards: int) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "encoder": encoder.describe() if encoder is not None else source.encoder_description(),
        "patch_size": s.patch_size,
        "max_tokens": s.max_tokens,
        "min_tokens": s.min_tokens,
        "resize_rule": s.resize_rule,
        "variants": VARIANTS,
        "num_classes": source.num_classes,
        "class_names": list(source.class_names),
        "num_shards": {s.split: num_shards},
        "sources": {s.split: {"kind": s.source_kind, "root": s.source_root}},
    }


def _merge_meta(path: str, meta: dict) -> None:
    """Write dataset.json, or add this split to an existing one when everything agrees: the
    encoding settings, the class names (labels are indices into them) and, for a split already
    started, its source and shard count. A mismatch is refused before anything is written."""
    if not os.path.isfile(path):
        write_json_atomic(path, meta)
        return
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable ({e}); use another --out directory") from e
    keys = ("format_version", "encoder", "patch_size", "max_tokens", "min_tokens", "resize_rule",
            "variants", "class_names")  # fmt: skip
    split = next(iter(meta["num_shards"]))
    diff = {k: (old.get(k), meta[k]) for k in keys if old.get(k, meta[k]) != meta[k]}
    old_source = old.get("sources", {}).get(split)
    if old_source is not None and old_source != meta["sources"][split]:
        diff[f"{split} source"] = (old_source, meta["sources"][split])
    if diff:
        what = "; ".join(f"{k}: {_short(a)} here, {_short(b)} now" for k, (a, b) in diff.items())
        raise UserError(f"{path} was prepared differently ({what}); use another --out "
                        "directory or the same source and settings")  # fmt: skip
    old_n = old["num_shards"].get(split)
    if old_n is not None and old_n != meta["num_shards"][split]:
        raise UserError(
            f"{path}: split {split!r} was started with {old_n} shards, this run asks for "
            f"{meta['num_shards'][split]}: pass --num_shards {old_n} to resume."
        )
    old["num_shards"].update(meta["num_shards"])
    old.setdefault("sources", {}).update(meta["sources"])
    write_json_atomic(path, old)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _shard_plan(s: PrepareSettings, n: int, num_shards: int) -> tuple[list, list, list]:
    """(this host's shard indices with stems to write, stats of its finished shards, bounds)."""
    pi, pc = s.process_index, s.process_count
    if pi is None or pc is None:
        pi = jax.process_index() if pi is None else pi
        pc = jax.process_count() if pc is None else pc
    mine = [j for j in range(num_shards) if j % pc == pi]
    bounds = [(j * n // num_shards, (j + 1) * n // num_shards) for j in range(num_shards)]
    todo, done_stats = [], []
    for j in mine:
        stem = os.path.join(s.out, shard_stem(s.split, j, num_shards))
        if os.path.isfile(stem + ".json"):
            with open(stem + ".json") as f:
                done_stats.append(json.load(f))
        else:
            todo.append((j, stem))
    return todo, done_stats, bounds


def prepare_split(source, encoder, s: PrepareSettings) -> dict:
    """Writes this host's shards of one split; returns the summary dict (also printed).

    encoder: PixelEncoder or VaeEncoder for image sources; None for a source of latents already
    encoded (`sources.OfficialLatentSource`), whose files are converted as they are."""
    if encoder is None and not getattr(source, "pre_encoded", False):
        raise UserError("an image source needs an encoder (pixels, or --vae for latents)")
    if encoder is None and s.patch_size != source.patch_size:
        raise UserError(f"--patch_size {s.patch_size}: the official latents are patchified with "
                        f"p = {source.patch_size}")  # fmt: skip
    n = len(source) if s.limit is None else min(len(source), s.limit)
    num_shards = s.num_shards or max(1, math.ceil(n / s.records_per_shard))
    os.makedirs(s.out, exist_ok=True)
    _merge_meta(os.path.join(s.out, DATASET_JSON), _dataset_meta(s, encoder, source, num_shards))
    todo, done_stats, bounds = _shard_plan(s, n, num_shards)
    total = sum(bounds[j][1] - bounds[j][0] for j, _ in todo)
    new_stats = []
    with tqdm(total=total, desc=f"prepare {s.split}", unit="img", disable=not s.progress) as bar:
        for j, stem in todo:
            lo, hi = bounds[j]
            if encoder is None:
                records = _latent_records(source, lo, hi, s.patch_size)
            else:
                records = _image_records(source, lo, hi, encoder, s)
            new_stats.append(_write_shard(records, hi - lo, stem, s, bar))
    summary = {
        "out": s.out,
        "split": s.split,
        "shards_this_host": len(todo) + len(done_stats),
        "shards_written_now": len(todo),
        "shards_already_done": len(done_stats),
        "this_run": sum_stats(new_stats),
        "all_shards_this_host": sum_stats(done_stats + new_stats),
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
