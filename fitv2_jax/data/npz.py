"""ADM `.npz` image archives, streamed: read in row batches, written batch by batch.

    images = NpzImages("samples_256x256.npz")        # arr_0: uint8 (N, H, W, 3)
    for batch in images.batches(32): ...              # never the whole array in memory
    writer = NpzStreamWriter("out.npz", (N, H, W, 3)) # the sampler's output, ADM's input
    writer.write(batch); writer.close(arr_1=labels)   # complete files only (temporary + rename)

The writer's path may be a URL (gs://...): the archive is then built in a local temporary file
and uploaded whole on close. Archives are read from local paths.

An .npz is a zip of .npy files; np.load's mmap_mode does not apply to .npz members, so the .npy
header and rows are read (or written) directly.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator

import numpy as np

from fitv2_jax.utils.errors import MissingFileError, UserError
from fitv2_jax.utils.files import publish, staging_file

IMAGES_KEY = "arr_0"


class NpzArray:
    """One array of an .npz, read in row batches without loading it whole.

    An .npz is a zip of .npy files: we read the member's .npy header, then its rows in batches.
    (np.load's mmap_mode does not apply to .npz members, and mapping pages would count them in
    the resident set anyway.)
    """

    def __init__(self, path: str, key: str):
        self.path, self.key = path, key
        if not os.path.isfile(path):
            raise MissingFileError(f"{path}: file not found")
        if not zipfile.is_zipfile(path):
            raise UserError(f"{path}: not an .npz archive (expected np.savez output)")
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            if f"{key}.npy" not in names:
                have = sorted(n[:-4] for n in names if n.endswith(".npy"))
                raise UserError(f"{path}: no '{key}' array in the archive (it has {have})")
            with zf.open(f"{key}.npy") as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    header = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    header = np.lib.format.read_array_header_2_0(f)
                else:
                    header = np.lib.format._read_array_header(f, version)
                shape, fortran, dtype = header
                self._offset = f.tell()
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        if fortran:
            raise UserError(f"{path}: '{key}' is stored in Fortran order; save it C-contiguous")
        if self.dtype.hasobject or not self.shape:
            raise UserError(f"{path}: '{key}' is not a numeric array (dtype {self.dtype})")

    def __len__(self) -> int:
        return self.shape[0]

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        row_bytes = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        with zipfile.ZipFile(self.path) as zf, zf.open(f"{self.key}.npy") as f:
            f.seek(self._offset)
            for start in range(0, len(self), batch_size):
                n = min(batch_size, len(self) - start)
                buf = f.read(n * row_bytes)
                if len(buf) != n * row_bytes:
                    raise UserError(f"{self.path}: '{self.key}' is truncated at row {start}")
                yield np.frombuffer(buf, self.dtype).reshape(n, *self.shape[1:])


class NpzImages(NpzArray):
    """Streams uint8 (N, H, W, 3) images out of an .npz member (`arr_0` by default)."""

    def __init__(self, path: str, key: str = IMAGES_KEY):
        super().__init__(path, key)
        if self.dtype != np.uint8:
            raise UserError(f"{path}: '{key}' has dtype {self.dtype}; expected uint8 images")
        if len(self.shape) != 4:
            raise UserError(f"{path}: '{key}' has shape {self.shape}; expected (N, H, W, 3)")
        if self.shape[-1] != 3:
            raise UserError(
                f"{path}: '{key}' has {self.shape[-1]} channels (shape {self.shape}); expected "
                "RGB images (N, H, W, 3)"
            )


def npz_keys(path: str) -> set[str]:
    with zipfile.ZipFile(path) as zf:
        return {n[:-4] for n in zf.namelist() if n.endswith(".npy")}


class NpzStreamWriter:
    """Writes an .npz whose `arr_0` (N, H, W, 3) uint8 arrives batch by batch (never all in RAM).

    The zip member is a normal .npy (header, then C-order rows), so np.load reads it as usual.
    It is built in PATH.partial (a local temporary file for a URL) and renamed (uploaded) on close.
    """

    def __init__(self, path: str, shape: tuple[int, ...]):
        self.path, self.shape, self.rows = path, tuple(shape), 0
        self._tmp = staging_file(path, path + ".partial")
        self._zip = zipfile.ZipFile(self._tmp, "w", zipfile.ZIP_STORED, allowZip64=True)
        self._f = self._zip.open("arr_0.npy", "w", force_zip64=True)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8))}
        header.update(fortran_order=False, shape=self.shape)
        np.lib.format.write_array_header_2_0(self._f, header)

    def write(self, images: np.ndarray) -> None:
        images = np.ascontiguousarray(images, np.uint8)
        if images.shape[1:] != self.shape[1:] or self.rows + len(images) > self.shape[0]:
            raise ValueError(f"batch {images.shape} does not fit {self.shape} at row {self.rows}")
        self._f.write(images.tobytes())
        self.rows += len(images)

    def abort(self) -> None:
        """Closes and removes the unfinished file (a failed run leaves nothing behind)."""
        self._f.close()
        self._zip.close()
        if os.path.exists(self._tmp):
            os.remove(self._tmp)

    def close(self, **extra: np.ndarray) -> str:
        self._f.close()
        if self.rows != self.shape[0]:
            self._zip.close()
            raise ValueError(f"{self.path}: wrote {self.rows} of {self.shape[0]} rows")
        for name, arr in extra.items():
            with self._zip.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(arr), allow_pickle=False)
        self._zip.close()
        return publish(self._tmp, self.path)  # complete files only
