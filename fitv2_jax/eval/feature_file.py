"""Feature rows kept on disk, so scoring 50K samples does not hold 50K x 2048 floats in memory.

    store = FeatureFile(os.path.join(tmp, "pool.f32"), dim=2048)
    store.append(batch_pool)            # (B, 2048), any float dtype; stored as float32
    store[i : i + 1000]                 # (<=1000, 2048) float32 ndarray, read from the file

The metrics in `metrics.py` only take `len(x)` and row slices of their feature
arguments, so they accept an ndarray or a FeatureFile alike. Reads are plain `pread`s into a
fresh array, not a memory map: mapped pages would count in the resident set as they are touched.
"""

from __future__ import annotations

import os

import numpy as np


class FeatureFile:
    """An append-only (N, dim) float32 matrix in a raw file, read back by row slices."""

    def __init__(self, path: str, dim: int):
        self.path, self.dim, self._n = path, int(dim), 0
        self._row_bytes = 4 * self.dim
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)

    @property
    def shape(self) -> tuple[int, int]:
        return (self._n, self.dim)

    def __len__(self) -> int:
        return self._n

    def append(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, np.float32)
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"{self.path}: expected rows (B, {self.dim}), got {rows.shape}")
        data = memoryview(rows.reshape(-1).view(np.uint8))
        offset = self._n * self._row_bytes
        while data:  # os.pwrite may write less than asked
            written = os.pwrite(self._fd, data, offset)
            data, offset = data[written:], offset + written
        self._n += rows.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        if not isinstance(index, slice):
            raise TypeError(f"FeatureFile takes row slices (x[a:b]), not {type(index).__name__}")
        start, stop, step = index.indices(self._n)
        if step != 1:
            raise TypeError("FeatureFile takes contiguous row slices (step 1)")
        n = max(stop - start, 0)
        out = np.empty((n, self.dim), np.float32)
        view, offset = memoryview(out.reshape(-1).view(np.uint8)), start * self._row_bytes
        while view:
            got = os.preadv(self._fd, [view], offset)
            if got == 0:
                raise OSError(f"{self.path}: file is shorter than its {self._n} rows")
            view, offset = view[got:], offset + got
        return out

    def close(self) -> None:
        if getattr(self, "_fd", -1) >= 0:  # (also when __init__ failed before opening)
            os.close(self._fd)
            self._fd = -1

    def __del__(self):
        self.close()
