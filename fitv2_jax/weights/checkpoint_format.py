"""The version of a run's checkpoints, and the upgrade of older ones on load.

Every step saved since format 2 carries WORKDIR/checkpoints/<step>/format (a JSON item, FORMAT).
Versions:
  1  no format item (runs before commit f4a6068): each head's channels in the official
     interleaved order.
  2  each head's channels in `rope.head_channel_order` (evens, then odds; models/rope.py says why).

A version-1 step restores with the same shapes as a version-2 one, so without this marker it would
resume silently with RoPE pairing the wrong channels. `upgrade` reorders it instead: the head
channels of params, EMA params and every optimizer leaf under the same path (Adam's moments are
elementwise in the gradient, which a channel permutation permutes alike).
"""

from __future__ import annotations

import jax

from fitv2_jax.models.convert import head_channel_axis
from fitv2_jax.models.rope import head_channel_order
from fitv2_jax.utils.errors import UserError

VERSION = 2
FORMAT = {"version": VERSION, "head_channels": "evens_then_odds"}


def version_of(item: dict | None, where: str) -> int:
    """The version of a step from its format item (None: no item, version 1)."""
    if item is None:
        return 1
    version = item.get("version") if isinstance(item, dict) else None
    if not isinstance(version, int) or version < 2:
        raise UserError(f"{where}: unreadable checkpoint format item {item!r}")
    if version > VERSION:
        raise UserError(f"{where}: checkpoint format {version} was written by a newer fitv2-jax "
                        f"(this one reads up to {VERSION}); upgrade fitv2-jax")  # fmt: skip
    return version


def _names(path) -> tuple[str, ...]:
    """A jax key path as names: dict keys, attribute names (optax states), sequence indices."""
    return tuple(jax.tree_util.keystr(path, simple=True, separator="/").split("/"))


def upgrade(tree, version: int, take):
    """`tree` (read from a step of `version`) in the current format. take(x, indices, axis) is
    np.take or jnp.take; returns tree itself when nothing changes."""
    if version == VERSION:
        return tree

    def fix(path, leaf):
        axis = head_channel_axis(_names(path))
        if axis is None or getattr(leaf, "ndim", 0) < -axis:
            return leaf
        return take(leaf, head_channel_order(leaf.shape[axis]), axis)

    return jax.tree_util.tree_map_with_path(fix, tree)
