"""Metric writers: TensorBoard (WORKDIR/tensorboard), the absl log and WORKDIR/metrics.jsonl.

    writer = create_writer(workdir, is_main_process=jax.process_index() == 0)
    writer.write_scalars(step, {"loss": 0.41}); writer.write_images(step, {"samples": grid[None]})

The method names are those of `clu.metric_writers.MetricWriter`. clu's own package is not used
here: `clu.metric_writers` (and `clu.periodic_actions`, which imports it) imports TensorFlow at
import time (clu 0.0.12: `metric_writers/__init__` -> `summary_writer` -> `tensorflow`), and
TensorFlow is a multi-GB dependency nothing else here needs. TensorBoard event files are written
with tensorboardX, which needs no TensorFlow; TensorBoard reads them as usual.

WORKDIR may be a URL (gs://...). Objects cannot be appended to, so there both files grow in a
local staging directory (`utils.files.Mirror`) that is uploaded whole at most every 30 s as
writes arrive, and always on `flush` (the training loop flushes after every checkpoint, so the
metrics at the URL reach at least the latest checkpoint) and `close`. Each upload costs the
file's size: metrics.jsonl grows by ~300 bytes per logged step, an event file by ~100 bytes
per scalar plus each image. A resumed run downloads metrics.jsonl once and appends to it;
TensorBoard starts a new event file, as it does locally.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import numpy as np
from absl import logging
from tensorboardX import SummaryWriter

from fitv2_jax.utils import paths
from fitv2_jax.utils.files import Mirror


class MetricWriter:
    """The clu MetricWriter methods this project writes through; each one a no-op here."""

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        pass

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        pass

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        pass

    def write_hparams(self, hparams: Mapping[str, object]) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.flush()


class TensorBoardWriter(MetricWriter):
    """TensorBoard event files (scalars, NHWC uint8 images, text) through tensorboardX; a URL
    logdir is staged locally and uploaded (module docstring)."""

    def __init__(self, logdir: str):
        self._mirror = Mirror(logdir) if paths.is_url(logdir) else None
        self._writer = SummaryWriter(logdir=self._mirror.local if self._mirror else str(logdir))

    def _maybe_sync(self):
        if self._mirror is not None and self._mirror.due():
            self.flush()

    def write_scalars(self, step, scalars):
        for k, v in scalars.items():
            self._writer.add_scalar(k, float(v), int(step))
        self._maybe_sync()

    def write_images(self, step, images):
        for k, v in images.items():
            v = np.asarray(v)
            self._writer.add_images(k, v if v.ndim == 4 else v[None], int(step), dataformats="NHWC")
        self._maybe_sync()

    def write_texts(self, step, texts):
        for k, v in texts.items():
            self._writer.add_text(k, str(v), int(step))
        self._maybe_sync()

    def write_hparams(self, hparams):
        self._writer.add_text("hparams", json.dumps({k: str(v) for k, v in hparams.items()}), 0)
        self._maybe_sync()

    def flush(self):
        self._writer.flush()
        if self._mirror is not None:
            self._mirror.sync()

    def close(self):
        self._writer.close()
        if self._mirror is not None:
            self._mirror.close()


class JsonlWriter(MetricWriter):
    """Appends {"step": s, name: value, ...} lines to a file (scalars only): easy to grep and
    plot. A URL's file is staged locally and uploaded (module docstring)."""

    def __init__(self, path: str):
        self._mirror = None
        if paths.is_url(path):
            self._mirror = Mirror(paths.dirname(path))
            local = self._mirror.download(paths.basename(path))  # a resumed run appends
        else:
            local = path
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._file = open(local, "a", encoding="utf-8")  # noqa: SIM115

    def write_scalars(self, step, scalars):
        row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._mirror is not None and self._mirror.due():
            self._mirror.sync()

    def flush(self):
        self._file.flush()
        if self._mirror is not None:
            self._mirror.sync()

    def close(self):
        self._file.close()
        if self._mirror is not None:
            self._mirror.close()


class LoggingWriter(MetricWriter):
    """Scalars to the absl log (INFO), one line per step."""

    def write_scalars(self, step, scalars):
        text = ", ".join(f"{k} = {float(v):.6g}" for k, v in sorted(scalars.items()))
        logging.info("[%d] %s", step, text)


class MultiWriter(MetricWriter):
    """Every call goes to each writer in turn."""

    def __init__(self, writers: Sequence[MetricWriter]):
        self.writers = list(writers)

    def write_scalars(self, step, scalars):
        for w in self.writers:
            w.write_scalars(step, scalars)

    def write_images(self, step, images):
        for w in self.writers:
            w.write_images(step, images)

    def write_texts(self, step, texts):
        for w in self.writers:
            w.write_texts(step, texts)

    def write_hparams(self, hparams):
        for w in self.writers:
            w.write_hparams(hparams)

    def flush(self):
        for w in self.writers:
            w.flush()

    def close(self):
        for w in self.writers:
            w.close()


def create_writer(workdir: str, is_main_process: bool = True) -> MetricWriter:
    """TensorBoard (WORKDIR/tensorboard) + absl log + WORKDIR/metrics.jsonl on the main process;
    the log only elsewhere. WORKDIR: a local path or a URL."""
    if not is_main_process:
        return LoggingWriter()
    return MultiWriter([
        TensorBoardWriter(paths.join(workdir, "tensorboard")),
        LoggingWriter(),
        JsonlWriter(paths.join(workdir, "metrics.jsonl")),
    ])  # fmt: skip
