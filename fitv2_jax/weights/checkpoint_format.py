"""The version of a run's checkpoints, and the upgrade of older ones on load.

Every step saved since format 2 carries WORKDIR/checkpoints/<step>/format (a JSON item, FORMAT).
Versions:
  1  no format item (runs before commit f4a6068): each head's channels in the official
     interleaved order.
  2  each head's channels in `rope.head_channel_order` (evens, then odds; models/rope.py says why).
  3  the attention kernels stored flat: q/k/v (D, 3 H Dh), not (D, 3, H, Dh); output (H Dh, D),
     not (H, Dh, D) (why: models/layers.py, DenseND).

A version-1 step restores with the same shapes as a version-2 one, so without this marker it would
resume silently with RoPE pairing the wrong channels. `upgrade` reorders it instead: the head
channels of params, EMA params and every optimizer leaf under the same path (Adam's moments are
elementwise in the gradient, which a channel permutation permutes alike). An older step is read
with the shapes it was saved with (`saved_shape`) and its attention kernels, EMA and optimizer
leaves alike, are then flattened.
"""

from __future__ import annotations

import jax

from fitv2_jax.models.convert import head_channel_axis, head_view
from fitv2_jax.models.rope import head_channel_order
from fitv2_jax.utils.errors import UserError

VERSION = 3
FORMAT = {"version": VERSION, "head_channels": "evens_then_odds", "attention_kernels": "flat"}


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


def saved_shape(path, shape, version: int, head_dim: int) -> tuple[int, ...]:
    """The shape that a leaf (at jax key `path`, of `shape` in the current format) has in a step
    of `version`: before version 3 the attention kernels' head view."""
    shape = tuple(shape)
    return shape if version >= 3 or len(shape) < 2 else head_view(_names(path), shape, head_dim)


def upgrade(tree, version: int, take):
    """`tree` (read from a step of `version`, with its `saved_shape`s) in the current format.
    take(x, indices, axis) is np.take or jnp.take; returns tree itself when nothing changes."""
    if version == VERSION:
        return tree

    def fix(path, leaf):
        names = _names(path)
        axis = head_channel_axis(names)
        if axis is None or getattr(leaf, "ndim", 0) < -axis:
            return leaf
        if version < 2:
            leaf = take(leaf, head_channel_order(leaf.shape[axis]), axis)
        if names[-2:] == ("qkv", "kernel"):  # (..., D, 3, H, Dh) -> (..., D, 3 H Dh)
            leaf = leaf.reshape(*leaf.shape[:-3], -1)
        elif names[-2:] == ("proj", "kernel"):  # (..., H, Dh, D) -> (..., H Dh, D)
            leaf = leaf.reshape(*leaf.shape[:-3], -1, leaf.shape[-1])
        return leaf

    return jax.tree_util.tree_map_with_path(fix, tree)
