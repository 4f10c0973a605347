"""Official PyTorch FiT checkpoints <-> Flax params.

    params = from_torch_state_dict(load_state_dict("fitv2_xl.safetensors"), config.model)
    state_dict = to_torch_state_dict(params, config.model)

Key mapping (official key -> our path; blocks are stacked on a leading depth axis by nn.scan):
  x_embedder.proj.{weight,bias}            x_embedder/{kernel,bias}
  t_embedder.mlp.{0,2}.*                   t_embedder/mlp_{0,2}/*
  y_embedder.embedding_table.weight        y_embedder/embedding_table
  global_adaLN_modulation.1.*              global_adaLN_modulation/*
  blocks.{i}.attn.qkv.*                    blocks/attn/qkv/*        kernel (D, 3, H, Dh)
  blocks.{i}.attn.proj.*                   blocks/attn/proj/*       kernel (H, Dh, D)
  blocks.{i}.attn.{q,k}_norm.weight        blocks/attn/{q,k}_norm/weight
  blocks.{i}.mlp.{fc1_g,fc1_x,fc2|fc1}.*   blocks/mlp/...
  blocks.{i}.adaLN_modulation.{1,2}.*      blocks/adaLN_modulation/linear_{1,2}/*
  blocks.{i}.adaLN_modulation.fc*.*        blocks/adaLN_modulation/swiglu/fc*/*
  blocks.{i}.norm{1,2}.weight              blocks/norm{1,2}/weight  (affine norm types only)
  final_layer.{linear,norm_final,adaLN_modulation.1}.*   final_layer/...
A torch Linear weight (out, in) is our kernel (in, out) transposed, then reshaped.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fitv2_jax.models.fit import FiT

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


def build_model(model_config: Any) -> FiT:
    if isinstance(model_config, FiT):
        return model_config
    return FiT(**dict(model_config))


def abstract_params(model_config: Any) -> dict:
    """Shapes and dtypes of the Flax params (no allocation), unboxed."""
    model = build_model(model_config)
    n, d = 4, model.patch_size**2 * model.in_channels
    grid = jnp.zeros((1, 2, n), jnp.int32)
    size = jnp.full((1, 2), 2, jnp.int32)

    def init():
        x = jnp.zeros((1, n, d))
        return model.init(
            jax.random.key(0),
            x,
            jnp.zeros((1,)),
            jnp.zeros((1,), jnp.int32),
            grid,
            jnp.ones((1, n)),
            size,
        )

    return nn.unbox(jax.eval_shape(init)["params"])


def _torch_name(path: tuple[str, ...]) -> str:
    parts = []
    for p in path[:-1]:
        mapped = _MODULE_TO_TORCH.get(p, p)
        if mapped is not None:
            parts.append(mapped)
    parts.append(_LEAF_TO_TORCH[path[-1]])
    return ".".join(parts)


def _in_dims(path: tuple[str, ...]) -> int:
    """How many leading kernel axes are input features (the attention output projection: 2)."""
    return 2 if path[-2:] == ("proj", "kernel") else 1


def _to_torch_leaf(path, value: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel":
        k = _in_dims(path)
        value = value.reshape(math.prod(value.shape[:k]), -1).T
    elif path[-1] == "bias":
        value = value.reshape(-1)
    return np.ascontiguousarray(value)


def _to_flax_leaf(path, value: np.ndarray, shape) -> np.ndarray:
    if path[-1] == "kernel":
        value = value.T
    return value.reshape(shape)


def _torch_shape(path, shape) -> tuple[int, ...]:
    if path[-1] == "kernel":
        k = _in_dims(path)
        return (math.prod(shape[k:]), math.prod(shape[:k]))
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
                out[f"blocks.{i}." + _torch_name(path[1:])] = (path, i, tuple(leaf.shape[1:]))
        else:
            out[_torch_name(path)] = (path, None, tuple(leaf.shape))
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
        raise ValueError("\n".join(lines))

    flat: dict[tuple[str, ...], Any] = {}
    stacked: dict[tuple[str, ...], list] = {}
    for key, (path, index, shape) in mapping.items():
        value = _to_flax_leaf(path, np.asarray(state_dict[key], dtype=dtype), shape)
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
        out[key] = _to_torch_leaf(path, value if index is None else value[index])
    return out


def load_state_dict(path: str, key: str | None = None) -> dict[str, np.ndarray]:
    """Reads an official checkpoint: .safetensors (no torch needed) or .bin/.pt/.pth (needs torch).

    `key` selects a sub-dict (e.g. "ema", "model", "state_dict") of a torch pickle.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"Checkpoint {path!r} does not exist; pass the path of the official file."
        )
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return dict(load_file(path))
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"{path} is a torch pickle; install torch (CPU) to read it, or convert it to .safetensors."
        ) from e
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if key is not None:
        obj = obj[key]
    elif isinstance(obj, dict) and not any(hasattr(v, "shape") for v in obj.values()):
        for candidate in ("ema", "model", "state_dict", "module"):
            if candidate in obj:
                obj = obj[candidate]
                break
    return {k: v.float().numpy() for k, v in obj.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m fitv2_jax.models.convert",
        description="Convert official FiT/FiTv2 PyTorch weights to Flax params (an Orbax checkpoint "
        "directory) or back (.safetensors in the official key layout).",
    )
    parser.add_argument("--config", required=True, help="config file, e.g. configs/fitv2_xl.py")
    parser.add_argument(
        "--input", required=True, help=".safetensors/.bin (to_flax) or Orbax params dir (to_torch)"
    )
    parser.add_argument(
        "--output", required=True, help="Orbax dir (to_flax) or .safetensors (to_torch)"
    )
    parser.add_argument("--direction", choices=["to_flax", "to_torch"], default="to_flax")
    parser.add_argument("--key", default=None, help="sub-dict of a torch pickle (ema, model, ...)")
    args = parser.parse_args(argv)

    from fitv2_jax.config_file import load_config

    model_config = load_config(args.config).model
    import orbax.checkpoint as ocp

    if args.direction == "to_flax":
        params = from_torch_state_dict(load_state_dict(args.input, args.key), model_config)
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(os.path.abspath(args.output), params)
        checkpointer.wait_until_finished()
    else:
        from safetensors.numpy import save_file

        target = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract_params(model_config))
        params = ocp.StandardCheckpointer().restore(os.path.abspath(args.input), target)
        save_file(to_torch_state_dict(params, model_config), args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
