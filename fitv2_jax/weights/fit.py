"""FiT/FiTv2 params for inference from any checkpoint a user holds, and back to the official layout.

    params = load_fit_params("FiTv2_XL.safetensors", config.model)     # official file
    params = load_fit_params("hf/FiTv2_XL", config.model)               # folder with model_ema.*
    params = load_fit_params("runs/xl", config.model)                   # our run: latest EMA
    params = load_fit_params("runs/xl/checkpoints/4000", config.model, use_ema=False)
    params = load_fit_params("gs://bucket/xl", config.model)             # our run at a URL
    params = random_params(config.model, seed=0)                        # smoke tests
    save_official(params, config.model, "fitv2_ema.safetensors")       # loads in the official code

Official files are `.safetensors` (bfloat16 included) or torch pickles (`.bin`, `.pt`,
`.pth`, `.ckpt`), read without torch (`torch_files`). Every loaded tensor must be a finite float.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import jax
import numpy as np
from safetensors.numpy import save_file

from fitv2_jax.models.build import abstract_params
from fitv2_jax.models.convert import from_torch_state_dict, to_torch_state_dict
from fitv2_jax.utils import paths
from fitv2_jax.utils.errors import MissingFileError, UserError
from fitv2_jax.utils.files import publish, staging_file
from fitv2_jax.utils.safetensors_io import read_safetensors
from fitv2_jax.weights.checkpoints import is_run_dir, restore_run_params
from fitv2_jax.weights.torch_files import flatten_tree, load_torch_file

TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# The file names of the official Hugging Face folders (InfImagine/FiT, InfImagine/FiTv2).
OFFICIAL_FOLDER_FILES = ("model_ema.safetensors", "model_ema.bin", "model.safetensors", "model.bin")
# Sub-dicts a torch pickle may wrap the state dict in, tried in this order.
STATE_DICT_KEYS = ("ema", "model_ema", "model", "state_dict", "module")


def _unwrap(obj: Mapping, path: str, key: str | None) -> Mapping:
    if key is not None:
        if key not in obj:
            raise UserError(f"{path}: no {key!r} entry (it has {sorted(obj)[:10]})")
        return obj[key]
    if not any(isinstance(v, np.ndarray) for v in obj.values()):
        for candidate in STATE_DICT_KEYS:
            if isinstance(obj.get(candidate), Mapping):
                return obj[candidate]
    return obj


def read_state_dict(path: str, key: str | None = None) -> dict[str, np.ndarray]:
    """Official key -> float32 array from a .safetensors or torch file (no torch needed).

    key: a sub-dict of a torch pickle (e.g. "ema"); by default the first of STATE_DICT_KEYS
    when the top level holds no tensors. Non-float or non-finite tensors are UserErrors.
    """
    if not os.path.isfile(path):
        raise MissingFileError(f"{path}: checkpoint file not found")
    if path.endswith(".safetensors"):
        raw = read_safetensors(path)
    elif path.endswith(TORCH_SUFFIXES):
        raw = flatten_tree(_unwrap(load_torch_file(path), path, key))
    else:
        raise UserError(
            f"{path}: unknown checkpoint type; expected .safetensors or {TORCH_SUFFIXES}"
        )
    out = {}
    for name, value in raw.items():
        if not np.issubdtype(value.dtype, np.floating) and value.dtype.name != "bfloat16":
            raise UserError(f"{path}: tensor {name} is {value.dtype}, expected floating point")
        value = np.asarray(value, np.float32)
        if not np.isfinite(value).all():
            raise UserError(f"{path}: tensor {name} has NaN or Inf values")
        out[name] = value
    return out


def _official_file_in(folder: str) -> str | None:
    return next(
        (os.path.join(folder, n) for n in OFFICIAL_FOLDER_FILES if os.path.isfile(os.path.join(folder, n))),
        None,
    )  # fmt: skip


def load_fit_params(path: str, model_config, use_ema: bool = True, step: int | None = None):
    """Params (nested dict of numpy arrays) from an official file or folder, or one of our runs.

    use_ema and step apply to our runs (the official files hold the EMA weights only). A URL
    must be one of our runs (official files are read from local paths).
    """
    if paths.is_url(path):
        if not is_run_dir(path):
            raise MissingFileError(f"{path}: no training run there (no checkpoints/ folder); "
                                   "official checkpoints are read from local paths")  # fmt: skip
        return restore_run_params(path, model_config, use_ema=use_ema, step=step)
    if os.path.isfile(path):
        return from_torch_state_dict(read_state_dict(path), model_config)
    if not os.path.isdir(path):
        raise MissingFileError(
            f"{path}: checkpoint not found; give an official .safetensors/.bin file or folder, "
            "a training workdir, or WORKDIR/checkpoints/<step>"
        )
    if is_run_dir(path):
        return restore_run_params(path, model_config, use_ema=use_ema, step=step)
    official = _official_file_in(path)
    if official:
        return from_torch_state_dict(read_state_dict(official), model_config)
    raise MissingFileError(
        f"{path}: neither a training run (no checkpoints/ folder) nor an official checkpoint "
        f"folder (none of {', '.join(OFFICIAL_FOLDER_FILES)})"
    )


def random_params(model_config, seed: int = 0) -> dict:
    """Random weights drawn with numpy (no compile): kernels N(0, 1/fan_in), every other tensor
    N(0, 0.02^2) (norm scales 1 + that). Unlike the training init nothing is zero, so samples
    of a random model are not just their starting noise."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        names = [str(getattr(k, "key", k)) for k in path]
        noise = rng.standard_normal(leaf.shape, dtype=np.float32)
        if names[-1] == "kernel":
            shape = leaf.shape[1:] if names[0] == "blocks" else leaf.shape  # scanned layer axis
            return noise / math.sqrt(shape[0])  # every kernel is (D_in, D_out)
        return (1.0 if names[-1] == "scale" else 0.0) + 0.02 * noise

    return jax.tree_util.tree_map_with_path(draw, abstract_params(model_config))


def save_official(params, model_config, path: str) -> str:
    """Writes params as an official-layout .safetensors (loads in the official PyTorch FiT);
    path may be a URL."""
    if not path.endswith(".safetensors"):
        raise UserError(f"{path}: the output must be a .safetensors file")
    tmp = staging_file(path, path + ".partial.safetensors")
    save_file(to_torch_state_dict(params, model_config), tmp)
    return publish(tmp, path)
