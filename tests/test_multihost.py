"""A pod on one machine: the real commands on 2 and 4 processes joined by jax.distributed.

Run by `bash launch/test_multihost.sh` (CI runs it after the main suite); skipped otherwise.
Each process has its own fake CPU devices and gloo collectives (tests/multiprocess.py).
"""

import json
import os
import shutil
import signal
import time

import numpy as np
import pytest
from multiprocess import Pod

from fitv2_jax.config.files import load_config
from fitv2_jax.data.pipeline import make_train_iterator

pytestmark = pytest.mark.multihost

CONFIG = """
from fitv2_jax.config.defaults import base_config, fitv2_model

def get_config():
    c = base_config()
    c.model = fitv2_model(hidden_size=32, depth=2, num_heads=2, num_classes=7, in_channels=3,
                          context_size=64)
    c.latent = False
    c.data.path = {data!r}
    c.data.global_batch_size = 8
    c.data.buckets = (64,)
    c.train.update(dict(total_steps={steps}, checkpoint_every={every}, log_every=1,
                        warmup_steps=0, learning_rate=1e-3, async_checkpoint=False))
    c.mesh.ici = {ici}
    c.train.eval_every = {eval_every}
    c.eval.update(dict(sizes="16x16", num_samples=8, batch_size=4, solver="euler", num_steps=2,
                       ref_source="demo", ref_split="heldout", num_ref=8, fid_method="eigh"))
    return c
"""


def _config(tmp_path, data, steps, every=4, eval_every=0, ici=(2, -1, 1)):
    path = tmp_path / f"cfg_{steps}_{every}_{eval_every}_{ici[0]}.py"
    path.write_text(CONFIG.format(data=data, steps=steps, every=every, eval_every=eval_every,
                                  ici=tuple(ici)))  # fmt: skip
    return str(path)


def _losses(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}  # later rows (restarts) win


def _wait_for_step(pod, workdir, step, timeout=240):
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path) and max(_losses(workdir), default=0) >= step:
            return
        if any(p.poll() is not None for p in pod.procs):
            raise AssertionError(f"a process exited early:\n{pod.output(0)[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def _saved_steps(workdir):
    return sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())


def test_two_hosts_train_resume_after_sigkill_agree_on_sigterm_and_restore_on_one(
    demo_px, tmp_path
):
    """SIGKILL one host: the other exits (no hang); the rerun's losses equal an uninterrupted
    run's. SIGTERM one host: both save the same step and exit 0. One process resumes it.
    The uninterrupted run also evaluates its EMA weights on both hosts at step 12."""
    ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
    Pod("train", [f"--config={_config(tmp_path, demo_px, 12, eval_every=12)}",
                  f"--workdir={ref}"], num_processes=2, log_dir=tmp_path, tag="ref").check(400)  # fmt: skip
    reference = _losses(ref)
    assert sorted(reference) == list(range(1, 13))
    scores = json.load(open(os.path.join(ref, "eval", "scores.json")))
    assert list(scores) == ["12"] and np.isfinite(scores["12"]["16x16"]["fid"])
    # 2 batches of 4: host 0 sampled batch 0, host 1 batch 1, into the shared workdir
    features = os.listdir(os.path.join(ref, "eval", "step_00000012", "16x16", "features"))
    assert {"batch_000000.npz", "batch_000001.npz"} <= set(features)

    long = _config(tmp_path, demo_px, 10_000)
    pod = Pod("train", [f"--config={long}", f"--workdir={run}"], num_processes=2,
              heartbeat_timeout=10, log_dir=tmp_path, tag="kill")  # fmt: skip
    _wait_for_step(pod, run, 6)
    pod.signal(1, signal.SIGKILL)
    start = time.time()
    codes = pod.wait(timeout=90)  # heartbeat timeout 10 s: the survivor must not hang
    assert codes[1] == -signal.SIGKILL and codes[0] != 0, codes
    assert "another task died" in pod.output(0) or "unhealthy" in pod.output(0), pod.output(0)
    print(f"survivor exited {time.time() - start:.1f} s after the kill")
    assert _saved_steps(run)[-1] == 4

    pod = Pod("train", [f"--config={long}", f"--workdir={run}"], num_processes=2,
              log_dir=tmp_path, tag="resume")  # fmt: skip
    _wait_for_step(pod, run, 13)
    pod.signal(1, signal.SIGTERM)  # one host only: JAX's notifier tells the other
    assert pod.wait(timeout=120) == [0, 0]
    assert "Resuming from checkpoint step 4" in pod.output(0)
    resumed = _losses(run)
    for step in range(5, 13):
        assert resumed[step] == reference[step], (
            f"step {step}: {resumed[step]} != {reference[step]}"
        )
    stopped = [
        [line for line in pod.output(i).splitlines() if line.startswith("SIGTERM")] for i in (0, 1)
    ]
    assert stopped[0] and stopped[0] == stopped[1], stopped  # the same step on both hosts
    last = _saved_steps(run)[-1]
    assert f"saved step {last};" in stopped[0][0] and last >= 13

    # the same checkpoint on 1 process with 4 devices (the iterator state of process 0 of 2)
    one = Pod("train", [f"--config={_config(tmp_path, demo_px, last + 2)}", f"--workdir={run}"],
              num_processes=1, devices=4, log_dir=tmp_path, tag="one")  # fmt: skip
    one.check(300)
    assert f"Resuming from checkpoint step {last}" in one.output(0)
    assert max(_losses(run)) == last + 2


def test_four_hosts_prepare_their_shards_and_resume_their_iterators(demo_px, tmp_path):
    """prepare on 4 processes writes the shards one process writes; a 4-host run resumes each
    host's Grain iterator where it was: its losses equal an uninterrupted 4-host run's."""
    px4 = str(tmp_path / "px4")
    args = ["--source=demo", "--demo_crops=12", "--max_tokens=64", "--patch_size=2",
            "--num_shards=4", "--noprogress", f"--out={px4}"]  # fmt: skip
    pod = Pod("prepare", args, num_processes=4, devices=1, log_dir=tmp_path, tag="4")
    pod.check(300)
    for i in range(4):
        assert "1 written now" in pod.output(i) or "(1 written now" in pod.output(i), pod.output(i)
    px1 = str(tmp_path / "px1")
    Pod("prepare", args[:-1] + [f"--out={px1}"], num_processes=1, devices=1,
        log_dir=tmp_path, tag="1").check(300)  # fmt: skip
    names = sorted(f for f in os.listdir(px1) if not f.endswith(".json"))
    assert (
        names == sorted(f for f in os.listdir(px4) if not f.endswith(".json")) and len(names) == 4
    )
    for name in names:
        with open(os.path.join(px1, name), "rb") as a, open(os.path.join(px4, name), "rb") as b:
            assert a.read() == b.read(), name

    run, ref = str(tmp_path / "run4"), str(tmp_path / "ref4")
    # FSDP over the 4 hosts: every collective spans all of them. With 1 device per process, a
    # (2, 2) mesh's sub-group collectives intermittently stalled gloo's context set-up (30 s
    # GetKeyValue timeout), also on an idle machine.
    fsdp = (1, -1, 1)
    Pod("train", [f"--config={_config(tmp_path, px4, 4, every=2, ici=fsdp)}", f"--workdir={run}"],
        num_processes=4, devices=1, log_dir=tmp_path, tag="4a").check(300)  # fmt: skip
    data_dir = os.path.join(run, "checkpoints", "4", "data")
    states = [json.load(open(os.path.join(data_dir, f"process_{i}-of-4.json"))) for i in range(4)]
    assert all(s == states[0] for s in states)  # one global batch index (bucketing mode)
    six = _config(tmp_path, px4, 6, every=2, ici=fsdp)
    Pod("train", [f"--config={six}", f"--workdir={run}"], num_processes=4, devices=1,
        log_dir=tmp_path, tag="4b").check(300)  # fmt: skip
    Pod("train", [f"--config={six}", f"--workdir={ref}"], num_processes=4, devices=1,
        log_dir=tmp_path, tag="4ref").check(300)  # fmt: skip
    got, want = _losses(run), _losses(ref)
    # the resumed 4-host run is the uninterrupted one, step for step (another process count
    # draws other per-sample noise: it follows the rows' global order, and hosts interleave rows)
    assert sorted(got) == list(range(1, 7)) and got == want, (got, want)

    # host 2's iterator, restored from the step-4 state, yields rows 2::4 of global batch 4
    cfg = load_config(six).data
    it = make_train_iterator(cfg, process_index=2, process_count=4, seed=0, num_classes=7)
    it.set_state(states[0])
    whole = make_train_iterator(cfg, process_index=0, process_count=1, seed=0, num_classes=7)
    for _ in range(4):
        next(whole)
    np.testing.assert_array_equal(next(it)["index"], next(whole)["index"][2::4])


SAMPLE = ["--config=configs/tiny.py", "--random_init", "--config.latent=False",
          "--config.model.in_channels=3", "--config.model.patch_size=16", "--solver=euler",
          "--num_steps=2", "--sizes=64x64,32x96", "--noprogress"]  # fmt: skip


def test_sample_and_evaluate_on_two_hosts_equal_one(tmp_path):
    """sample: the same .npz from 2 hosts as from 1; evaluate: each host samples its batches,
    the features are gathered once, the scores equal one host's."""
    for n, devices in ((1, 4), (2, 2)):
        Pod("sample", SAMPLE + ["--num_samples=12", "--batch_size=8", "--nopng",
                                f"--out={tmp_path / f's{n}'}"],
            num_processes=n, devices=devices, log_dir=tmp_path, tag=str(n)).check(300)  # fmt: skip
    for size in ("64x64", "32x96"):
        a = np.load(tmp_path / "s1" / size / f"samples_{size}.npz")
        b = np.load(tmp_path / "s2" / size / f"samples_{size}.npz")
        assert a["arr_0"].shape[0] == 12
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
        np.testing.assert_array_equal(a["arr_1"], b["arr_1"])

    evaluate = SAMPLE + ["--ref_source=demo", "--ref_split=heldout", "--num_ref=16",
                         "--num_samples=24", "--batch_size=8"]  # fmt: skip
    results = {}
    for n, devices in ((1, 4), (2, 2)):
        out = tmp_path / f"e{n}"
        pod = Pod("evaluate", evaluate + [f"--out={out}"], num_processes=n, devices=devices,
                  log_dir=tmp_path, tag=str(n))  # fmt: skip
        pod.check(600)
        results[n] = json.load(open(out / "results.json"))["resolutions"]
    # 3 batches: host 0 made batches 0 and 2, host 1 batch 1
    parts = sorted(os.listdir(tmp_path / "e2" / "64x64" / "features"))
    assert [p for p in parts if p.startswith("batch_")] == [f"batch_{b:06d}.npz" for b in range(3)]
    for size, one in results[1].items():
        two = results[2][size]
        assert two["num_samples"] == one["num_samples"] == 24
        for key in ("fid", "sfid", "kid", "precision", "recall"):
            np.testing.assert_allclose(two[key], one[key], rtol=1e-4, atol=1e-6, err_msg=key)
    shutil.rmtree(tmp_path / "e1")
