"""The prepared-dataset format: ArrayRecord shards of self-describing records, plus JSON metadata.

A prepared dataset directory holds
  dataset.json                            what was prepared (encoder, patch size, max_tokens, ...)
  <split>-00003-of-00016.array_record     records (one per image), written to a temp name and
                                          renamed when complete
  <split>-00003-of-00016.json             the shard's counts (read/written/skipped and why) and
                                          token counts per record; written last, so a shard is
                                          finished exactly when this file exists

A record is one image: `label` (int), `key` (str), `variants` (e.g. ["resize", "crop"]), `size`
(V, 2) int32 (h, w in patches), `tokens` (V,) int32, and for each variant v and flip f in {0, 1}
the array `x_<v>_<f>`: (h*p, w*p, C) latents (float) or pixels (uint8, read as x / 127.5 - 1).
Bytes: b"FIT1", a uint32 header length, a JSON header, then the raw array buffers (read back
with np.frombuffer, no copy).
"""

from __future__ import annotations

import glob
import json
import os
import struct
from typing import Any

import numpy as np

from fitv2_jax.utils.errors import MissingFileError, UserError

MAGIC = b"FIT1"
DATASET_JSON = "dataset.json"


def encode_record(fields: dict[str, Any]) -> bytes:
    """fields: name -> np.ndarray | int | float | str | list -> bytes."""
    header: dict[str, Any] = {"arrays": {}, "values": {}}
    buffers, offset = [], 0
    for name, v in fields.items():
        if isinstance(v, np.ndarray):
            a = np.ascontiguousarray(v)
            header["arrays"][name] = [a.dtype.str, list(a.shape), offset]
            buffers.append(a.tobytes())
            offset += a.nbytes
        else:
            header["values"][name] = v
    h = json.dumps(header, separators=(",", ":")).encode()
    return b"".join([MAGIC, struct.pack("<I", len(h)), h, *buffers])


def decode_record(data: bytes) -> dict[str, Any]:
    """Inverse of encode_record; arrays are read-only views into `data`."""
    if data[:4] != MAGIC:
        raise UserError("not a fitv2_jax record (bad magic): was this file written by prepare?")
    (n,) = struct.unpack("<I", data[4:8])
    header = json.loads(data[8 : 8 + n])
    out = dict(header["values"])
    base = 8 + n
    for name, (dtype, shape, offset) in header["arrays"].items():
        dt = np.dtype(dtype)
        count = int(np.prod(shape)) if shape else 1
        a = np.frombuffer(data, dt, count=count, offset=base + offset)
        out[name] = a.reshape(shape)
    return out


def array_name(variant: str, flip: int) -> str:
    return f"x_{variant}_{flip}"


def shard_stem(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}"


class PreparedDataset:
    """A finished prepared dataset: its metadata, shard files and per-record token counts.

    tokens: (N, V_max) int32, 0 where a record lacks that variant (order: meta["variants"]).
    Raises a clear error for a missing directory, a missing dataset.json, unfinished shards
    or an empty dataset.
    """

    def __init__(self, path: str, split: str = "train"):
        if not os.path.isdir(path):
            raise MissingFileError(
                f"prepared dataset not found: {path!r} is not a directory; write one with "
                "`python -m fitv2_jax.prepare --out PATH ...` (config.data.path)."
            )
        meta_path = os.path.join(path, DATASET_JSON)
        if not os.path.isfile(meta_path):
            raise MissingFileError(f"{meta_path!r} missing: {path!r} is not a prepared dataset.")
        try:
            with open(meta_path) as f:
                self.meta = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{meta_path}: unreadable ({e}); prepare the dataset again") from e
        self.path, self.split = path, split
        count = self.meta["num_shards"].get(split)
        if count is None:
            raise UserError(
                f"split {split!r} not prepared in {path!r} (has {sorted(self.meta['num_shards'])})"
            )
        self.shards, stats, missing = [], [], []
        for i in range(count):
            stem = os.path.join(path, shard_stem(split, i, count))
            if not os.path.isfile(stem + ".json"):
                missing.append(os.path.basename(stem))
                continue
            with open(stem + ".json") as f:
                stats.append(json.load(f))
            self.shards.append(stem + ".array_record")
        if missing:
            raise UserError(
                f"{path!r}: {len(missing)} of {count} {split} shards are unfinished "
                f"(e.g. {missing[0]}); rerun prepare (on every host) to complete them."
            )
        self.shard_stats = stats
        nv = len(self.meta["variants"])
        toks = [np.asarray(s["tokens"], np.int32).reshape(-1, nv) for s in stats]
        self.tokens = np.concatenate(toks) if toks else np.zeros((0, nv), np.int32)
        if len(self.tokens) == 0:
            raise UserError(f"prepared dataset {path!r} ({split}) holds no records.")

    def __len__(self) -> int:
        return len(self.tokens)

    def totals(self) -> dict[str, Any]:
        """Summed counts of all shards: read, written, skipped and skipped-by-reason."""
        return sum_stats(self.shard_stats)


def sum_stats(stats: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"read": 0, "written": 0, "skipped": 0, "skipped_by_reason": {}}
    for s in stats:
        for k in ("read", "written", "skipped"):
            out[k] += s[k]
        for r, n in s["skipped_by_reason"].items():
            out["skipped_by_reason"][r] = out["skipped_by_reason"].get(r, 0) + n
    return out


def list_tmp_files(path: str) -> list[str]:
    return sorted(glob.glob(os.path.join(path, "*.tmp")))
