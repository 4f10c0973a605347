"""The training loop: `train(config, workdir)`.

Builds the mesh, the sharded train state and the Grain iterator (`setup.build_setup`), resumes
from the latest complete checkpoint in WORKDIR by itself, runs the jitted step, logs, samples
grids, scores the EMA weights every `train.eval_every` steps (`evaluator`), saves every
`train.checkpoint_every` steps and on SIGTERM (then exits cleanly), and stops
with a clear error on a NaN/Inf loss without writing a checkpoint of the bad state.
WORKDIR is a local path or a URL (gs://...): every file goes through `utils.paths`/`utils.files`,
the checkpoints through Orbax (which takes URLs).
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from clu import parameter_overview
from jax.experimental import multihost_utils

from fitv2_jax.config.slices import live_slice, slice_note
from fitv2_jax.data.pipeline import make_train_iterator, to_global_batch
from fitv2_jax.models.convert import is_post_training_param
from fitv2_jax.models.fit import COMPUTE_OPTIONS
from fitv2_jax.models.summary import train_step_flops
from fitv2_jax.sampling.generate import generate
from fitv2_jax.sampling.images import display_scale, image_grid, to_uint8, tokens_to_images
from fitv2_jax.sampling.rules import model_for_size, resolve_rule
from fitv2_jax.sampling.sizes import is_latent, patches_for, size_multiple
from fitv2_jax.training.checkpoint import Checkpoints
from fitv2_jax.training.evaluator import TrainingEvaluator
from fitv2_jax.training.setup import TrainSetup, build_setup
from fitv2_jax.training.state import TrainState
from fitv2_jax.training.step import BATCH_KEYS
from fitv2_jax.training.writers import MetricWriter, create_writer
from fitv2_jax.utils import paths
from fitv2_jax.utils.errors import UserError
from fitv2_jax.utils.files import save_png, write_text_atomic
from fitv2_jax.utils.timing import matmul_peak_flops
from fitv2_jax.weights.checkpoints import CONFIG_JSON, saved_config
from fitv2_jax.weights.fit import load_fit_params
from fitv2_jax.weights.vae import load_vae

log = logging.getLogger("fitv2_jax.train")


class NonFiniteLossError(UserError, FloatingPointError):
    """The loss became NaN or Inf; nothing of the bad state was saved."""


class Preemption:
    """SIGTERM, agreed by every process: `reached(step)` is True at the same step everywhere.

    One process: a SIGTERM handler sets a flag, read at the next step boundary. Several
    processes (jax.distributed): jax.distributed.initialize installs JAX's preemption notifier,
    which catches SIGTERM on any host; the coordination service picks one step all hosts stop
    at (Orbax's `reached_preemption`, JAX's preemption sync point). A Python handler here would
    replace the notifier's, so none is installed. Every process calls `reached` once per step.
    """

    def __init__(self, manager=None):
        self.requested = False
        self._previous = None
        self._manager = manager if jax.process_count() > 1 else None

    def __enter__(self):
        if self._manager is not None:
            return self
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no signal handling
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def reached(self, step: int) -> bool:
        if self._manager is not None:
            self.requested = bool(self._manager.reached_preemption(step))
        return self.requested

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class MetricsWindow:
    """The step metrics since the last log line, turned into averages and rates by `flush`.

    Metrics stay on the device until flushed, so logging does not stall the step pipeline.
    MFU = model FLOP/s / (peak FLOP/s per device x devices).
    """

    def __init__(self, setup: TrainSetup, peak_flops: float):
        self.setup, self.peak = setup, peak_flops
        self.pending: list[dict] = []
        self._flops_by_length: dict[int, float] = {}
        self._reset()

    def _reset(self):
        self.pending, self.flops, self.start = [], 0.0, time.perf_counter()

    def restart_clock(self) -> None:
        """After work that is not training (sample grids, evaluation): rates exclude it."""
        self.start = time.perf_counter()

    def add(self, metrics: dict, length: int) -> None:
        if length not in self._flops_by_length:
            self._flops_by_length[length] = train_step_flops(
                self.setup.config.model,
                self.setup.global_batch,
                length,
                self.setup.config.train.trainable,
            )
        self.pending.append(metrics)
        self.flops += self._flops_by_length[length]

    def flush(self, step: int, last_checkpoint: int | None, directory: str) -> dict[str, float]:
        """Averages and rates of the window; a NaN/Inf loss raises NonFiniteLossError."""
        fetched = jax.device_get(self.pending)
        losses = np.array([m["loss"] for m in fetched], np.float64)
        if not np.all(np.isfinite(losses)):
            bad = step - len(losses) + int(np.argmin(np.isfinite(losses))) + 1
            raise NonFiniteLossError(
                f"loss is {losses[~np.isfinite(losses)][0]} at step {bad}; stopped without saving. "
                f"The last good checkpoint is step {last_checkpoint} in {directory}. Lower "
                "train.learning_rate, check the data, or use float32 (model.dtype) before resuming."
            )
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        steps_per_s = len(fetched) / elapsed
        flops_per_s = self.flops / elapsed
        out = {
            "loss": float(losses.mean()),
            "grad_norm": float(np.mean([m["grad_norm"] for m in fetched])),
            "param_norm": float(fetched[-1]["param_norm"]),
            "steps_per_sec": steps_per_s,
            "images_per_sec": steps_per_s * self.setup.global_batch,
            "tokens_per_sec": float(sum(m["valid_tokens"] for m in fetched)) / elapsed,
            "model_tflops_per_sec": flops_per_s / 1e12,
            "mfu": flops_per_s / (self.peak * jax.device_count()),
            "learning_rate": float(self.setup.learning_rate(step)),
        }
        self._reset()
        return out


def _warm_start(setup: TrainSetup, state: TrainState) -> TrainState:
    """Loads train.init_from (post-training) into a fresh state; optionally re-initialises the
    trainable subset as the official code does."""
    tc = setup.config.train
    loaded = load_fit_params(tc.init_from, setup.config.model, use_ema=tc.init_use_ema)
    if tc.reinit_trainable:
        fresh = flax.traverse_util.flatten_dict(jax.device_get(state.params))
        flat = flax.traverse_util.flatten_dict(loaded)
        flat = {p: (fresh[p] if is_post_training_param(p) else v) for p, v in flat.items()}
        loaded = flax.traverse_util.unflatten_dict(flat)
    params = jax.device_put(loaded, setup.shardings.params)
    ema = jax.device_put(loaded, setup.shardings.ema_params)
    return state.replace(params=params, ema_params=ema)


def check_resume_config(config, saved, directory: str) -> None:
    """A run resumes only with the model it was saved with (compute options may change)."""
    if saved is None or "model" not in saved:
        return
    new = json.loads(config.model.to_json_best_effort())  # the form it was saved in
    old = json.loads(saved.model.to_json_best_effort())
    diff = {k: (old.get(k), new.get(k)) for k in set(new) | set(old)
            if k not in COMPUTE_OPTIONS and old.get(k) != new.get(k)}  # fmt: skip
    if (
        "data" in saved
        and saved.data.get("patch_size", config.data.patch_size) != config.data.patch_size
    ):
        diff["data.patch_size"] = (saved.data.get("patch_size"), config.data.patch_size)
    if diff:
        changes = ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in sorted(diff.items()))
        raise UserError(f"{directory} holds a run of another model ({changes}); resume with "
                        "the same config or use another --workdir")  # fmt: skip


def _quarantine(ckpt: Checkpoints, step: int) -> str:
    """Moves a step that cannot be restored aside (never deleted), so the run can save it again."""
    src = paths.join(ckpt.directory, str(step))
    dst = f"{src}.unreadable-{int(time.time())}"
    if jax.process_index() == 0:
        paths.rename(src, dst)
    ckpt.manager.reload()
    return dst


def _restore_or_init(setup: TrainSetup, ckpt: Checkpoints, data_it) -> tuple[TrainState, int]:
    """The latest step that restores (damaged newer steps are moved aside with a warning), or
    a fresh state (warm-started from train.init_from) when there is none."""
    failures = []
    for step in sorted(ckpt.all_steps(), reverse=True):
        try:
            state = ckpt.restore(
                step,
                setup.abstract_state,
                setup.shardings,
                data_it,
                head_dim=setup.model.head_dim,
                portable_iterator=not setup.config.data.packing,
            )
        except UserError:  # intact, but not resumable this way: nothing is moved
            raise
        except Exception as e:  # noqa: BLE001 - damaged files of any kind (tensorstore, JSON)
            failures.append(f"step {step}: {' '.join(str(e).split())[:200]}")
            continue
        for bad in failures:
            moved = _quarantine(ckpt, int(bad.split(":")[0].split()[1]))
            print(f"warning: checkpoint {bad}; moved to {moved}", file=sys.stderr, flush=True)
        print(f"Resuming from checkpoint step {step} in {ckpt.directory}", flush=True)
        return state, step
    if failures:
        raise UserError(f"no checkpoint in {ckpt.directory} can be restored ({'; '.join(failures)}); "
                        "move them away to start afresh, or use another --workdir")  # fmt: skip
    state = setup.init_state(jax.random.key(setup.config.seed))
    if setup.config.train.init_from:
        state = _warm_start(setup, state)
    return state, 0


def sample_grids(config, params, step: int, workdir: str, writer: MetricWriter) -> None:
    """Sample grids at several aspect ratios with the EMA params; PNGs in WORKDIR/samples.

    The paper's rule per size: plain RoPE in distribution, VisionNTK + attention scale beyond."""
    vae = None
    if is_latent(config):
        if not config.vae_path:
            log.info("sample grids skipped: latent config without config.vae_path")
            return
        vae = load_vae(config.vae_path)
    multiple, model_cfg = size_multiple(config, vae), config.model
    paths.makedirs(paths.join(workdir, "samples"))
    labels = jnp.arange(8) % model_cfg.num_classes
    images = {}
    for height, width in config.train.sample_sizes:
        h, w = patches_for(height, width, multiple)
        model = model_for_size(model_cfg, h, w, resolve_rule("auto", model_cfg, h, w))
        tokens, _ = generate(model, params, jax.random.key(step), labels, h, w,
                             cfg_scale=config.train.sample_cfg_scale, method="euler",
                             num_steps=config.train.sample_steps)  # fmt: skip
        x = tokens_to_images(tokens, h, w, model_cfg.patch_size)
        if vae is not None:
            x = vae.decode(jnp.asarray(x))
        grid = image_grid(to_uint8(x), cols=4, scale=display_scale(height, width))
        name = f"step{step:08d}_{height}x{width}.png"
        save_png(paths.join(workdir, "samples", name), grid)
        images[f"samples/{height}x{width}"] = grid[None]
    writer.write_images(step, images)


def _write_parameter_overview(setup: TrainSetup, workdir: str) -> None:
    """WORKDIR/parameters.txt: every parameter's shape and size (clu's table); total printed."""
    params = setup.abstract_state.params
    table = parameter_overview.get_parameter_overview(params, include_stats=False)
    write_text_atomic(paths.join(workdir, "parameters.txt"), table + "\n")
    total = parameter_overview.count_parameters(params)
    print(f"{total / 1e6:.2f}M parameters ({paths.join(workdir, 'parameters.txt')})")


def _log_line(step: int, total: int, m: dict, peak_label: str) -> str:
    eta = (total - step) / max(m["steps_per_sec"], 1e-9)
    return (f"step {step}/{total} loss {m['loss']:.4f} grad {m['grad_norm']:.3f} "
            f"{m['steps_per_sec']:.2f} steps/s {m['images_per_sec']:.1f} img/s "
            f"{m['tokens_per_sec']:.0f} tok/s {m['model_tflops_per_sec'] * 1e3:.2f} GFLOP/s "
            f"MFU {m['mfu']:.1%} ({peak_label}) ETA {eta / 60:.1f} min")  # fmt: skip


def _agreed(flag: bool) -> bool:
    """Host 0's answer on every host (a decision read from host 0's files)."""
    if jax.process_count() == 1:
        return flag
    return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


def _evaluate_missed(evaluator, start: int, tc, state, writer) -> None:
    """The evaluation of the resumed step, when the run stopped before it was written."""
    if evaluator is None or start == 0:
        return
    due = start % tc.eval_every == 0 or start == tc.total_steps
    if due and _agreed(not evaluator.done(start)):
        evaluator(start, state.ema_params, writer)


def _run(setup, state, start, data_it, ckpt, writer, window, workdir, peak_label, evaluator):
    """The step loop; returns (status, step, last logged metrics)."""
    tc, main = setup.config.train, jax.process_index() == 0
    milestones = {int(s) for s in tc.keep_steps}  # saved even off the checkpoint_every grid
    step, status, last = start, "done", {}
    _evaluate_missed(evaluator, start, tc, state, writer)
    with Preemption(ckpt.manager) as preemption:
        while step < tc.total_steps:
            try:
                host_batch = next(data_it)
            except StopIteration:
                status = "data_exhausted"
                print(f"The dataset ran out at step {step} (config.data.num_epochs); stopping.")
                break
            batch = to_global_batch({k: host_batch[k] for k in BATCH_KEYS if k in host_batch},
                                    setup.mesh)  # fmt: skip
            with setup.context():
                state, metrics = setup.step(state, batch)
            step += 1
            window.add(metrics, batch["x"].shape[1])
            stop = preemption.reached(step)  # read once: the signal may land mid-iteration
            save = (step % tc.checkpoint_every == 0 or step in milestones
                    or step == tc.total_steps or stop)  # fmt: skip
            grids = bool(tc.sample_every) and step % tc.sample_every == 0 and not stop
            evaluate = evaluator is not None and not stop and (
                step % tc.eval_every == 0 or step == tc.total_steps)  # fmt: skip
            if step % tc.log_every == 0 or save or grids or evaluate:
                # raises on NaN/Inf before anything is saved
                last = window.flush(step, ckpt.latest_step(), ckpt.directory)
                writer.write_scalars(step, last)
                if main:
                    print(_log_line(step, tc.total_steps, last, peak_label), flush=True)
            if save:
                ckpt.save(step, state, data_it, setup.config, force=True)
                writer.flush()  # a URL workdir's metrics reach at least this checkpoint
            if grids:
                sample_grids(setup.config, state.ema_params, step, workdir, writer)
            if evaluate:
                evaluator(step, state.ema_params, writer)
            if grids or evaluate:
                window.restart_clock()
            if stop:
                status = "preempted"
                print(f"SIGTERM{' (agreed by all processes)' if jax.process_count() > 1 else ''}: "
                      f"saved step {step}; exiting.", flush=True)  # fmt: skip
                break
    if window.pending:
        last = window.flush(step, ckpt.latest_step(), ckpt.directory)
    return status, step, last


def _peak_flops(config) -> tuple[float, str]:
    if config.train.peak_flops_per_device > 0:
        return float(config.train.peak_flops_per_device), "configured peak"
    # a 2048^2 matmul in the compute dtype: the practical peak of this device (set
    # train.peak_flops_per_device to the datasheet figure for MFU as papers report it)
    return matmul_peak_flops(2048, jnp.dtype(config.model.dtype), repeats=3), "measured matmul peak"


def check_workdir(workdir: str) -> None:
    """A directory this process can write, made if missing: a local path (on several hosts, one
    they all see: NFS, a gcsfuse mount) or a URL every host reaches (gs://bucket/run)."""
    paths.check_writable_dir(workdir, "--workdir")


def train(config, workdir: str) -> dict[str, Any]:
    """Trains until config.train.total_steps (or preemption). Returns the last logged metrics
    plus {"step", "status"} with status "done", "preempted" or "data_exhausted"."""
    check_workdir(workdir)
    check_resume_config(config, saved_config(workdir), workdir)
    # before any work: a bad config.eval stops the run at once, not at its first evaluation
    evaluator = TrainingEvaluator(config, workdir) if config.train.eval_every else None
    setup = build_setup(config)
    running = live_slice(jax.devices())
    if jax.process_index() == 0 and running and (note := slice_note(config, *running)):
        logging.warning("%s", note)
    data_it = make_train_iterator(config.data, process_index=jax.process_index(),
                                  process_count=jax.process_count(), seed=config.seed,
                                  num_classes=int(config.model.num_classes))  # fmt: skip
    ckpt = Checkpoints(workdir, config.train)
    main, writer = jax.process_index() == 0, None
    try:
        state, start = _restore_or_init(setup, ckpt, data_it)
        if main:  # only once the run has started: a failed resume leaves config.json as it was
            write_text_atomic(
                paths.join(workdir, CONFIG_JSON), config.to_json_best_effort(indent=2)
            )
            _write_parameter_overview(setup, workdir)
        writer = create_writer(workdir, main)
        peak, peak_label = _peak_flops(config)
        if main and start < config.train.total_steps:
            print(f"Training {config.model.hidden_size}d x {config.model.depth} on "
                  f"{jax.device_count()} devices, mesh {dict(setup.mesh.shape)}, steps {start} -> "
                  f"{config.train.total_steps}, workdir {workdir}", flush=True)  # fmt: skip
        run_start = time.perf_counter()
        status, step, last = _run(setup, state, start, data_it, ckpt, writer,
                                  MetricsWindow(setup, peak), workdir, peak_label,
                                  evaluator)  # fmt: skip
    finally:
        ckpt.close()  # completes any save in flight, also when a NaN or a crash ends the run
        if writer is not None:
            writer.close()  # a URL workdir's metrics are uploaded, also after a NaN or a crash
    if main:
        print(f"Finished ({status}) at step {step} after {time.perf_counter() - run_start:.0f} s; "
              f"checkpoints in {ckpt.directory}, metrics in "
              f"{paths.join(workdir, 'metrics.jsonl')}", flush=True)  # fmt: skip
    return dict(last, step=step, status=status)
