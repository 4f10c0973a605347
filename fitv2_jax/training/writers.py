"""Metric writers: TensorBoard (WORKDIR/tensorboard), the absl log and WORKDIR/metrics.jsonl.

    writer = create_writer(workdir, is_main_process=jax.process_index() == 0)
    writer.write_scalars(step, {"loss": 0.41}); writer.write_images(step, {"samples": grid[None]})

The method names are those of `clu.metric_writers.MetricWriter`. clu's own package is not used
here: `clu.metric_writers` (and `clu.periodic_actions`, which imports it) imports TensorFlow at
import time (clu 0.0.12: `metric_writers/__init__` -> `summary_writer` -> `tensorflow`), and
TensorFlow is a multi-GB dependency nothing else here needs. TensorBoard event files are written
with tensorboardX, which needs no TensorFlow; TensorBoard reads them as usual.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import numpy as np
from absl import logging
from tensorboardX import SummaryWriter


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
    """TensorBoard event files (scalars, NHWC uint8 images, text) through tensorboardX."""

    def __init__(self, logdir: str):
        self._writer = SummaryWriter(logdir=str(logdir))

    def write_scalars(self, step, scalars):
        for k, v in scalars.items():
            self._writer.add_scalar(k, float(v), int(step))

    def write_images(self, step, images):
        for k, v in images.items():
            v = np.asarray(v)
            self._writer.add_images(k, v if v.ndim == 4 else v[None], int(step), dataformats="NHWC")

    def write_texts(self, step, texts):
        for k, v in texts.items():
            self._writer.add_text(k, str(v), int(step))

    def write_hparams(self, hparams):
        self._writer.add_text("hparams", json.dumps({k: str(v) for k, v in hparams.items()}), 0)

    def flush(self):
        self._writer.flush()

    def close(self):
        self._writer.close()


class JsonlWriter(MetricWriter):
    """Appends {"step": s, name: value, ...} lines to a file (scalars only): easy to grep and plot."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115

    def write_scalars(self, step, scalars):
        row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def flush(self):
        self._file.flush()

    def close(self):
        self._file.close()


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
    the log only elsewhere."""
    if not is_main_process:
        return LoggingWriter()
    return MultiWriter([
        TensorBoardWriter(os.path.join(workdir, "tensorboard")),
        LoggingWriter(),
        JsonlWriter(os.path.join(workdir, "metrics.jsonl")),
    ])  # fmt: skip
