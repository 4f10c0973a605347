"""Training: sharded step == single device, accumulation, exact resume after SIGKILL, SIGTERM,
interrupted saves, restore onto fewer devices, NaN stop, post-training subset, AOT dry run,
upgrade of older checkpoint formats."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from cli import run_cli
from jax.sharding import PartitionSpec
from safetensors.numpy import load_file

from fitv2_jax.config.defaults import base_config, fitv2_model
from fitv2_jax.config.files import load_config
from fitv2_jax.data.pipeline import make_train_iterator, to_global_batch
from fitv2_jax.flow.transport import masked_loss
from fitv2_jax.models.convert import (
    from_torch_state_dict,
    head_channel_axis,
    head_view,
    is_post_training_param,
)
from fitv2_jax.models.fit import FiT
from fitv2_jax.models.rope import head_channel_order
from fitv2_jax.models.summary import train_step_flops
from fitv2_jax.parallel.matmuls import traced_dots
from fitv2_jax.parallel.mesh import create_mesh
from fitv2_jax.parallel.rules import LOGICAL_RULES
from fitv2_jax.training.checkpoint import Checkpoints
from fitv2_jax.training.dry_run import dry_run
from fitv2_jax.training.loop import NonFiniteLossError, train
from fitv2_jax.training.state import (
    init_state,
    make_optimizer,
    state_shardings,
    trainable_labels,
)
from fitv2_jax.training.step import BATCH_KEYS, loss_fn, make_train_step, segment_losses
from fitv2_jax.utils.errors import UserError
from fitv2_jax.weights import checkpoint_format
from fitv2_jax.weights.checkpoints import restore_run_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(data_path, **train):
    c = base_config()
    c.model = fitv2_model(
        hidden_size=32, depth=2, num_heads=2, num_classes=7, in_channels=3, context_size=64
    )
    c.latent = False
    c.data.path = data_path
    c.data.global_batch_size = 8
    c.data.buckets = (64,)
    c.train.update(
        dict(total_steps=8, checkpoint_every=4, log_every=1, warmup_steps=0, learning_rate=1e-3)
    )
    c.train.update(train)
    c.mesh.ici = (2, -1, 1)
    return c


def _setup(config, mesh):
    model = FiT(**config.model)
    tx_factory = lambda p: make_optimizer(config.train, config.data.global_batch_size, p)
    abstract, shardings = state_shardings(model, tx_factory, mesh)
    tx = tx_factory(abstract.params)
    state = jax.jit(lambda k: init_state(model, tx_factory, k), out_shardings=shardings)(
        jax.random.key(0)
    )
    step = jax.jit(
        make_train_step(model, config, tx),
        in_shardings=(shardings, None),
        out_shardings=(shardings, None),
    )
    return state, step, shardings


def _first_batch(config):
    it = make_train_iterator(config.data, process_index=0, process_count=1, seed=0)
    return {k: v for k, v in next(it).items() if k in BATCH_KEYS}


def _run_step(config, mesh, batch, randomize=False):
    state, step, shardings = _setup(config, mesh)
    if randomize:  # adaLN-Zero starts with zero gates, which hides most gradients at step 1
        noise = lambda p: p + 0.05 * jax.random.normal(jax.random.key(7), p.shape, p.dtype)
        state = state.replace(params=jax.tree.map(noise, state.params))
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        new_state, metrics = step(state, to_global_batch(batch, mesh))
    return state, new_state, jax.device_get(metrics), shardings


def test_sharded_step_equals_single_device(demo_px):
    config = tiny_config(demo_px)
    batch = _first_batch(config)
    mesh = create_mesh((2, 4, 1))
    _, sharded, m_sharded, shardings = _run_step(config, mesh, batch)
    one = create_mesh((1, 1, 1), devices=jax.devices()[:1])
    _, single, m_single, _ = _run_step(config, one, batch)

    assert m_sharded["loss"] == pytest.approx(float(m_single["loss"]), rel=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-6),
        sharded.params,
        single.params,
    )
    qkv = sharded.params["blocks"]["attn"]["qkv"]["kernel"]
    assert qkv.sharding.spec == PartitionSpec(None, None, ("tensor", "fsdp"))  # (layers, D, 3 D)
    mu = sharded.opt_state[1][0].mu["blocks"]["attn"]["qkv"][
        "kernel"
    ]  # chain(clip, adamw): adam mu
    assert mu.sharding.spec == qkv.sharding.spec
    assert mu.addressable_shards[0].data.shape[2] == 3 * 32 // 4


def test_gradient_accumulation_reproduces_full_batch(demo_px):
    mesh = create_mesh((1, 1, 1), devices=jax.devices()[:1])
    full = tiny_config(demo_px)
    batch = _first_batch(full)
    _, s_full, m_full, _ = _run_step(full, mesh, batch)
    _, s_acc, m_acc, _ = _run_step(tiny_config(demo_px, grad_accum_steps=4), mesh, batch)
    assert float(m_acc["loss"]) == pytest.approx(float(m_full["loss"]), rel=1e-5)
    assert float(m_acc["grad_norm"]) == pytest.approx(float(m_full["grad_norm"]), rel=1e-4)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        s_acc.params,
        s_full.params,
    )


def test_post_training_trains_only_the_official_subset(demo_px):
    config = tiny_config(demo_px, trainable="post_training")
    mesh = create_mesh((1, 1, 1), devices=jax.devices()[:1])
    before, after, _, _ = _run_step(config, mesh, _first_batch(config), randomize=True)
    flat_b = flax.traverse_util.flatten_dict(jax.device_get(before.params))
    flat_a = flax.traverse_util.flatten_dict(jax.device_get(after.params))
    moved = {p for p in flat_b if not np.array_equal(flat_b[p], flat_a[p])}
    subset = {p for p in flat_b if is_post_training_param(p)}
    assert moved and moved <= subset
    assert ("blocks", "attn", "qkv", "kernel") not in moved
    assert ("blocks", "attn", "qkv", "bias") in moved


def test_post_training_step_skips_frozen_weight_gradients_and_updates_the_same(demo_px):
    """The frozen kernels' weight gradients are never built (torch's requires_grad=False); the
    update is the one that differentiates every parameter and lets the optimizer zero the frozen
    ones (the step before this change), and grad_norm is the clipped, trainable one."""
    post = tiny_config(demo_px, trainable="post_training")
    mesh = create_mesh((1, 1, 1), devices=jax.devices()[:1])
    before, after, metrics, _ = _run_step(post, mesh, _first_batch(post), randomize=True)

    model = FiT(**post.model)
    tx = make_optimizer(post.train, post.data.global_batch_size, before.params)
    every = make_train_step(model, tiny_config(demo_px), tx)  # all gradients, frozen zeroed by tx
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        reference, ref_metrics = jax.jit(every)(before, to_global_batch(_first_batch(post), mesh))
    assert float(metrics["loss"]) == pytest.approx(float(ref_metrics["loss"]), rel=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7),
        after.params,
        reference.params,
    )
    # grad_norm: the trainable gradients' norm, which clipping uses (the reference's is all of them)
    batch = dict(_first_batch(post), index=jnp.arange(post.data.global_batch_size))
    key = jax.random.fold_in(jax.random.wrap_key_data(before.rng), before.step)
    grads = jax.grad(lambda p: loss_fn(model, p, batch, key, post.train)[0])(before.params)
    labels = trainable_labels(before.params, "post_training")
    trained = jax.tree.map(lambda g, label: g if label == "train" else 0 * g, grads, labels)
    assert float(metrics["grad_norm"]) == pytest.approx(float(optax.tree.norm(trained)), rel=1e-5)
    assert float(ref_metrics["grad_norm"]) == pytest.approx(float(optax.tree.norm(grads)), rel=1e-5)
    assert float(metrics["grad_norm"]) < float(ref_metrics["grad_norm"])

    # the work left out is the frozen kernels' weight gradients: 2 FLOPs per MAC, as counted
    def dot_flops(config):  # the same optimizer, so only the gradients differ
        step = make_train_step(model, config, tx)
        batch = dict(_first_batch(config))
        dots = traced_dots(jax.make_jaxpr(step)(before, batch))
        return sum(d.flops * n for d, n in dots.items())

    b, n = post.data.global_batch_size, int(post.model.context_size)
    skipped = dot_flops(tiny_config(demo_px)) - dot_flops(post)
    expected = train_step_flops(post.model, b, n) - train_step_flops(
        post.model, b, n, "post_training"
    )
    assert skipped == expected > 0, (skipped, expected)


def test_restore_onto_fewer_devices(demo_px, tmp_path):
    config = tiny_config(demo_px, async_checkpoint=False)
    mesh8 = create_mesh((2, 4, 1))
    _, state8, _, _ = _run_step(config, mesh8, _first_batch(config))
    ckpt = Checkpoints(str(tmp_path), config.train)
    ckpt.save(1, state8, None, config, force=True)
    ckpt.close()

    mesh4 = create_mesh((1, 4, 1), devices=jax.devices()[:4])
    model = FiT(**config.model)
    tx_factory = lambda p: make_optimizer(config.train, 8, p)
    abstract, shardings4 = state_shardings(model, tx_factory, mesh4)
    restored = Checkpoints(str(tmp_path), config.train).restore(
        1, abstract, shardings4, head_dim=config.model.hidden_size // config.model.num_heads
    )
    kernel = restored.params["blocks"]["mlp"]["fc2"]["kernel"]
    assert len(kernel.sharding.device_set) == 4
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored, state8
    )


def test_nan_loss_stops_without_saving_the_bad_state(demo_px, tmp_path):
    # warmup makes step 1's update 0 and step 2's finite; the loss explodes from step 3 on
    config = tiny_config(
        demo_px,
        total_steps=40,
        checkpoint_every=2,
        log_every=2,
        learning_rate=1e30,
        warmup_steps=10,
    )
    config.mesh.ici = (1, -1, 1)
    with pytest.raises(NonFiniteLossError, match="last good checkpoint is step"):
        train(config, str(tmp_path))
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    saved = Checkpoints(str(tmp_path), config.train).all_steps()
    assert saved and max(saved) <= rows[-1]["step"]
    assert all(np.isfinite(r["loss"]) for r in rows)


# ---- process-level: resume after SIGKILL, SIGTERM, kill during an async save -------------------


def _write_config(path, data_path, **train):
    train = dict(
        dict(total_steps=8, checkpoint_every=4, log_every=1, warmup_steps=0, learning_rate=1e-3),
        **train,
    )
    path.write_text(
        textwrap.dedent(
            f"""
            from fitv2_jax.config.defaults import base_config, fitv2_model

            def get_config():
                c = base_config()
                c.model = fitv2_model(hidden_size=32, depth=2, num_heads=2, num_classes=7, in_channels=3, context_size=64)
                c.latent = False
                c.data.path = {data_path!r}
                c.data.global_batch_size = 8
                c.data.buckets = (64,)
                c.train.update({train!r})
                c.mesh.ici = (2, -1, 1)
                return c
            """
        )
    )
    return str(path)


def _env(tmp_path):
    env = dict(os.environ)
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "jax_cache")  # the three runs compile once
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _train_cmd(config, workdir):
    return [sys.executable, "-m", "fitv2_jax.train", f"--config={config}", f"--workdir={workdir}"]


def _losses(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows}  # later rows (after a restart) win


def _wait_for_step(proc, workdir, step, timeout=240):
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path) and any(s >= step for s in _losses(workdir)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early: {proc.stdout.read()}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def test_resume_after_sigkill_is_exact_and_sigterm_saves(demo_px, tmp_path):
    config = _write_config(tmp_path / "cfg.py", demo_px, total_steps=16)
    env = _env(tmp_path)
    ref_dir, run_dir = str(tmp_path / "ref"), str(tmp_path / "run")
    subprocess.run(_train_cmd(config, ref_dir), env=env, check=True, capture_output=True, cwd=ROOT)
    reference = _losses(ref_dir)
    assert sorted(reference) == list(range(1, 17))

    # the same run, but killed a few steps after the step-4 checkpoint (saved synchronously
    # here so that it is complete when the kill comes; async saves are tested below)
    killed = _write_config(
        tmp_path / "killed.py", demo_px, total_steps=1000, async_checkpoint=False
    )
    proc = subprocess.Popen(_train_cmd(killed, run_dir), env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    _wait_for_step(proc, run_dir, 6)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    last = Checkpoints(run_dir, tiny_config(demo_px).train).latest_step()
    assert last is not None and 4 <= last < 16 and last % 4 == 0
    out = subprocess.run(
        _train_cmd(config, run_dir), env=env, check=True, capture_output=True, text=True, cwd=ROOT
    )
    assert f"Resuming from checkpoint step {last}" in out.stdout
    resumed = _losses(run_dir)
    for step in range(last + 1, 17):
        assert resumed[step] == reference[step], (
            f"step {step}: {resumed[step]} != {reference[step]}"
        )

    # export (the command, with the run's own config.json): the EMA params of the finished run
    # as an official-layout .safetensors
    run_cli("export", "--checkpoint", ref_dir, "--out", tmp_path / "ema.safetensors")
    exported = load_file(str(tmp_path / "ema.safetensors"))
    assert "blocks.1.attn.qkv.weight" in exported and "global_adaLN_modulation.1.weight" in exported
    ema = restore_run_params(ref_dir, tiny_config(demo_px).model)
    back = from_torch_state_dict(exported, tiny_config(demo_px).model)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), ema, back)

    # SIGTERM: saves the current step and exits 0
    term_dir = str(tmp_path / "term")
    long_cfg = _write_config(
        tmp_path / "long.py", demo_px, total_steps=10_000, checkpoint_every=1000
    )
    proc = subprocess.Popen(_train_cmd(long_cfg, term_dir), env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    _wait_for_step(proc, term_dir, 3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    saved = Checkpoints(term_dir, tiny_config(demo_px).train).latest_step()
    assert saved is not None and saved >= 3


def test_kill_during_async_save_leaves_no_restorable_checkpoint(tmp_path):
    script = textwrap.dedent(
        f"""
        import os, signal, jax, jax.numpy as jnp, ml_collections
        from fitv2_jax.training.checkpoint import Checkpoints
        cfg = ml_collections.ConfigDict(dict(keep_last=3, keep_steps=(), async_checkpoint=True))
        ckpt = Checkpoints({str(tmp_path)!r}, cfg)
        small = {{"w": jnp.ones((4,))}}
        ckpt.save(1, small, None, ml_collections.ConfigDict(), force=True)
        ckpt.wait()
        big = {{"w": jnp.ones((96, 1024, 1024))}}  # 384 MB: the async write is still running
        ckpt.save(2, big, None, ml_collections.ConfigDict(), force=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    ckpt = Checkpoints(
        str(tmp_path),
        ml_collections.ConfigDict(dict(keep_last=3, keep_steps=(), async_checkpoint=False)),
    )
    assert ckpt.latest_step() == 1
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    restored = ckpt.restore(
        1, {"w": jax.ShapeDtypeStruct((4,), jnp.float32)}, {"w": sharding}, head_dim=1
    )
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.ones(4))


def test_dry_run_reports_sharded_state_and_collectives():
    config = load_config(os.path.join(ROOT, "configs", "tiny.py"))
    config.model.context_size = 16
    report = dry_run(config, global_batch=8)
    assert report["devices"] == 8
    ratio = report["params_total_bytes"] / report["params_bytes_per_device"]
    assert 5 < ratio <= 8  # FSDP over 8; small vectors (norm weights, vocab table rows) replicate
    assert report["collectives"]["all-gather"]["count"] > 0
    assert report["peak_bytes"] > report["params_bytes_per_device"]


def test_segment_losses_equal_each_images_masked_loss():
    rng = np.random.default_rng(0)
    pred, target = rng.standard_normal((2, 2, 12, 3)).astype(np.float32)
    seg = np.array([[1, 1, 1, 2, 2, 2, 2, 2, 3, 0, 0, 0], [1] * 12])
    losses, present = segment_losses(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(seg), 4)
    assert np.asarray(present).tolist() == [[True, True, True, False], [True, False, False, False]]
    for b in range(2):
        for s in range(1, 4):
            m = (seg[b] == s).astype(np.float32)[None]
            if m.sum():
                want = masked_loss(
                    jnp.asarray(pred[b : b + 1]), jnp.asarray(target[b : b + 1]), jnp.asarray(m)
                )
                assert float(losses[b, s - 1]) == pytest.approx(float(want[0]), rel=1e-6)


def test_training_on_packed_rows(demo_px, tmp_path):
    config = tiny_config(demo_px, total_steps=3, checkpoint_every=3)
    config.data.packing = True
    config.data.pack_length = 64
    config.data.pack_max_segments = 4
    config.mesh.ici = (1, -1, 1)
    result = train(config, str(tmp_path))
    assert result["status"] == "done" and np.isfinite(result["loss"])


def test_damaged_checkpoints_are_moved_aside_and_the_run_resumes_from_an_intact_one(
    demo_px, tmp_path, capsys
):
    """Step 3's iterator file emptied and step 2's array files overwritten: the rerun warns,
    moves both aside (nothing deleted), resumes from step 1 and saves steps 2-4 again."""
    config = tiny_config(demo_px, total_steps=3, checkpoint_every=1, keep_last=5,
                         async_checkpoint=False)  # fmt: skip
    config.mesh.ici = (1, -1, 1)
    train(config, str(tmp_path))
    ckpts = tmp_path / "checkpoints"
    for f in (ckpts / "3" / "data").rglob("*"):
        if f.is_file():
            f.write_bytes(b"")
    for f in (ckpts / "2" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"\x00garbage" * 8)
    capsys.readouterr()
    config.train.total_steps = 4
    result = train(config, str(tmp_path))
    out, err = capsys.readouterr()
    assert "Resuming from checkpoint step 1" in out
    assert err.count("warning: checkpoint step") == 2, err
    assert result["step"] == 4 and result["status"] == "done"
    moved = sorted(p.name.split(".")[0] for p in ckpts.glob("*.unreadable-*"))
    assert moved == ["2", "3"]
    assert Checkpoints(str(tmp_path), config.train).all_steps() == [1, 2, 3, 4]


def _as_format(tree, version: int, head_dim: int):
    """`tree` as a step of `version` held it: the attention kernels in their (D, 3, H, Dh) and
    (H, Dh, D) views (before 3), every head's channels in the official interleaved order
    (before 2)."""

    def back(path, leaf):
        names = tuple(
            str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path
        )
        axis = head_channel_axis(names)
        if axis is None:
            return leaf
        leaf = leaf.reshape(head_view(names, leaf.shape, head_dim))
        if version >= 2:
            return leaf
        return np.take(leaf, np.argsort(head_channel_order(leaf.shape[axis])), axis=axis)

    return jax.tree_util.tree_map_with_path(back, tree)


def test_steps_saved_in_older_formats_are_upgraded_on_load(demo_px, tmp_path, capsys, monkeypatch):
    """A format-1 step (interleaved head channels, no format item) and a format-2 step (attention
    kernels in their head views) resume with params, EMA and Adam moments reordered and
    flattened, and sampling reads their EMA so; a newer format is refused."""
    config = tiny_config(demo_px, async_checkpoint=False)
    head_dim = config.model.hidden_size // config.model.num_heads
    mesh = create_mesh((2, 4, 1))
    _, state, _, shardings = _run_step(config, mesh, _first_batch(config), randomize=True)
    state = jax.device_get(state)
    qkv = lambda s: s.opt_state[1][0].mu["blocks"]["attn"]["qkv"]["kernel"]  # noqa: E731
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    for version in (1, 2):
        old = _as_format(state, version, head_dim)
        assert qkv(old).ndim == qkv(state).ndim + 2 and np.abs(qkv(state)).max() > 0
        monkeypatch.setattr(checkpoint_format, "FORMAT", {"version": version})
        ckpt = Checkpoints(str(tmp_path / str(version)), config.train)
        ckpt.save(1, old, None, config, force=True)
        ckpt.close()
        if version == 1:
            shutil.rmtree(tmp_path / "1" / "checkpoints" / "1" / "format")
        monkeypatch.undo()

        capsys.readouterr()
        restored = Checkpoints(str(tmp_path / str(version)), config.train).restore(
            1, abstract, shardings, head_dim=head_dim
        )
        out = capsys.readouterr().out
        assert f"Checkpoint step 1 is format {version}; upgrading it to 3" in out
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), restored, state)
        ema = restore_run_params(str(tmp_path / str(version)), config.model)
        jax.tree.map(np.testing.assert_array_equal, ema, state.ema_params)

    monkeypatch.setattr(checkpoint_format, "FORMAT", {"version": 4})
    ckpt = Checkpoints(str(tmp_path), config.train)
    ckpt.save(2, state, None, config, force=True)
    ckpt.close()
    with pytest.raises(UserError, match="checkpoint format 4 was written by a newer fitv2-jax"):
        Checkpoints(str(tmp_path), config.train).restore(2, abstract, shardings, head_dim=head_dim)
    with pytest.raises(UserError, match="checkpoint format 4"):
        restore_run_params(str(tmp_path), config.model)
