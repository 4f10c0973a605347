"""The training input pipeline (Grain): prepared records -> padded, masked token batches.

    it = make_train_iterator(config.data, process_index=jax.process_index(),
                             process_count=jax.process_count(), seed=config.seed)
    batch = next(it)                                   # this host's numpy batch
    batch = to_global_batch(batch, mesh)               # global jax.Arrays, batch axis sharded

Batch (B = global_batch_size / process_count rows on each host, L = the batch's bucket length):
    x (B, L, p*p*C) float32, grid (B, 2, L) int32 (row 0 = w index, row 1 = h index),
    mask (B, L) float32 (1 = real token), y (B,) int32, size (B, 2) int32 (h, w in patches),
    plus index / variant / flip (B,) int32 saying which record, variant and flip each row holds.
With packing (config.packing) every row has length L = pack_length and holds up to
S = pack_max_segments images: segment_ids (B, L) int32 (0 = padding, 1..S), grid restarting at
0 in every segment, y (B, S) and size (B, S, 2) per segment (unused slots: y = num_classes, the
null class, size 0), index (B, S) (-1 unused).

Two modes:
- bucketing (default): a global schedule (`bucketing.BatchPlan`) shared by all hosts groups
  records of similar token count and pads each batch to one of a few static lengths; the Grain
  dataset is a map over batch indices, so it is random-access, multiprocess-safe and its
  checkpoint state is just the next batch index.
- packing: per-host stream, Grain's first-fit packer over a shuffled, repeated record stream.

Multiprocess prefetch (config.worker_count > 0) gives the very same batches in bucketing mode;
in packing mode each worker packs its own slice, so the stream depends on worker_count
(deterministic for a fixed count; resume with the same count).

Checkpointing: the iterator is a Grain DatasetIterator: `it.get_state()` / `it.set_state(s)`,
or inside an Orbax Composite `grain.checkpoint.CheckpointSave(it)` /
`grain.checkpoint.CheckpointRestore(it)`.
"""

from __future__ import annotations

import grain
import jax
import numpy as np
from absl import flags
from jax.sharding import NamedSharding, PartitionSpec

from fitv2_jax.data.bucketing import BatchPlan, choose_buckets, variant_weights
from fitv2_jax.data.encoders import to_model_input
from fitv2_jax.data.records import PreparedDataset, array_name, decode_record
from fitv2_jax.data.tokens import make_grid, patchify
from fitv2_jax.utils.errors import UserError


class _Reader:
    """Reads one record and returns its (variant, flip) array as float32 tokens + grid."""

    def __init__(self, ds: PreparedDataset, patch_size: int):
        self.paths = ds.shards
        self.variants = ds.meta["variants"]
        self.stored_as = ds.meta["encoder"]["stored_as"]
        self.p = patch_size
        self._source = None

    @property
    def source(self):
        if self._source is None:  # opened lazily: picklable for worker processes
            self._source = grain.sources.ArrayRecordDataSource(self.paths)
        return self._source

    def __getstate__(self):
        return {**self.__dict__, "_source": None}

    def example(self, index: int, variant: int, flip: int) -> dict:
        rec = decode_record(self.source[int(index)])
        name = self.variants[variant]
        if name not in rec["variants"]:
            name = rec["variants"][0]
        v = rec["variants"].index(name)
        x = to_model_input(rec[array_name(name, int(flip))], self.stored_as)
        h, w = (int(s) for s in rec["size"][v])
        return dict(x=patchify(x, self.p), grid=make_grid(h, w), y=rec["label"], size=(h, w))


class _LoadBatch:
    """Batch index -> this host's padded batch (bucketing mode)."""

    def __init__(self, plan: BatchPlan, reader: _Reader, process_index: int, process_count: int):
        self.plan, self.reader = plan, reader
        self.pi, self.pc = process_index, process_count

    def __call__(self, b: int) -> dict:
        ids, var, flips, L = self.plan(b)
        rows = slice(self.pi, None, self.pc)  # interleaved: every host gets similar lengths
        ids, var, flips = ids[rows], var[rows], flips[rows]
        exs = [self.reader.example(i, v, f) for i, v, f in zip(ids, var, flips, strict=True)]
        B, D = len(exs), exs[0]["x"].shape[1]
        x = np.zeros((B, L, D), np.float32)
        grid = np.zeros((B, 2, L), np.int32)
        mask = np.zeros((B, L), np.float32)
        for r, ex in enumerate(exs):
            n = ex["x"].shape[0]
            x[r, :n], grid[r, :, :n], mask[r, :n] = ex["x"], ex["grid"], 1.0
        return dict(
            x=x,
            grid=grid,
            mask=mask,
            y=np.asarray([ex["y"] for ex in exs], np.int32),
            size=np.asarray([ex["size"] for ex in exs], np.int32),
            index=ids.astype(np.int32),
            variant=var.astype(np.int32),
            flip=flips.astype(np.int32),
        )


class _LoadExample:
    """Record index -> one example with a random variant and flip (packing mode)."""

    def __init__(self, reader: _Reader, probs: np.ndarray, flip: bool):
        self.reader, self.probs, self.flip = reader, probs, flip

    def __call__(self, index: int, rng: np.random.Generator) -> dict:
        p = self.probs[index]
        v = int(rng.choice(len(p), p=p))
        f = int(rng.integers(0, 2)) if self.flip else 0
        ex = self.reader.example(index, v, f)
        return dict(
            x=ex["x"],
            pos=np.ascontiguousarray(ex["grid"].T),  # (N, 2): packed along the token axis
            y=np.int32(ex["y"]),
            size=np.asarray(ex["size"], np.int32),
            index=np.int32(index),
        )


class _FinishPacked:
    """Grain packer row -> x, grid, mask, segment_ids, per-segment y / size / index."""

    def __init__(self, max_segments: int, null_label: int):
        self.S, self.null = max_segments, null_label

    def __call__(self, row: dict) -> dict:
        seg = row["x_segment_ids"].astype(np.int32)
        y = np.full((self.S,), self.null, np.int32)
        size = np.zeros((self.S, 2), np.int32)
        index = np.full((self.S,), -1, np.int32)
        for s, (yy, ss, ii) in enumerate(zip(row["y"], row["size"], row["index"], strict=True)):
            y[s], size[s], index[s] = yy, ss, ii
        return dict(
            x=row["x"].astype(np.float32),
            grid=np.ascontiguousarray(row["pos"].T).astype(np.int32),
            mask=(seg > 0).astype(np.float32),
            segment_ids=seg,
            y=y,
            size=size,
            index=index,
        )


def resolve_buckets(cfg, ds: PreparedDataset) -> tuple[int, ...]:
    """config.data.buckets, or the num_buckets lengths that minimise padding on this dataset."""
    if len(cfg.buckets):
        return tuple(sorted(int(b) for b in cfg.buckets))
    w = variant_weights(ds.tokens, cfg.variant)
    return choose_buckets(
        ds.tokens.reshape(-1), w.reshape(-1), cfg.num_buckets, cfg.bucket_multiple
    )


def _check(cfg, ds: PreparedDataset, process_count: int) -> int:
    if ds.meta["patch_size"] != cfg.patch_size:
        raise UserError(
            f"{ds.path!r} was prepared with patch size {ds.meta['patch_size']} but "
            f"config.data.patch_size = {cfg.patch_size}: prepare again or fix the config."
        )
    if cfg.global_batch_size < 1 or cfg.global_batch_size % process_count:
        raise UserError(
            f"config.data.global_batch_size = {cfg.global_batch_size} is not a positive multiple "
            f"of the {process_count} processes"
        )
    return cfg.global_batch_size // process_count


def make_train_iterator(cfg, *, process_index: int, process_count: int, seed: int,
                        num_classes: int | None = None):  # fmt: skip
    """This host's checkpointable Grain iterator of numpy batches (see the module docstring).
    num_classes: the model's; a dataset with more classes is refused (labels past the table)."""
    ds = PreparedDataset(cfg.path, cfg.split)
    local_batch = _check(cfg, ds, process_count)
    if num_classes is not None and ds.meta["num_classes"] > num_classes:
        raise UserError(f"config.data.path {cfg.path} has {ds.meta['num_classes']} classes but "
                        f"config.model.num_classes = {num_classes}: set "
                        f"--config.model.num_classes={ds.meta['num_classes']}")  # fmt: skip
    reader = _Reader(ds, cfg.patch_size)
    read = grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.prefetch)
    if not cfg.packing:
        plan = BatchPlan(
            ds.tokens,
            cfg.global_batch_size,
            resolve_buckets(cfg, ds),
            cfg.bucket_window,
            seed,
            cfg.variant,
            cfg.flip,
        )
        n = plan.batches_per_epoch * cfg.num_epochs if cfg.num_epochs else 2**62
        it_ds = (
            grain.MapDataset.range(0, n)
            .map(_LoadBatch(plan, reader, process_index, process_count))
            .to_iter_dataset(read)
        )
    else:
        length = cfg.pack_length or ds.meta["max_tokens"]
        probs = variant_weights(ds.tokens, cfg.variant)
        longest = int((ds.tokens * (probs > 0)).max())
        if longest > length:
            raise UserError(
                f"records have up to {longest} tokens, more than config.data.pack_length={length}"
            )
        src = grain.MapDataset.range(0, len(ds))[process_index::process_count]
        src = src.seed(seed).shuffle().repeat(cfg.num_epochs or None)
        src = src.random_map(_LoadExample(reader, probs, cfg.flip))
        it_ds = grain.experimental.FirstFitPackIterDataset(
            src.to_iter_dataset(read),
            length_struct={"x": length, "pos": length},
            num_packing_bins=cfg.pack_bins or 4 * local_batch,
            seed=seed,
            shuffle_bins=True,
            meta_features=("y", "size", "index"),
            max_sequences_per_bin=cfg.pack_max_segments,
        )
        it_ds = it_ds.map(_FinishPacked(cfg.pack_max_segments, ds.meta["num_classes"]))
        it_ds = it_ds.batch(local_batch, drop_remainder=True)
    if cfg.worker_count > 0:
        if not flags.FLAGS.is_parsed():  # Grain workers read absl flags; outside an absl app
            flags.FLAGS.mark_as_parsed()  # (scripts, tests) their defaults are what we want
        it_ds = it_ds.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=cfg.worker_count, per_worker_buffer_size=cfg.worker_buffer_size
            )
        )
    return iter(it_ds)


def to_global_batch(batch: dict, mesh, sharding=None) -> dict:
    """Host-local numpy batch -> global jax.Arrays split along the batch axis.

    sharding: a NamedSharding or PartitionSpec for the leading (batch) axis; default: the batch
    split over the mesh's "data" and "fsdp" axes (all axes if it has neither).
    """
    if sharding is None:
        axes = tuple(a for a in mesh.axis_names if a in ("data", "fsdp")) or tuple(mesh.axis_names)
        sharding = PartitionSpec(axes)
    if isinstance(sharding, PartitionSpec):
        sharding = NamedSharding(mesh, sharding)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
    }
