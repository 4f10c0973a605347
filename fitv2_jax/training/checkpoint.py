"""Orbax checkpoints of the whole run: train state, Grain iterator and config, in one manager.

    ckpt = Checkpoints(workdir, config.train)
    ckpt.save(step, state, data_iterator, config)        # async; force=True on SIGTERM
    state = ckpt.restore(step, abstract_state, shardings, data_iterator)

Layout: WORKDIR/checkpoints/<step>/{state,data,config}. Orbax writes each step to a temporary
directory and renames it when complete, so a crash mid-save never leaves a step that restores.
Restoring places every array on the *current* mesh (the abstract target carries the shardings),
so a run saved on 8 devices resumes on 4.

Inference loading (`load_inference_params`) accepts an official .safetensors/.bin, our exported
.safetensors (same layout), a workdir or one checkpoint step directory (EMA params by default).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

CHECKPOINT_DIR = "checkpoints"


def _abstract_with(tree, shardings):
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree, shardings
    )


class Checkpoints:
    def __init__(self, workdir: str, train_cfg, *, read_only: bool = False):
        self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
        policies = [pp.LatestN(n=max(int(train_cfg.keep_last), 1))]
        if train_cfg.keep_steps:
            policies.append(pp.CustomSteps(steps=[int(s) for s in train_cfg.keep_steps]))
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=bool(train_cfg.async_checkpoint),
            preservation_policy=pp.AnyPreservationPolicy(policies),
            cleanup_tmp_directories=True,
            read_only=read_only,
            create=not read_only,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=("state", "data", "config"), options=options
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, data_iterator, config, force: bool = False) -> bool:
        import grain

        items = dict(
            state=ocp.args.PyTreeSave(state),
            config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
        )
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_state, shardings, data_iterator=None):
        """Restores the state onto `shardings` (and the iterator in place). Returns the state."""
        import grain

        target = _abstract_with(abstract_state, shardings)
        items = dict(
            state=ocp.args.PyTreeRestore(
                target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)
            )
        )
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"]

    def restore_params(self, step: int, model_config, use_ema: bool = True, sharding=None):
        """Only the (EMA) params of a step, without optimizer state; numpy unless `sharding`."""
        from fitv2_jax.models.convert import abstract_params

        abstract = abstract_params(model_config)
        sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), abstract
        )
        key = "ema_params" if use_ema else "params"
        item = {key: target}
        args = ocp.args.PyTreeRestore(
            item,
            restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True,
        )
        return self.manager.restore(step, args=ocp.args.Composite(state=args))["state"][key]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _split_step_dir(path: str) -> tuple[str, int | None]:
    """.../workdir, .../workdir/checkpoints or .../checkpoints/<step> -> (workdir, step)."""
    path = os.path.abspath(path.rstrip("/"))
    base = os.path.basename(path)
    if base.isdigit() and os.path.basename(os.path.dirname(path)) == CHECKPOINT_DIR:
        return os.path.dirname(os.path.dirname(path)), int(base)
    if base == CHECKPOINT_DIR:
        return os.path.dirname(path), None
    return path, None


def load_inference_params(
    path: str, model_config, use_ema: bool = True, step: int | None = None
) -> Any:
    """Params for sampling from any checkpoint a user may hold (see the module docstring)."""
    from fitv2_jax.models.convert import from_torch_state_dict, load_state_dict

    if os.path.isfile(path):
        return from_torch_state_dict(load_state_dict(path), model_config)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"Checkpoint {path!r} does not exist: give an official .safetensors/.bin, an exported "
            ".safetensors, a training workdir or WORKDIR/checkpoints/<step>."
        )
    workdir, dir_step = _split_step_dir(path)
    if not os.path.isdir(os.path.join(workdir, CHECKPOINT_DIR)):
        raise FileNotFoundError(f"{path!r} holds no {CHECKPOINT_DIR}/ directory of a training run.")
    from ml_collections import ConfigDict

    ckpt = Checkpoints(
        workdir,
        ConfigDict(dict(keep_last=1, keep_steps=(), async_checkpoint=False)),
        read_only=True,
    )
    step = step if step is not None else dir_step if dir_step is not None else ckpt.latest_step()
    if step is None:
        raise FileNotFoundError(f"No complete checkpoint under {ckpt.directory}.")
    params = ckpt.restore_params(step, model_config, use_ema)
    return jax.tree.map(np.asarray, params)
