"""Orbax checkpoints of the whole run: train state, Grain iterator and config, in one manager.

    ckpt = Checkpoints(workdir, config.train)
    ckpt.save(step, state, data_iterator, config)        # async; force=True on SIGTERM
    state = ckpt.restore(step, abstract_state, shardings, data_iterator, head_dim=64)

Layout (`fitv2_jax.weights.checkpoints`, which reads params back for inference):
WORKDIR/checkpoints/<step>/{state,data,config,format}. Orbax writes each step to a temporary
directory and renames it when complete, so a crash mid-save never leaves a step that restores.
Steps of an older format are upgraded on restore (`weights.checkpoint_format`). Restoring
places every array on the *current* mesh (the abstract target carries the shardings), so a run
saved on 8 devices resumes on 4, and a run of 2 processes on 1 or 4 (bucketing mode).
WORKDIR may be a URL (gs://...): Orbax writes it through epath and TensorStore's own drivers.
"""

from __future__ import annotations

import json

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from fitv2_jax.parallel.rules import fit_spec
from fitv2_jax.utils import paths
from fitv2_jax.utils.errors import UserError
from fitv2_jax.weights import checkpoint_format
from fitv2_jax.weights.checkpoints import CHECKPOINT_DIR, ITEMS, step_version


def _abstract_with(tree, shardings, version: int = checkpoint_format.VERSION, head_dim: int = 0):
    """The restore target: each leaf with the shape a step of `version` saved it with; a leaf
    whose shape changed since is sharded over FSDP on the largest axis that allows it (the
    upgrade then lays it out as `shardings` says)."""

    def one(path, s, sh):
        shape = checkpoint_format.saved_shape(path, s.shape, version, head_dim)
        if shape != tuple(s.shape):
            spec = fit_spec(PartitionSpec("fsdp"), shape, sh.mesh, jax.tree_util.keystr(path))
            sh = NamedSharding(sh.mesh, spec)
        return jax.ShapeDtypeStruct(shape, s.dtype, sharding=sh)

    return jax.tree_util.tree_map_with_path(one, tree, shardings)


def _foreign_iterator_state(data_dir: str, own: str, portable: bool) -> dict:
    """The iterator state saved by process 0 of a run with another process count."""
    names = sorted(paths.listdir(data_dir))
    saved = [f for f in names if f.startswith("process_0-of-")]
    if not portable or not saved:
        raise UserError(
            f"{data_dir} has no {own}: the run was saved with another number of processes "
            f"({', '.join(names)}). Packed data streams are per host; "
            "resume with the process count it was saved with"
        )
    return json.loads(paths.read_text(paths.join(data_dir, saved[0])))


class Checkpoints:
    def __init__(self, workdir: str, train_cfg):
        self.directory = paths.join(paths.absolute(workdir), CHECKPOINT_DIR)
        policies = [pp.LatestN(n=max(int(train_cfg.keep_last), 1))]
        if train_cfg.keep_steps:
            policies.append(pp.CustomSteps(steps=[int(s) for s in train_cfg.keep_steps]))
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=bool(train_cfg.async_checkpoint),
            preservation_policy=pp.AnyPreservationPolicy(policies),
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, item_names=ITEMS, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, data_iterator, config, force: bool = False) -> bool:
        items = dict(
            state=ocp.args.PyTreeSave(state),
            config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
            format=ocp.args.JsonSave(checkpoint_format.FORMAT),
        )
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_state, shardings, data_iterator=None, *,
                head_dim: int, portable_iterator: bool = False):  # fmt: skip
        """Restores the state onto `shardings` (and the iterator in place). Returns the state.
        head_dim: the model's channels per head (steps saved before format 3 need it).

        Grain keeps one iterator file per process (process_I-of-N.json). On another process
        count, a portable iterator (bucketing mode: every host's state is the same global batch
        index) takes the state of the saved process 0; any other is refused."""
        version = step_version(self.manager, step)
        target = _abstract_with(abstract_state, shardings, version, head_dim)
        items = dict(
            state=ocp.args.PyTreeRestore(
                target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)
            )
        )
        data_dir = paths.join(self.directory, str(step), "data")
        own = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        foreign = None
        if data_iterator is not None and paths.isdir(data_dir):
            if paths.isfile(paths.join(data_dir, own)):
                items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
            else:
                foreign = _foreign_iterator_state(data_dir, own, portable_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        if foreign is not None:
            data_iterator.set_state(foreign)
        state = restored["state"]
        if version != checkpoint_format.VERSION:
            print(
                f"Checkpoint step {step} is format {version}; upgrading it to "
                f"{checkpoint_format.VERSION} on load (weights/checkpoint_format.py)",
                flush=True,
            )
            upgrade = lambda s: checkpoint_format.upgrade(s, version, jnp.take)  # noqa: E731
            state = jax.jit(upgrade, out_shardings=shardings, donate_argnums=0)(state)
        return state

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
