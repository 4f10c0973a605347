"""Orbax checkpoints of the whole run: train state, Grain iterator and config, in one manager.

    ckpt = Checkpoints(workdir, config.train)
    ckpt.save(step, state, data_iterator, config)        # async; force=True on SIGTERM
    state = ckpt.restore(step, abstract_state, shardings, data_iterator)

Layout (`fitv2_jax.weights.checkpoints`, which reads params back for inference):
WORKDIR/checkpoints/<step>/{state,data,config}. Orbax writes each step to a temporary directory
and renames it when complete, so a crash mid-save never leaves a step that restores. Restoring
places every array on the *current* mesh (the abstract target carries the shardings), so a run
saved on 8 devices resumes on 4.
"""

from __future__ import annotations

import json
import os

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from fitv2_jax.weights.checkpoints import CHECKPOINT_DIR, ITEMS


def _abstract_with(tree, shardings):
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree, shardings
    )


class Checkpoints:
    def __init__(self, workdir: str, train_cfg):
        self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
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
        )
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_state, shardings, data_iterator=None):
        """Restores the state onto `shardings` (and the iterator in place). Returns the state."""
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

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
