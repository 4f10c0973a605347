"""Metric writers: clu's MetricWriter interface to TensorBoard, the log and WORKDIR/metrics.jsonl.

clu's `metric_writers` package imports TensorFlow for its TensorBoard writer. TensorFlow is a
heavy dependency we otherwise never need, so when it is absent we register, under clu's own
module name, a SummaryWriter backed by tensorboardX (same event files, same TensorBoard). With
TensorFlow installed clu's writer is used unchanged. Import this module before any
`clu.metric_writers` / `clu.periodic_actions` import.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import types

_STUB = "clu.metric_writers.tf.summary_writer"


def _tensorboardx_summary_writer_class():
    import numpy as np
    from clu.metric_writers import interface
    from tensorboardX import SummaryWriter as TbxWriter

    class SummaryWriter(interface.MetricWriter):
        """TensorBoard event files through tensorboardX."""

        def __init__(self, logdir: str):
            self._writer = TbxWriter(logdir=str(logdir))

        def write_summaries(self, step, values, metadata=None):
            for k, v in values.items():
                self._writer.add_scalar(k, float(np.asarray(v).mean()), int(step))

        def write_scalars(self, step, scalars):
            for k, v in scalars.items():
                self._writer.add_scalar(k, float(v), int(step))

        def write_images(self, step, images):
            for k, v in images.items():
                v = np.asarray(v)
                self._writer.add_images(
                    k, v if v.ndim == 4 else v[None], int(step), dataformats="NHWC"
                )

        def write_videos(self, step, videos):
            del step, videos

        def write_audios(self, step, audios, *, sample_rate):
            del step, audios, sample_rate

        def write_texts(self, step, texts):
            for k, v in texts.items():
                self._writer.add_text(k, str(v), int(step))

        def write_histograms(self, step, arrays, num_buckets=None):
            for k, v in arrays.items():
                self._writer.add_histogram(k, np.asarray(v), int(step))

        def write_pointcloud(self, step, point_clouds, *, point_colors=None, configs=None):
            del step, point_clouds, point_colors, configs

        def write_hparams(self, hparams):
            self._writer.add_text("hparams", json.dumps({k: str(v) for k, v in hparams.items()}), 0)

        def flush(self):
            self._writer.flush()

        def close(self):
            self._writer.close()

    return SummaryWriter


def _install_stub() -> None:
    if _STUB in sys.modules or importlib.util.find_spec("tensorflow") is not None:
        return
    package = types.ModuleType("clu.metric_writers.tf")
    package.__path__ = []
    module = types.ModuleType(_STUB)

    def __getattr__(name):  # built lazily: clu's interface module must import first
        if name == "SummaryWriter":
            cls = _tensorboardx_summary_writer_class()
            module.SummaryWriter = cls
            return cls
        raise AttributeError(name)

    module.__getattr__ = __getattr__
    sys.modules["clu.metric_writers.tf"] = package
    sys.modules[_STUB] = module


_install_stub()

from clu import metric_writers  # noqa: E402
from clu.metric_writers import interface  # noqa: E402


class JsonlWriter(interface.MetricWriter):
    """Appends {"step": s, name: value, ...} lines to a file (scalars only): easy to grep and plot."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115

    def write_scalars(self, step, scalars):
        row = {"step": int(step)}
        row.update({k: float(v) for k, v in scalars.items()})
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def write_summaries(self, step, values, metadata=None):
        pass

    def write_images(self, step, images):
        pass

    def write_videos(self, step, videos):
        pass

    def write_audios(self, step, audios, *, sample_rate):
        pass

    def write_texts(self, step, texts):
        pass

    def write_histograms(self, step, arrays, num_buckets=None):
        pass

    def write_pointcloud(self, step, point_clouds, *, point_colors=None, configs=None):
        pass

    def write_hparams(self, hparams):
        pass

    def flush(self):
        self._file.flush()

    def close(self):
        self._file.close()


def create_writer(workdir: str, is_main_process: bool = True) -> interface.MetricWriter:
    """TensorBoard (WORKDIR/tensorboard) + absl log + WORKDIR/metrics.jsonl on the main process;
    log only elsewhere."""
    if not is_main_process:
        return metric_writers.LoggingWriter()
    from clu.metric_writers.summary_writer import SummaryWriter

    return metric_writers.MultiWriter(
        [
            SummaryWriter(os.path.join(workdir, "tensorboard")),
            metric_writers.LoggingWriter(),
            JsonlWriter(os.path.join(workdir, "metrics.jsonl")),
        ]
    )
