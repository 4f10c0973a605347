"""Reading the params out of a training run's Orbax checkpoints (the run layout lives here).

    WORKDIR/config.json                       the run's config (written when the run starts)
    WORKDIR/checkpoints/<step>/state          TrainState: params, ema_params, opt_state, step, rng
    WORKDIR/checkpoints/<step>/data           the Grain iterator's position
    WORKDIR/checkpoints/<step>/config         the config the step was saved with
    WORKDIR/checkpoints/<step>/format         its format version (`weights.checkpoint_format`)

`fitv2_jax.training.checkpoint.Checkpoints` writes this layout; sampling, evaluation, export and
warm starts read it here, without building an optimizer. WORKDIR may be a URL (gs://...).
"""

from __future__ import annotations

import json

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from fitv2_jax.models.build import abstract_params
from fitv2_jax.models.convert import head_dim_of
from fitv2_jax.utils import paths
from fitv2_jax.utils.errors import MissingFileError, UserError
from fitv2_jax.weights import checkpoint_format

CHECKPOINT_DIR = "checkpoints"
ITEMS = ("state", "data", "config", "format")
CONFIG_JSON = "config.json"


def split_step_dir(path: str) -> tuple[str, int | None]:
    """.../workdir, .../workdir/checkpoints or .../checkpoints/<step> -> (workdir, step)."""
    path = paths.absolute(path.rstrip("/"))
    base = paths.basename(path)
    if base.isdigit() and paths.basename(paths.dirname(path)) == CHECKPOINT_DIR:
        return paths.dirname(paths.dirname(path)), int(base)
    if base == CHECKPOINT_DIR:
        return paths.dirname(path), None
    return path, None


def is_run_dir(path: str) -> bool:
    """Whether `path` is a workdir, its checkpoints/ folder or one step folder of a run."""
    workdir, _ = split_step_dir(path)
    return paths.isdir(paths.join(workdir, CHECKPOINT_DIR))


def read_only_manager(workdir: str) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    return ocp.CheckpointManager(
        paths.join(paths.absolute(workdir), CHECKPOINT_DIR), item_names=ITEMS, options=options
    )


def step_version(manager: ocp.CheckpointManager, step: int) -> int:
    """The format version of a complete step (`weights.checkpoint_format`)."""
    step_dir = paths.join(str(manager.directory), str(step))
    item = None
    if paths.isdir(paths.join(step_dir, "format")):
        item = manager.restore(step, args=ocp.args.Composite(format=ocp.args.JsonRestore()))
        item = item["format"]
    return checkpoint_format.version_of(item, step_dir)


def saved_config(path: str) -> ml_collections.ConfigDict | None:
    """The config a run was saved with: that of the step (`.../checkpoints/STEP`) or the latest
    step, else WORKDIR/config.json; None when the run has neither."""
    workdir, step = split_step_dir(path)
    if paths.isdir(paths.join(workdir, CHECKPOINT_DIR)):
        manager = read_only_manager(workdir)
        step = step if step is not None else manager.latest_step()
        if step is not None and step in manager.all_steps():
            try:
                item = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
                return ml_collections.ConfigDict(item["config"])
            except Exception:  # noqa: BLE001 - a damaged item: fall back to config.json
                pass
            finally:
                manager.close()
    path = paths.join(workdir, CONFIG_JSON)
    if not paths.isfile(path):
        return None
    try:
        return ml_collections.ConfigDict(json.loads(paths.read_text(path)))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable ({e}); pass --config") from e


def check_finite(params, source: str) -> None:
    """Every tensor a float without NaN/Inf, else a UserError naming the first bad one."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        value = np.asarray(leaf)
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if not np.issubdtype(value.dtype, np.floating):
            raise UserError(f"{source}: tensor {name} is {value.dtype}, expected floating point")
        if not np.isfinite(value).all():
            raise UserError(f"{source}: tensor {name} has NaN or Inf values")


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
            + f" under {paths.join(workdir, CHECKPOINT_DIR)} (steps: {list(manager.all_steps())})"
        )
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    key = "ema_params" if use_ema else "params"
    try:
        version = step_version(manager, step)
        head_dim = head_dim_of(model_config)
        item = {
            key: jax.tree_util.tree_map_with_path(
                lambda path, s: jax.ShapeDtypeStruct(
                    checkpoint_format.saved_shape(path, s.shape, version, head_dim), s.dtype,
                    sharding=sharding),
                abstract_params(model_config),
            )
        }  # fmt: skip
        args = ocp.args.PyTreeRestore(
            item,
            restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True,
        )
        restored = manager.restore(step, args=ocp.args.Composite(state=args))["state"][key]
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - damaged files or another model's checkpoint
        message = " ".join(str(e).split())[:300]
        raise UserError(f"{path}: cannot read the {key} of step {step} ({message}); is it this "
                        "config's model, and is the step complete?") from e  # fmt: skip
    finally:
        manager.close()
    params = checkpoint_format.upgrade(jax.tree.map(np.asarray, restored), version, np.take)
    check_finite(params, f"{path} (step {step})")
    return params
