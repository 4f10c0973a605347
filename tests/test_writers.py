"""Metric writers: TensorBoard events readable back, metrics.jsonl, and no clu module touched."""

import glob
import json
import struct
import subprocess
import sys

import numpy as np
from tensorboardX.proto.event_pb2 import Event

from fitv2_jax.training.writers import create_writer


def _events(logdir):
    """Every Event in a TensorBoard events file (TFRecord: length, crc, data, crc)."""
    (path,) = glob.glob(f"{logdir}/events.out.tfevents.*")
    out = []
    with open(path, "rb") as f:
        while header := f.read(12):
            (n,) = struct.unpack("<Q", header[:8])
            event = Event()
            event.ParseFromString(f.read(n))
            f.read(4)
            out.append(event)
    return out


def test_scalars_and_images_reach_tensorboard_and_jsonl(tmp_path):
    writer = create_writer(str(tmp_path))
    writer.write_scalars(3, {"loss": 0.5, "mfu": 0.25})
    writer.write_images(3, {"samples/32x32": np.zeros((1, 8, 8, 3), np.uint8)})
    writer.close()
    scalars = {(e.step, v.tag): v.simple_value for e in _events(tmp_path / "tensorboard")
               for v in e.summary.value if v.HasField("simple_value")}  # fmt: skip
    assert scalars == {(3, "loss"): 0.5, (3, "mfu"): 0.25}
    images = [v for e in _events(tmp_path / "tensorboard") for v in e.summary.value
              if v.HasField("image")]  # fmt: skip
    assert len(images) == 1 and images[0].image.height == 8
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert rows == [{"step": 3, "loss": 0.5, "mfu": 0.25}]


def test_the_training_loop_touches_no_clu_metric_writers_module():
    """clu.metric_writers imports TensorFlow; nothing of ours may import (or plant) it."""
    code = ("import sys, fitv2_jax.training.loop, fitv2_jax.training.writers; "
            "print(sorted(m for m in sys.modules if m.startswith('clu.metric_writers')))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
