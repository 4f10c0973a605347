"""Official PyTorch FiT checkpoints <-> Flax params.

    params = from_torch_state_dict(read_state_dict("fitv2_xl.safetensors"), config.model)
    state_dict = to_torch_state_dict(params, config.model)

    is_post_training_param(("blocks", "attn", "qkv", "bias"))   # True: in the HR subset

Reading and writing the files themselves (`read_state_dict`) lives in `fitv2_jax.weights`.

Key mapping (official key -> our path; blocks are stacked on a leading depth axis by nn.scan):
  x_embedder.proj.{weight,bias}            x_embedder/{kernel,bias}
  t_embedder.mlp.{0,2}.*                   t_embedder/mlp_{0,2}/*
  y_embedder.embedding_table.weight        y_embedder/embedding_table
  global_adaLN_modulation.1.*              global_adaLN_modulation/*
  blocks.{i}.attn.qkv.*                    blocks/attn/qkv/*        kernel (D, 3 H Dh)
  blocks.{i}.attn.proj.*                   blocks/attn/proj/*       kernel (H Dh, D)
  blocks.{i}.attn.{q,k}_norm.weight        blocks/attn/{q,k}_norm/weight
  blocks.{i}.mlp.{fc1_g,fc1_x,fc2|fc1}.*   blocks/mlp/...
  blocks.{i}.adaLN_modulation.{1,2}.*      blocks/adaLN_modulation/linear_{1,2}/*
  blocks.{i}.adaLN_modulation.fc*.*        blocks/adaLN_modulation/swiglu/fc*/*
  blocks.{i}.norm{1,2}.weight              blocks/norm{1,2}/weight  (affine norm types only)
  final_layer.{linear,norm_final,adaLN_modulation.1}.*   final_layer/...
A torch Linear weight (out, in) is our kernel (in, out) transposed, then reshaped. Every head's
channels (of q, k and v, the q/k norm weights and the output projection's inputs) are stored in
`rope.head_channel_order`: the official even channels, then the odd ones (why: models/rope.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import numpy as np

from fitv2_jax.models.build import abstract_params
from fitv2_jax.models.rope import head_channel_order
from fitv2_jax.utils.errors import UserError

_MODULE_TO_TORCH = {
    "x_embedder": "x_embedder.proj",
    "mlp_0": "mlp.0",
    "mlp_2": "mlp.2",
    "linear_1": "1",
    "linear_2": "2",
    "global_adaLN_modulation": "global_adaLN_modulation.1",
    "swiglu": None,  # the SwiGLU modulation sits directly under adaLN_modulation
}
_LEAF_TO_TORCH = {
    "kernel": "weight",
    "bias": "bias",
    "weight": "weight",
    "embedding_table": "embedding_table.weight",
}


def official_key(path: tuple[str, ...]) -> str:
    """Our param path (without the scanned `blocks` prefix) -> the official key name."""
    parts = []
    for p in path[:-1]:
        mapped = _MODULE_TO_TORCH.get(p, p)
        if mapped is not None:
            parts.append(mapped)
    parts.append(_LEAF_TO_TORCH[path[-1]])
    return ".".join(parts)


# attention leaves with a head-channel axis -> that axis, in the leaf's head view: the kernels'
# (D, 3, H, Dh) and (H, Dh, D) views (`head_view`; stored flat since checkpoint format 3)
_HEAD_CHANNEL_AXIS = {("qkv", "kernel"): -1, ("qkv", "bias"): -1, ("proj", "kernel"): -2,
                      ("q_norm", "weight"): -1, ("k_norm", "weight"): -1}  # fmt: skip


def head_channel_axis(path: tuple[str, ...]) -> int | None:
    """The axis of a head's channels in the head view of the leaf at `path` (param names; any
    prefix such as params/blocks or an optimizer state's), or None for a leaf without one."""
    return _HEAD_CHANNEL_AXIS.get(tuple(path[-2:])) if "attn" in path else None


def head_view(path: tuple[str, ...], shape, head_dim: int) -> tuple[int, ...]:
    """The shape of the leaf at `path` with every head's channels on an axis of their own: the
    flat attention kernels (any leading axes kept) (..., D, 3 H Dh) -> (..., D, 3, H, Dh) and
    (..., H Dh, D) -> (..., H, Dh, D); any other leaf as it is."""
    if len(shape) < 2:
        return tuple(shape)
    *lead, a, b = shape
    if "attn" in path and tuple(path[-2:]) == ("qkv", "kernel"):
        return (*lead, a, 3, b // (3 * head_dim), head_dim)
    if "attn" in path and tuple(path[-2:]) == ("proj", "kernel"):
        return (*lead, a // head_dim, head_dim, b)
    return tuple(shape)


def head_dim_of(model_config: Any) -> int:
    """Channels per head of a model config (`FiT.head_dim` without building the module)."""
    return model_config.hidden_size // model_config.num_heads


def _to_torch_leaf(path, value: np.ndarray, head_dim: int) -> np.ndarray:
    axis = head_channel_axis(path)
    if axis is not None:  # ours -> official channel order
        view = value.reshape(head_view(path, value.shape, head_dim))
        order = np.argsort(head_channel_order(view.shape[axis]))
        value = np.take(view, order, axis=axis).reshape(value.shape)
    if path[-1] == "kernel":
        value = value.T
    elif path[-1] == "bias":
        value = value.reshape(-1)
    return np.ascontiguousarray(value)


def _to_flax_leaf(path, value: np.ndarray, shape, head_dim: int) -> np.ndarray:
    if path[-1] == "kernel":
        value = value.T
    value = value.reshape(shape)
    axis = head_channel_axis(path)
    if axis is not None:  # official -> our channel order
        view = value.reshape(head_view(path, shape, head_dim))
        value = np.take(view, head_channel_order(view.shape[axis]), axis=axis).reshape(shape)
    return value


def _torch_shape(path, shape) -> tuple[int, ...]:
    if path[-1] == "kernel":
        return (shape[-1], math.prod(shape[:-1]))
    if path[-1] == "bias":
        return (math.prod(shape),)
    return tuple(shape)


def key_map(model_config: Any) -> dict[str, tuple[tuple[str, ...], int | None, tuple[int, ...]]]:
    """official key -> (flax path, block index or None, flax leaf shape without the depth axis)."""
    out = {}
    flat = flax.traverse_util.flatten_dict(abstract_params(model_config))
    for path, leaf in flat.items():
        if path[0] == "blocks":
            for i in range(leaf.shape[0]):
                out[f"blocks.{i}." + official_key(path[1:])] = (path, i, tuple(leaf.shape[1:]))
        else:
            out[official_key(path)] = (path, None, tuple(leaf.shape))
    return out


def _strip_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    keys = list(state_dict)
    for prefix in ("module.", "_orig_mod.", "model."):
        if keys and all(k.startswith(prefix) for k in keys):
            return {k[len(prefix) :]: v for k, v in state_dict.items()}
    return dict(state_dict)


def from_torch_state_dict(
    state_dict: Mapping[str, Any], model_config: Any, dtype=np.float32
) -> dict:
    """Official state dict (key -> array-like) -> Flax params (nested dict of numpy arrays).

    Raises ValueError listing every missing, unexpected and mis-shaped key.
    """
    state_dict = _strip_prefix(state_dict)
    mapping = key_map(model_config)
    missing = sorted(k for k in mapping if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in mapping)
    bad_shape = []
    for key, (path, _, shape) in mapping.items():
        if key in state_dict:
            got = tuple(np.shape(state_dict[key]))
            want = _torch_shape(path, shape)
            if got != want:
                bad_shape.append(f"{key}: checkpoint {got} vs model {want}")
    if missing or unexpected or bad_shape:
        lines = ["The checkpoint does not match the model config:"]
        if missing:
            lines.append(
                f"  missing keys ({len(missing)}): {missing[:20]}{' ...' if len(missing) > 20 else ''}"
            )
        if unexpected:
            lines.append(
                f"  unexpected keys ({len(unexpected)}): {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}"
            )
        if bad_shape:
            lines.append(f"  shape mismatches ({len(bad_shape)}): {bad_shape[:20]}")
        lines.append(
            "  Check that the config (depth, hidden_size, adaln_type, ...) is the checkpoint's."
        )
        raise UserError("\n".join(lines))

    flat: dict[tuple[str, ...], Any] = {}
    stacked: dict[tuple[str, ...], list] = {}
    for key, (path, index, shape) in mapping.items():
        value = _to_flax_leaf(path, np.asarray(state_dict[key], dtype=dtype), shape,
                              head_dim_of(model_config))  # fmt: skip
        if index is None:
            flat[path] = value
        else:
            stacked.setdefault(path, {})[index] = value
    for path, per_layer in stacked.items():
        flat[path] = np.stack([per_layer[i] for i in range(len(per_layer))])
    return flax.traverse_util.unflatten_dict(flat)


def to_torch_state_dict(params: Mapping[str, Any], model_config: Any) -> dict[str, np.ndarray]:
    """Flax params -> official state dict (numpy float32 arrays, official key names)."""
    params = nn.unbox(params)
    flat = flax.traverse_util.flatten_dict(dict(params))
    out = {}
    for key, (path, index, _) in key_map(model_config).items():
        if path not in flat:
            raise ValueError(
                f"params lack {'/'.join(path)} (official key {key}); wrong model config?"
            )
        value = np.asarray(jax.device_get(flat[path]), dtype=np.float32)
        out[key] = _to_torch_leaf(path, value if index is None else value[index],
                                  head_dim_of(model_config))  # fmt: skip
    return out


# The official high-resolution post-training configs list `ignore_keys: ['x_embedder', 'bias',
# 'LN', 'final_layer']`: every parameter whose official key contains one of these substrings is
# re-initialised instead of loaded, and only those train ('LN' matches `adaLN_modulation` and
# `global_adaLN_modulation`). For FiTv2-XL/2 that is 95.0M of 671.0M parameters.
OFFICIAL_POST_TRAINING_KEYS = ("x_embedder", "bias", "LN", "final_layer")


def is_post_training_param(path: tuple[str, ...], patterns=OFFICIAL_POST_TRAINING_KEYS) -> bool:
    """path: a Flax param path such as ('blocks', 'attn', 'qkv', 'bias')."""
    name = official_key(path[1:] if path[0] == "blocks" else path)
    return any(p in name for p in patterns)
