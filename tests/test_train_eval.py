"""Evaluation during training: config.train.eval_every scores the EMA weights with the scoring
code of `evaluate`, writes TensorBoard/metrics.jsonl scalars and the per-step table, and a resumed
run makes up an evaluation the previous one did not finish."""

import json
import os

import numpy as np
import pytest
from cli import error_line, run_cli

from fitv2_jax.config.defaults import base_config, fitv2_model
from fitv2_jax.training.loop import train
from fitv2_jax.utils.errors import UserError

SIZES = "16x16,8x32"
EVAL = dict(sizes=SIZES, num_samples=8, batch_size=8, solver="euler", num_steps=2,
            ref_source="demo", ref_split="heldout", num_ref=8, fid_method="eigh")  # fmt: skip


def _config(data_path, **eval_overrides):
    c = base_config()
    c.model = fitv2_model(hidden_size=32, depth=2, num_heads=2, num_classes=7, in_channels=3,
                          context_size=64)  # fmt: skip
    c.latent = False
    c.data.path = data_path
    c.data.global_batch_size = 8
    c.data.buckets = (64,)
    c.train.update(dict(total_steps=6, checkpoint_every=3, log_every=1, warmup_steps=0,
                        learning_rate=1e-3, eval_every=3))  # fmt: skip
    c.eval.update(dict(EVAL, **eval_overrides))
    c.mesh.ici = (2, -1, 1)
    return c


def test_eval_during_training_equals_the_evaluate_command_and_resumes(demo_px, tmp_path):
    workdir = str(tmp_path / "run")
    train(_config(demo_px), workdir)
    table = json.load(open(os.path.join(workdir, "eval", "scores.json")))
    assert sorted(table, key=int) == ["3", "6"] and list(table["6"]) == SIZES.split(",")
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    logged = {r["step"]: r for r in rows if "eval/16x16/fid" in r}
    assert sorted(logged) == [3, 6]
    for step in (3, 6):
        for size in SIZES.split(","):
            for key in ("fid", "kid", "sfid", "precision", "recall"):
                assert logged[step][f"eval/{size}/{key}"] == table[str(step)][size][key]
            assert np.isfinite(table[str(step)][size]["fid"]) and table[str(step)][size]["fid"] > 0
    md = open(os.path.join(workdir, "eval", "scores.md")).read()
    assert "| 3 |" in md and "| 6 |" in md and "16x16 FID" in md
    assert os.path.getsize(os.path.join(workdir, "eval", "fid_over_steps.png")) > 1000
    assert os.path.isfile(os.path.join(workdir, "eval", "step_00000006", "results.md"))

    # the evaluate command on the same checkpoint with the same settings: the same scores
    out = tmp_path / "evaluate"
    run_cli("evaluate", "--checkpoint", workdir, "--sizes", SIZES, "--num_samples", 8,
            "--batch_size", 8, "--solver", "euler", "--num_steps", 2, "--ref_source", "demo",
            "--ref_split", "heldout", "--num_ref", 8, "--fid_method", "eigh", "--out", out,
            "--noprogress")  # fmt: skip
    cmd = json.load(open(out / "results.json"))["resolutions"]
    for size in SIZES.split(","):
        for key in ("fid", "kid", "sfid", "precision", "recall"):
            np.testing.assert_allclose(table["6"][size][key], cmd[size][key], rtol=1e-5,
                                       atol=1e-8, err_msg=f"{size} {key}")  # fmt: skip

    # a run that stopped after saving step 6 but before its evaluation was written makes it up
    del table["6"]
    with open(os.path.join(workdir, "eval", "scores.json"), "w") as f:
        json.dump(table, f)
    result = train(_config(demo_px), workdir)
    assert result["step"] == 6
    again = json.load(open(os.path.join(workdir, "eval", "scores.json")))
    assert sorted(again, key=int) == ["3", "6"]
    assert again["6"]["16x16"]["fid"] == pytest.approx(cmd["16x16"]["fid"], rel=1e-5)


def test_eval_config_mistakes_stop_the_run_before_it_starts(demo_px, tmp_path):
    with pytest.raises(UserError, match="config.eval.ref_npz.*config.eval.ref_source"):
        train(_config(demo_px, ref_source=""), str(tmp_path / "a"))
    with pytest.raises(UserError, match="config.eval.num_samples=2"):
        train(_config(demo_px, num_samples=2), str(tmp_path / "b"))
    assert not os.path.exists(tmp_path / "a" / "checkpoints")
    proc = run_cli("train", "--config", "configs/tiny.py", "--workdir", tmp_path / "c",
                   f"--config.data.path={demo_px}", "--config.train.eval_every=5",
                   check=False)  # fmt: skip
    assert "config.eval.ref_source" in error_line(proc)
