"""A path is a local path or a URL that `etils.epath` opens (gs://, s3://, ...).

    run = paths.absolute("gs://bucket/xl")             # local paths made absolute, URLs kept
    scores = paths.join(run, "eval", "scores.json")    # os.path.join, or "/" after a URL
    if paths.isfile(scores): table = json.loads(paths.read_text(scores))

Paths stay strings everywhere (flags, configs, JSON records). A local path goes to `os` exactly as
before; a URL goes to `epath.Path`, whose backend (gcsfs through fsspec for gs://, or TensorFlow's
gfile when TensorFlow is installed) talks to the object store. Writing files is `utils.files`.
"""

from __future__ import annotations

import glob as globlib
import io
import os
import posixpath

import numpy as np
from etils import epath

from fitv2_jax.utils.errors import UserError

GCS_FIX = "pip install 'fitv2_jax[gcs]' (gcsfs, the client epath opens gs:// with)"


def is_url(path) -> bool:
    """Whether `path` names an object by URL (scheme://...), not a local file."""
    return "://" in os.fspath(path)


def as_path(path) -> epath.Path:
    """The epath.Path of a local path or URL (gs:// -> its bucket's backend)."""
    return epath.Path(os.fspath(path))


def join(base, *parts: str) -> str:
    return posixpath.join(os.fspath(base), *parts) if is_url(base) else os.path.join(base, *parts)


def absolute(path) -> str:
    """A local path made absolute (os.path.abspath); a URL as it is, without a trailing '/'."""
    path = os.fspath(path)
    return path.rstrip("/") if is_url(path) else os.path.abspath(path)


def dirname(path) -> str:
    return posixpath.dirname(os.fspath(path)) if is_url(path) else os.path.dirname(path)


def basename(path) -> str:
    return posixpath.basename(os.fspath(path)) if is_url(path) else os.path.basename(path)


def exists(path) -> bool:
    return as_path(path).exists() if is_url(path) else os.path.exists(path)


def isfile(path) -> bool:
    return as_path(path).is_file() if is_url(path) else os.path.isfile(path)


def isdir(path) -> bool:
    return as_path(path).is_dir() if is_url(path) else os.path.isdir(path)


def makedirs(path) -> None:
    """Creates a directory and its parents (on an object store: a no-op or a marker)."""
    if is_url(path):
        as_path(path).mkdir(parents=True, exist_ok=True)
    else:
        os.makedirs(path, exist_ok=True)


def listdir(path) -> list[str]:
    """The names in a directory."""
    return [p.name for p in as_path(path).iterdir()] if is_url(path) else os.listdir(path)


def glob(directory, pattern: str) -> list[str]:
    """Paths of the entries of `directory` that match `pattern` (no '**'), sorted."""
    if is_url(directory):
        return sorted(os.fspath(p) for p in as_path(directory).glob(pattern))
    return sorted(globlib.glob(os.path.join(directory, pattern)))


def remove(path) -> None:
    """Deletes a file; a missing one raises FileNotFoundError."""
    if is_url(path):
        as_path(path).unlink()
    else:
        os.remove(path)


def rename(src, dst) -> None:
    """Moves a file or directory (on an object store: a copy of every object, then a delete)."""
    if is_url(src):
        as_path(src).rename(dst)
    else:
        os.replace(src, dst)


def read_bytes(path) -> bytes:
    if is_url(path):
        return as_path(path).read_bytes()
    with open(path, "rb") as f:
        return f.read()


def read_text(path) -> str:
    return read_bytes(path).decode("utf-8")


def load_npz(path):
    """np.load of an .npz (use it as a context manager); a URL's object is read whole first."""
    return np.load(io.BytesIO(read_bytes(path))) if is_url(path) else np.load(path)


def check_writable_dir(path: str, flag: str) -> str:
    """Creates directory `path` (given by `flag`) or raises a UserError saying why not; returns
    it. A URL whose scheme or client library is missing is named with the fix."""
    try:
        makedirs(path)
    except KeyError as e:  # epath knows no such scheme
        raise UserError(f"{flag} {path}: unknown URL scheme {e.args[0]}; give a local path or a "
                        "URL that etils.epath opens (gs://, s3://)") from e  # fmt: skip
    except ImportError as e:  # the scheme's client library (gcsfs for gs://)
        fix = GCS_FIX if path.startswith("gs://") else "install the package it names"
        raise UserError(f"{flag} {path}: {e}; {fix}") from e
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot create it ({e.strerror or e})") from e
    except Exception as e:  # noqa: BLE001 - an object store's own errors (credentials, HTTP)
        if not is_url(path):
            raise
        raise UserError(f"{flag} {path}: cannot create it ({type(e).__name__}: {e})") from e
    if not is_url(path) and not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: not writable by this user; choose another")
    return path
