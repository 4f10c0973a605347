"""Files written whole, at a local path or a URL (`utils.paths`): a crash never leaves a
half-written file under the final name.

    write_json_atomic(paths.join(out, "results.json"), results)
    save_png(paths.join(out, "grid.png"), grid)              # (H, W, 3) uint8
    savez_atomic(paths.join(out, "batch_000000.npz"), pool=pool, ids=ids)
    staged = staging_file(final, final + ".partial"); ...write staged...; publish(staged, final)
    mirror = Mirror("gs://bucket/run/tensorboard"); ...append locally...; mirror.sync()

Local paths: a temporary file beside the target, then os.replace (atomic on one filesystem).
URLs: one write of the whole object, which an object store shows only once it is complete (GCS
has no rename; gcsfs would copy), so no temporary object is made. Objects cannot be appended to:
an append-only output (metrics.jsonl, TensorBoard events) grows in a local staging directory
and `Mirror.sync` uploads each changed file whole, so a sync costs the file's size.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import time
from typing import Any

import numpy as np
from PIL import Image

from fitv2_jax.utils import paths


def write_bytes_atomic(path: str, data: bytes) -> str:
    """Writes `data` to path (local: via a temporary file and a rename)."""
    if paths.is_url(path):
        paths.as_path(path).write_bytes(data)
        return path
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return path


def write_text_atomic(path: str, text: str) -> str:
    """Writes `text` (UTF-8) to path (local: via a temporary file and a rename)."""
    if paths.is_url(path):
        return write_bytes_atomic(path, text.encode("utf-8"))
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def write_json_atomic(path: str, obj: Any, indent: int = 1) -> str:
    return write_text_atomic(path, json.dumps(obj, indent=indent))


def save_png(path: str, image: np.ndarray) -> str:
    """(H, W, C) uint8 -> a PNG file."""
    if not paths.is_url(path):
        Image.fromarray(image).save(path)
        return path
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return write_bytes_atomic(path, buf.getvalue())


def savez_atomic(path: str, **arrays: np.ndarray) -> str:
    """np.savez of `arrays` to path (an .npz), never seen half-written."""
    if paths.is_url(path):
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return write_bytes_atomic(path, buf.getvalue())
    # hidden, ending in .npz (np.savez appends it otherwise), unique per process
    tmp = os.path.join(
        os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.partial.npz"
    )
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return path


def save_figure(path: str, fig, **savefig_kwargs) -> str:
    """A matplotlib figure -> a PNG file."""
    if not paths.is_url(path):
        fig.savefig(path, **savefig_kwargs)
        return path
    buf = io.BytesIO()
    fig.savefig(buf, format="png", **savefig_kwargs)
    return write_bytes_atomic(path, buf.getvalue())


def staging_file(path: str, local_partial: str) -> str:
    """Where to write a file that is built piece by piece before `publish(staged, path)`:
    `local_partial` (beside a local target) or a new local temporary file (for a URL)."""
    if not paths.is_url(path):
        return local_partial
    fd, staged = tempfile.mkstemp(prefix="fitv2_jax_", suffix=f"_{paths.basename(path)}")
    os.close(fd)
    return staged


def publish(staged: str, path: str) -> str:
    """A finished staged file under its final name: os.replace locally; for a URL, uploaded
    whole, then the local file removed."""
    if not paths.is_url(path):
        os.replace(staged, path)
        return path
    _upload(staged, path)
    os.remove(staged)
    return path


def _upload(local: str, url: str) -> None:
    with open(local, "rb") as src, paths.as_path(url).open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


class Mirror:
    """A local staging directory (`local`) whose files `sync` copies to the URL `url`.

    For outputs that grow by appending (metrics.jsonl, TensorBoard's event files), which an
    object store cannot append to. Each sync uploads every file changed since the last one,
    whole; `due()` is True when `min_interval` seconds have passed since the last upload, so
    callers can sync on every write without uploading more often than that.
    """

    def __init__(self, url: str, min_interval: float = 30.0):
        self.url, self.min_interval = url, float(min_interval)
        self.local = tempfile.mkdtemp(prefix="fitv2_jax_mirror_")
        self._synced: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns)
        self._last = time.monotonic()

    def due(self) -> bool:
        return time.monotonic() - self._last >= self.min_interval

    def download(self, name: str) -> str:
        """The local copy of url/name (empty when the URL has none yet), to append to."""
        remote, local = paths.join(self.url, name), os.path.join(self.local, name)
        with open(local, "wb") as f:
            if paths.isfile(remote):
                f.write(paths.read_bytes(remote))
        st = os.stat(local)
        self._synced[name] = (st.st_size, st.st_mtime_ns)
        return local

    def sync(self) -> None:
        """Uploads every new or changed local file to the same relative path under `url`."""
        for root, _, names in os.walk(self.local):
            for name in names:
                local = os.path.join(root, name)
                rel = os.path.relpath(local, self.local)
                st = os.stat(local)
                if self._synced.get(rel) == (st.st_size, st.st_mtime_ns):
                    continue
                target = paths.join(self.url, *rel.split(os.sep))
                paths.makedirs(paths.dirname(target))
                _upload(local, target)
                self._synced[rel] = (st.st_size, st.st_mtime_ns)
        self._last = time.monotonic()

    def close(self) -> None:
        """A last sync, then the staging directory is removed."""
        self.sync()
        shutil.rmtree(self.local, ignore_errors=True)
