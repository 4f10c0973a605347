"""A file:// URL scheme for the tests: the local disk behind etils.epath's URL machinery, with an
object store's rules, so a URL WORKDIR or --out runs offline (this machine reaches no bucket).

    import file_url                              # registers file:// with etils.epath
    run = file_url.url(tmp_path / "bucket/run")  # "file:///tmp/.../bucket/run"
    python tests/file_url.py fitv2_jax.sample --out file:///tmp/x ...   # a command, registered

- `epath.Path("file:///x/y")` is an etils GPath whose str() and os.fspath() are the URL itself, as
  a gs:// path's are. Code that hands the URL (or that path) to open(), os.makedirs, PIL or
  np.savez writes under a local folder literally named "file:" in the working directory, which
  the tests look for; through epath it reaches /x/y.
- Its backend is etils' fsspec backend over fsspec's local filesystem that refuses appends, as a
  GCS object cannot be appended to.
- Orbax writes arrays with TensorStore, which opens gs:// with its own GCS driver and knows no
  file:// URL: TensorStore alone is given the local path (`_tensorstore_path`). Orbax's
  directories, metadata and the Grain iterator go through epath like everything else.
"""

from __future__ import annotations

import os
import pathlib
import posixpath
import runpy
import sys

from etils import epath
from etils.epath import backend as backend_lib
from etils.epath import gpath
from fsspec.implementations.local import LocalFileSystem
from orbax.checkpoint._src.serialization import tensorstore_utils

SCHEME = "file://"


def url(path) -> str:
    """The file:// URL of a local path."""
    return SCHEME + os.path.abspath(os.fspath(path))


def local(path_or_url: str) -> pathlib.Path:
    """The local path a file:// URL stands for."""
    return pathlib.Path(path_or_url.removeprefix(SCHEME))


class _NoAppendFileSystem(LocalFileSystem):
    """fsspec's local filesystem without append: an object is written whole or not at all."""

    def _open(self, path, mode="rb", **kwargs):
        if "a" in mode:
            raise NotImplementedError(f"{path}: objects cannot be appended to (mode {mode!r})")
        return super()._open(path, mode=mode, **kwargs)


class _Backend(backend_lib._FileSystemSpecBackend):
    def fs(self, path):
        return _NoAppendFileSystem()


_BACKEND = _Backend()


@epath.register_path_cls(SCHEME)
class FileUrlPath(gpath.PosixGPath):
    """file:///a/b, kept as the parts ("/", "file:", "a", "b") as GPath keeps gs://b/x."""

    def __new__(cls, *parts):
        full = "/".join(os.fspath(p) for p in parts)
        if full.startswith(SCHEME):
            full = "/file:/" + full[len(SCHEME) :].lstrip("/")
        return super(gpath._GPath, cls).__new__(cls, full)

    @property
    def _uri_scheme(self):
        return "file" if self.parts[:2] == ("/", "file:") else None

    @property
    def _backend(self):
        return _BACKEND

    @property
    def _path_str(self) -> str:
        if self._uri_scheme:
            return SCHEME + "/" + "/".join(self.parts[2:])
        return posixpath.join(*self.parts) if self.parts else "."


_normalize = tensorstore_utils._normalize_path


def _tensorstore_path(path: str) -> str:
    return _normalize(os.fspath(path).removeprefix(SCHEME))


tensorstore_utils._normalize_path = _tensorstore_path


if __name__ == "__main__":  # python tests/file_url.py fitv2_jax.NAME ARGS...
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
