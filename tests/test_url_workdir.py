"""A URL WORKDIR or --out gets every file a local one gets, through etils.epath.

The URL is file:// (tests/file_url.py): epath's URL machinery over the local disk, refusing
appends as an object store does; str() of such a path is the URL, so a writer that still passed it
to open(), os.makedirs, PIL or np.savez would write under a local folder named "file:" in the
working directory, which every test here checks is absent. The same tiny run (two calls: a
resume, sample grids, a checkpoint, evaluation during training) goes to a URL and to a local
folder; both must hold the same files with the same contents, and the `sample` and `evaluate`
commands must write their --out to a URL.
"""

import concurrent.futures
import importlib.util
import json
import os
import pathlib
import struct
import subprocess
import sys
import types

import file_url
import jax
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file
from tensorboardX.proto.event_pb2 import Event

from fitv2_jax.config.defaults import base_config, fitv2_model
from fitv2_jax.models.convert import to_torch_state_dict
from fitv2_jax.training.loop import check_workdir, train
from fitv2_jax.training.writers import create_writer
from fitv2_jax.utils import paths
from fitv2_jax.utils.errors import UserError
from fitv2_jax.utils.files import write_text_atomic
from fitv2_jax.weights.checkpoints import restore_run_params
from fitv2_jax.weights.fit import save_official

EVAL = ["--sizes", "16x16", "--num_samples", 8, "--batch_size", 8, "--solver", "euler",
        "--num_steps", 2, "--ref_source", "demo", "--ref_split", "heldout", "--num_ref", 8,
        "--fid_method", "eigh"]  # fmt: skip
TIMING = ("steps_per_sec", "images_per_sec", "tokens_per_sec", "model_tflops_per_sec", "mfu")


def _config(data_path, total_steps, eval_every):
    c = base_config()
    c.model = fitv2_model(hidden_size=32, depth=2, num_heads=2, num_classes=7, in_channels=3,
                          context_size=64)  # fmt: skip
    c.latent = False
    c.data.path = data_path
    c.data.global_batch_size = 8
    c.data.buckets = (64,)
    c.train.update(dict(total_steps=total_steps, checkpoint_every=2, log_every=1, warmup_steps=0,
                        learning_rate=1e-3, sample_every=2, sample_sizes=((16, 16),),
                        sample_steps=2, eval_every=eval_every))  # fmt: skip
    c.eval.update(dict(sizes="16x16", num_samples=8, batch_size=8, solver="euler", num_steps=2,
                       ref_source="demo", ref_split="heldout", num_ref=8, fid_method="eigh"))  # fmt: skip
    c.mesh.ici = (2, -1, 1)
    return c


@pytest.fixture(scope="module")
def runs(demo_px, tmp_path_factory):
    """The same run at a file:// URL and in a local folder: 2 steps, then resumed to 4 with an
    evaluation at step 4; run from an empty working directory."""
    base = tmp_path_factory.mktemp("url_runs")
    cwd = base / "cwd"
    cwd.mkdir()
    url, local = file_url.url(base / "bucket" / "run"), str(base / "local")
    old = os.getcwd()
    os.chdir(cwd)
    try:
        for workdir in (url, local):
            train(_config(demo_px, total_steps=2, eval_every=0), workdir)
            train(_config(demo_px, total_steps=4, eval_every=4), workdir)
    finally:
        os.chdir(old)
    return types.SimpleNamespace(url=url, at_url=file_url.local(url), local=pathlib.Path(local),
                                 cwd=cwd)  # fmt: skip


def _files(root: pathlib.Path) -> set[str]:
    """Relative file names; those that differ between any two runs are made generic:
    TensorBoard's (a timestamp) and TensorStore's array data (named by their content)."""
    out = set()
    for p in root.rglob("*"):
        if p.is_file():
            rel = p.relative_to(root).as_posix()
            if rel.startswith("tensorboard/events.out.tfevents."):
                rel = "tensorboard/events.out.tfevents.*"
            if "/state/" in rel and p.parent.name == "d":
                rel = f"{p.parent.relative_to(root).as_posix()}/*"
            out.add(rel)
    return out


def _events(logdir: pathlib.Path) -> list:
    """Every Event of every TensorBoard events file (TFRecord: length, crc, data, crc)."""
    out = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        with open(path, "rb") as f:
            while header := f.read(12):
                (n,) = struct.unpack("<Q", header[:8])
                event = Event()
                event.ParseFromString(f.read(n))
                f.read(4)
                out.append(event)
    return out


def _rows(path: pathlib.Path) -> list[dict]:
    rows = [json.loads(line) for line in open(path)]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def test_a_url_workdir_holds_what_a_local_one_does(runs):
    assert os.listdir(runs.cwd) == []  # nothing went to a local "file:" folder
    files = _files(runs.at_url)
    assert files == _files(runs.local)
    for root in (runs.at_url, runs.local):  # one per run: the resumed run starts a new one
        assert len(list((root / "tensorboard").glob("events.out.tfevents.*"))) == 2
    for name in ("config.json", "parameters.txt", "metrics.jsonl",
                 "checkpoints/2/data/process_0-of-1.json",
                 "checkpoints/4/state/_METADATA", "samples/step00000002_16x16.png",
                 "samples/step00000004_16x16.png", "eval/scores.json", "eval/scores.md",
                 "eval/fid_over_steps.png", "eval/step_00000004/results.json",
                 "eval/step_00000004/results.md", "eval/step_00000004/fid.png",
                 "eval/step_00000004/16x16/grid.png",
                 "eval/step_00000004/16x16/features/batch_000000.npz",
                 "eval/reference/demo_heldout_16x16_n8.npz"):  # fmt: skip
        assert name in files, name
    for name in ("config.json", "parameters.txt", "eval/scores.json", "eval/scores.md",
                 "samples/step00000004_16x16.png", "eval/step_00000004/16x16/grid.png"):  # fmt: skip
        assert (runs.at_url / name).read_bytes() == (runs.local / name).read_bytes(), name

    # metrics.jsonl at the URL was continued by the resumed run (objects are never appended to)
    rows = _rows(runs.at_url / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 4] and "eval/16x16/fid" in rows[-1]
    assert rows == _rows(runs.local / "metrics.jsonl")
    losses = {e.step: v.simple_value for e in _events(runs.at_url / "tensorboard")
              for v in e.summary.value if v.tag == "loss"}  # fmt: skip
    assert losses == pytest.approx({r["step"]: r["loss"] for r in rows if "loss" in r}, rel=1e-6)

    # the checkpoints at the URL restore through the same reader as local ones
    config = _config("", 4, 4)
    at_url = restore_run_params(runs.url, config.model)
    jax.tree.map(np.testing.assert_array_equal, at_url,
                 restore_run_params(str(runs.local), config.model))  # fmt: skip
    exported = file_url.url(runs.at_url.parent / "ema.safetensors")  # what `export --out` does
    save_official(at_url, config.model, exported)
    got, want = load_file(file_url.local(exported)), to_torch_state_dict(at_url, config.model)
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert sorted(os.listdir(runs.at_url.parent)) == ["ema.safetensors", "run"]


def _command(name: str, *args, cwd) -> subprocess.CompletedProcess:
    """`python -m fitv2_jax.NAME ARGS` in a fresh process, with file:// registered."""
    proc = subprocess.run(
        [sys.executable, os.path.join(os.path.dirname(__file__), "file_url.py"),
         f"fitv2_jax.{name}", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, env=dict(os.environ, JAX_PLATFORMS="cpu"),
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_sample_and_evaluate_write_their_out_to_a_url(runs, tmp_path):
    """Both commands read the run at its URL and write to a URL; evaluate's scores equal those
    of the evaluation during training (same checkpoint, same settings)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    samples, scores = (
        file_url.url(tmp_path / "bucket/samples"),
        file_url.url(tmp_path / "bucket/eval"),
    )
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        sample = pool.submit(_command, "sample", "--checkpoint", runs.url, "--sizes", "16x16",
                             "--num_samples", 2, "--batch_size", 2, "--solver", "euler",
                             "--num_steps", 1, "--noprogress", "--out", samples, cwd=cwd)  # fmt: skip
        evaluate = pool.submit(_command, "evaluate", "--checkpoint", runs.url, *EVAL,
                               "--noprogress", "--out", scores, cwd=cwd)  # fmt: skip
        sample, evaluate = sample.result(), evaluate.result()
    assert os.listdir(cwd) == []
    assert samples in sample.stdout.strip().splitlines()[-1]
    assert scores in evaluate.stdout.strip().splitlines()[-1]

    d = file_url.local(samples) / "16x16"
    with np.load(d / "samples_16x16.npz") as f:
        assert f["arr_0"].shape == (2, 16, 16, 3) and f["arr_1"].shape == (2,)
        for i in range(2):
            np.testing.assert_array_equal(f["arr_0"][i], np.asarray(Image.open(d / f"{i:06d}.png")))
    assert Image.open(d / "grid.png").size[0] > 16
    info = json.loads((file_url.local(samples) / "sample_info.json").read_text())
    assert info["checkpoint"] == runs.url and info["sizes"]["16x16"]["npz"].startswith("file://")

    out = file_url.local(scores)
    got = json.loads((out / "results.json").read_text())["resolutions"]["16x16"]
    want = json.loads((runs.at_url / "eval" / "scores.json").read_text())["4"]["16x16"]
    for key in ("fid", "kid", "sfid", "precision", "recall"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-8, err_msg=key)
    for name in ("results.md", "fid.png", "16x16/grid.png", "16x16/features/batch_000000.npz",
                 "16x16/features/meta.json", "reference/demo_heldout_16x16_n8.npz"):  # fmt: skip
        assert (out / name).is_file(), name


def test_metrics_at_a_url_are_uploaded_whole_and_continued(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = file_url.url(tmp_path / "bucket/run")
    check_workdir(run)
    with pytest.raises(NotImplementedError, match="appended"):  # the store refuses appends
        paths.as_path(paths.join(run, "x")).open("a")
    for step in (1, 2):  # the second writer is a resumed run's
        writer = create_writer(run)
        writer.write_scalars(step, {"loss": step / 10})
        writer.flush()  # uploaded now, not only at close
        rows = [
            json.loads(r) for r in paths.read_text(paths.join(run, "metrics.jsonl")).splitlines()
        ]
        assert [r["step"] for r in rows] == list(range(1, step + 1))
        writer.close()
    at_url = file_url.local(run)
    steps = {e.step for e in _events(at_url / "tensorboard") for v in e.summary.value}
    assert 2 in steps  # (both writers may name their event file for the same second)
    write_text_atomic(paths.join(run, "note.txt"), "one write")  # no temporary object left
    assert sorted(os.listdir(at_url)) == ["metrics.jsonl", "note.txt", "tensorboard"]
    assert os.listdir(tmp_path) == ["bucket"]  # and no local "file:" folder


def test_url_mistakes_name_the_flag_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"--workdir foo://bucket/run: unknown URL scheme foo://"):
        train(None, "foo://bucket/run")
    if importlib.util.find_spec("gcsfs") is None:  # without the gcs extra gs:// names it
        with pytest.raises(UserError, match=r"--workdir gs://bucket/run: .*fitv2_jax\[gcs\]"):
            train(None, "gs://bucket/run")
    assert os.listdir(tmp_path) == []
