"""The training loop: `train_and_evaluate(config, workdir)`.

Builds the mesh, the sharded train state and the Grain iterator, resumes from the latest complete
checkpoint in WORKDIR by itself, runs the jitted step, logs, samples grids, saves every
`train.checkpoint_every` steps and on SIGTERM (then exits cleanly), and stops with a clear error on
a NaN/Inf loss without writing a checkpoint of the bad state.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fitv2_jax.data.pipeline import make_train_iterator, to_global_batch
from fitv2_jax.models.fit import FiT
from fitv2_jax.models.summary import summarize
from fitv2_jax.parallel.mesh import create_mesh
from fitv2_jax.parallel.rules import LOGICAL_RULES
from fitv2_jax.training.checkpoint import Checkpoints, load_inference_params
from fitv2_jax.training.state import TrainState, init_state, make_optimizer, state_shardings
from fitv2_jax.training.step import BATCH_KEYS, make_train_step

log = logging.getLogger("fitv2_jax.train")


class NonFiniteLossError(FloatingPointError):
    pass


class _Preemption:
    """SIGTERM sets a flag; the loop saves at the next step boundary and returns."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no signal handling
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _flops_per_step(model_cfg, batch: int, length: int, cache: dict) -> float:
    """Model FLOPs of one fwd+bwd step: 3 x 2 x (linear + attention-map MACs), padded length."""
    if length not in cache:
        s = summarize(model_cfg, tokens=length)
        cache[length] = 6.0 * (s["total_gmacs"] + s["attention_map_gmacs"]) * 1e9
    return cache[length] * batch


def _warm_start(state: TrainState, config, model: FiT, shardings) -> TrainState:
    """Loads init_from params (post-training) into a fresh state; optionally re-initialises the
    trainable subset as the official code does."""
    import flax

    from fitv2_jax.training.partial import is_post_training_param

    loaded = load_inference_params(
        config.train.init_from, config.model, use_ema=config.train.init_use_ema
    )
    if config.train.reinit_trainable:
        fresh = flax.traverse_util.flatten_dict(jax.device_get(state.params))
        flat = flax.traverse_util.flatten_dict(loaded)
        flat = {p: (fresh[p] if is_post_training_param(p) else v) for p, v in flat.items()}
        loaded = flax.traverse_util.unflatten_dict(flat)
    params = jax.device_put(loaded, shardings.params)
    ema = jax.device_put(loaded, shardings.ema_params)
    return state.replace(params=params, ema_params=ema)


def _sample_grids(config, model_cfg, params, step: int, workdir: str, writer) -> None:
    """Sample grids at several aspect ratios with the EMA params; PNGs in WORKDIR/samples.

    The paper's rule per size: plain RoPE in distribution, VisionNTK + attention scale beyond."""
    from PIL import Image

    from fitv2_jax import sampling

    vae = None
    if sampling.is_latent(config):
        if not config.vae_path:
            log.info("sample grids skipped: latent config without config.vae_path")
            return
        from fitv2_jax.models.vae import load_vae

        vae = load_vae(config.vae_path)
    multiple = sampling.size_multiple(config, vae)
    os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
    labels = jnp.arange(8) % model_cfg.num_classes
    images = {}
    for height, width in config.train.sample_sizes:
        h, w = sampling.patches_for(height, width, multiple)
        model = sampling.model_for_size(
            model_cfg, h, w, sampling.resolve_rule("auto", model_cfg, h, w)
        )
        tokens, _ = sampling.generate(
            model, params, jax.random.key(step), labels, h, w,
            cfg_scale=config.train.sample_cfg_scale, method="euler", num_steps=config.train.sample_steps,
        )  # fmt: skip
        x = sampling.tokens_to_images(tokens, h, w, model_cfg.patch_size)
        if vae is not None:
            x = vae.decode(jnp.asarray(x))
        grid = sampling.image_grid(sampling.to_uint8(x), cols=4)
        Image.fromarray(grid).save(
            os.path.join(workdir, "samples", f"step{step:08d}_{height}x{width}.png")
        )
        images[f"samples/{height}x{width}"] = grid[None]
    writer.write_images(step, images)


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
    """Trains until config.train.total_steps (or preemption). Returns the last logged metrics
    plus {"step", "status"} with status "done", "preempted" or "data_exhausted"."""
    from fitv2_jax.training.writers import create_writer

    if "://" in str(workdir):
        # os.makedirs would quietly make a local "gs:" directory for config.json and metrics
        # while Orbax wrote checkpoints to the bucket: a resume elsewhere would miss half the run.
        raise ValueError(
            f"--workdir {workdir}: URLs are not supported (config.json, metrics.jsonl, TensorBoard "
            "and sample grids are written through the local filesystem). Mount the bucket on "
            "every host (e.g. `gcsfuse --implicit-dirs BUCKET /gcs/BUCKET`) and pass the mount "
            "path, e.g. --workdir /gcs/BUCKET/run."
        )
    os.makedirs(workdir, exist_ok=True)
    tc = config.train
    main_process = jax.process_index() == 0
    writer = create_writer(workdir, main_process)
    if main_process:
        with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
            f.write(config.to_json_best_effort(indent=2))

    mesh = create_mesh(config.mesh.ici, config.mesh.dcn)
    model = FiT(**config.model)
    global_batch = int(config.data.global_batch_size)
    tx_factory = lambda params: make_optimizer(tc, global_batch, params)
    abstract_state, shardings = state_shardings(model, tx_factory, mesh)
    tx = tx_factory(abstract_state.params)

    data_it = make_train_iterator(
        config.data,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        seed=config.seed,
    )
    ckpt = Checkpoints(workdir, tc)
    start = ckpt.latest_step()
    if start is not None:
        log.info("resuming from %s/%d", ckpt.directory, start)
        print(f"Resuming from checkpoint step {start} in {ckpt.directory}", flush=True)
        state = ckpt.restore(start, abstract_state, shardings, data_it)
    else:
        init = jax.jit(lambda key: init_state(model, tx_factory, key), out_shardings=shardings)
        state = init(jax.random.key(config.seed))
        if tc.init_from:
            state = _warm_start(state, config, model, shardings)
        start = 0

    step_fn = jax.jit(
        make_train_step(model, config, tx),
        in_shardings=(shardings, None),
        out_shardings=(shardings, None),
        donate_argnums=(0,),
    )
    peak = float(tc.peak_flops_per_device)
    peak_label = "configured peak"
    if peak <= 0:
        from fitv2_jax.benchmarks.timing import matmul_peak_flops

        # a 2048^2 matmul in the compute dtype: the practical peak of this device (set
        # train.peak_flops_per_device to the datasheet figure for MFU as papers report it)
        peak = matmul_peak_flops(2048, jnp.dtype(config.model.dtype), repeats=3)
        peak_label = "measured matmul peak"
    num_devices = jax.device_count()
    flops_cache: dict[int, float] = {}
    milestones = {int(s) for s in tc.keep_steps}  # saved even off the checkpoint_every grid

    step = start
    status = "done"
    last_metrics: dict[str, float] = {}
    pending: list[dict] = []
    window_flops = 0.0
    window_start = time.perf_counter()
    window_steps = 0
    run_start = time.perf_counter()
    if main_process and start < tc.total_steps:
        print(f"Training {config.model.hidden_size}d x {config.model.depth} on {num_devices} devices, "
              f"mesh {dict(mesh.shape)}, steps {start} -> {tc.total_steps}, workdir {workdir}", flush=True)  # fmt: skip

    def flush_metrics() -> dict[str, float]:
        nonlocal pending, window_flops, window_start, window_steps
        fetched = jax.device_get(pending)
        pending = []
        losses = np.array([m["loss"] for m in fetched], np.float64)
        if not np.all(np.isfinite(losses)):
            bad = step - len(losses) + int(np.argmin(np.isfinite(losses)))
            last = ckpt.latest_step()
            raise NonFiniteLossError(
                f"loss is {losses[~np.isfinite(losses)][0]} at step {bad + 1}; stopping without saving. "
                f"The last good checkpoint is step {last} in {ckpt.directory}. Lower train.learning_rate, "
                "check the data, or use float32 (model.dtype) before resuming."
            )
        elapsed = time.perf_counter() - window_start
        steps_per_s = window_steps / max(elapsed, 1e-9)
        flops_per_s = window_flops / max(elapsed, 1e-9)
        out = {
            "loss": float(losses.mean()),
            "grad_norm": float(np.mean([m["grad_norm"] for m in fetched])),
            "param_norm": float(fetched[-1]["param_norm"]),
            "steps_per_sec": steps_per_s,
            "images_per_sec": steps_per_s * global_batch,
            "tokens_per_sec": float(sum(m["valid_tokens"] for m in fetched)) / max(elapsed, 1e-9),
            "model_tflops_per_sec": flops_per_s / 1e12,
            "mfu": flops_per_s / (peak * num_devices),
            "learning_rate": float(tx_lr(step)),
        }
        window_start, window_flops, window_steps = time.perf_counter(), 0.0, 0
        return out

    from fitv2_jax.training.state import learning_rate

    tx_lr = learning_rate(tc, global_batch)

    try:
        with _Preemption() as preemption:
            while step < tc.total_steps:
                try:
                    host_batch = next(data_it)
                except StopIteration:
                    status = "data_exhausted"
                    print(
                        f"The dataset ran out at step {step} (config.data.num_epochs); stopping.",
                        flush=True,
                    )
                    break
                batch = to_global_batch(
                    {k: host_batch[k] for k in BATCH_KEYS if k in host_batch}, mesh
                )
                with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
                    state, metrics = step_fn(state, batch)
                step += 1
                pending.append(metrics)
                window_steps += 1
                window_flops += _flops_per_step(
                    config.model, global_batch, batch["x"].shape[1], flops_cache
                )

                last_step = step == tc.total_steps
                stop = preemption.requested  # read once: the signal may land mid-iteration
                save_now = (
                    step % tc.checkpoint_every == 0 or step in milestones or last_step or stop
                )
                if step % tc.log_every == 0 or save_now:
                    last_metrics = flush_metrics()  # raises on NaN/Inf before anything is saved
                    writer.write_scalars(step, last_metrics)
                    if main_process:
                        eta = (tc.total_steps - step) / max(last_metrics["steps_per_sec"], 1e-9)
                        print(
                            f"step {step}/{tc.total_steps} loss {last_metrics['loss']:.4f} "
                            f"grad {last_metrics['grad_norm']:.3f} {last_metrics['steps_per_sec']:.2f} steps/s "
                            f"{last_metrics['images_per_sec']:.1f} img/s {last_metrics['tokens_per_sec']:.0f} tok/s "
                            f"{last_metrics['model_tflops_per_sec'] * 1e3:.2f} GFLOP/s "
                            f"MFU {last_metrics['mfu']:.1%} ({peak_label}) ETA {eta / 60:.1f} min",
                            flush=True,
                        )
                if save_now:
                    ckpt.save(step, state, data_it, config, force=True)
                if tc.sample_every and step % tc.sample_every == 0:
                    _sample_grids(config, config.model, state.ema_params, step, workdir, writer)
                if stop:
                    status = "preempted"
                    print(f"SIGTERM: saved step {step}; exiting.", flush=True)
                    break
        if pending:
            last_metrics = flush_metrics()
    finally:
        ckpt.close()  # completes any save in flight, also when a NaN or a crash ends the run
    writer.flush()
    if main_process:
        total = time.perf_counter() - run_start
        print(f"Finished ({status}) at step {step} after {total:.0f} s; checkpoints in {ckpt.directory}, "
              f"metrics in {os.path.join(workdir, 'metrics.jsonl')}", flush=True)  # fmt: skip
    return dict(last_metrics, step=step, status=status)


def export_ema(workdir_or_step: str, output: str, use_ema: bool = True) -> str:
    """Writes the (EMA) params of a checkpoint as an official-layout .safetensors file."""
    from safetensors.numpy import save_file

    from fitv2_jax.models.convert import to_torch_state_dict
    from fitv2_jax.training.checkpoint import CHECKPOINT_DIR, _split_step_dir

    workdir, step = _split_step_dir(workdir_or_step)
    with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
        model_cfg = json.load(f)["model"]
    params = load_inference_params(
        os.path.join(workdir, CHECKPOINT_DIR, str(step)) if step is not None else workdir,
        model_cfg,
        use_ema,
    )
    save_file(to_torch_state_dict(params, model_cfg), output)
    return output
