"""Reading the params out of a training run's Orbax checkpoints (the run layout lives here).

    WORKDIR/config.json                       the run's config (written when the run starts)
    WORKDIR/checkpoints/<step>/state          TrainState: params, ema_params, opt_state, step, rng
    WORKDIR/checkpoints/<step>/data           the Grain iterator's position
    WORKDIR/checkpoints/<step>/config         the config the step was saved with

`fitv2_jax.training.checkpoint.Checkpoints` writes this layout; sampling, evaluation, export and
warm starts read it here, without building an optimizer.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from fitv2_jax.models.build import abstract_params
from fitv2_jax.utils.errors import MissingFileError

CHECKPOINT_DIR = "checkpoints"
ITEMS = ("state", "data", "config")
CONFIG_JSON = "config.json"


def split_step_dir(path: str) -> tuple[str, int | None]:
    """.../workdir, .../workdir/checkpoints or .../checkpoints/<step> -> (workdir, step)."""
    path = os.path.abspath(path.rstrip("/"))
    base = os.path.basename(path)
    if base.isdigit() and os.path.basename(os.path.dirname(path)) == CHECKPOINT_DIR:
        return os.path.dirname(os.path.dirname(path)), int(base)
    if base == CHECKPOINT_DIR:
        return os.path.dirname(path), None
    return path, None


def is_run_dir(path: str) -> bool:
    """Whether `path` is a workdir, its checkpoints/ folder or one step folder of a run."""
    workdir, _ = split_step_dir(path)
    return os.path.isdir(os.path.join(workdir, CHECKPOINT_DIR))


def read_only_manager(workdir: str) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR), item_names=ITEMS, options=options
    )


def restore_run_params(path: str, model_config, use_ema: bool = True, step: int | None = None):
    """The (EMA) params of one step of a run as numpy arrays, without the optimizer state.

    path: the workdir (latest complete step), WORKDIR/checkpoints, or WORKDIR/checkpoints/<step>.
    """
    workdir, dir_step = split_step_dir(path)
    manager = read_only_manager(workdir)
    step = step if step is not None else dir_step if dir_step is not None else manager.latest_step()
    if step is None or step not in manager.all_steps():
        raise MissingFileError(
            f"{path}: no complete checkpoint"
            + (f" at step {step}" if step is not None else "")
            + f" under {os.path.join(workdir, CHECKPOINT_DIR)} (steps: {list(manager.all_steps())})"
        )
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    key = "ema_params" if use_ema else "params"
    item = {
        key: jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
            abstract_params(model_config),
        )
    }
    args = ocp.args.PyTreeRestore(
        item,
        restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True,
    )
    restored = manager.restore(step, args=ocp.args.Composite(state=args))["state"][key]
    manager.close()
    return jax.tree.map(np.asarray, restored)
