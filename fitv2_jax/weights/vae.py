"""Reading SD-VAE checkpoints (diffusers or CompVis/LDM layout) into a `models.vae.VAE`.

    vae = load_vae("/weights/sd-vae-ft-ema")     # diffusers folder, or a single file

Everything is normalised to the current diffusers key names first:
- old diffusers attention names (`query`, `key`, `value`, `proj_attn`) -> `to_q`, `to_k`, `to_v`,
  `to_out.0`;
- the CompVis layout (`encoder.down.{i}.block.{j}`, `mid.attn_1.q`, `decoder.up.{i}` counted from
  the lowest resolution, `nin_shortcut`, `norm_out`) -> the diffusers module tree;
then renamed to Flax paths and transposed (conv OIHW -> HWIO, linear (out, in) -> (in, out),
norm weight -> scale). Weights are read without torch: .safetensors by `safetensors_io`,
.ckpt/.bin/.pt files by `torch_files`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fitv2_jax.models.vae import SD_SCALING_FACTOR, VAE, AutoencoderKL
from fitv2_jax.utils.errors import MissingFileError, UserError
from fitv2_jax.utils.safetensors_io import read_safetensors
from fitv2_jax.weights.torch_files import flatten_tree, load_torch_file

# Training-time extras found in original VAE checkpoints (discriminator / LPIPS / EMA bookkeeping):
# not part of the autoencoder, dropped on purpose.
IGNORED_PREFIXES = ("loss.", "model_ema.")
# The part of a whole Stable Diffusion checkpoint that is the VAE.
LDM_VAE_PREFIX = "first_stage_model."

_OLD_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_COMPVIS_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v"}
_COMPVIS_ATTENTION["proj_out"] = "to_out.0"


def _compvis_to_diffusers(key: str, n_levels: int) -> str:
    """One CompVis/LDM VAE key -> its diffusers name (unchanged if it needs no renaming)."""
    p = key.split(".")
    if p[0] not in ("encoder", "decoder") or len(p) < 3:
        return key
    side, rest = p[0], p[1:]
    if rest[0] in ("down", "up"):  # encoder.down.{i}.block.{j}.x / decoder.up.{i}.upsample.conv.x
        i = int(rest[1])
        # The LDM decoder indexes `up` by resolution level (0 = full size, applied last);
        # diffusers numbers up_blocks in the order they run.
        level = i if rest[0] == "down" else n_levels - 1 - i
        head = f"{side}.{rest[0]}_blocks.{level}"
        if rest[2] == "block":
            tail = rest[4:]
            tail = ["conv_shortcut" if t == "nin_shortcut" else t for t in tail]
            return ".".join([head, "resnets", rest[3], *tail])
        if rest[2] in ("downsample", "upsample"):
            return ".".join([head, rest[2] + "rs", "0", *rest[3:]])
        return key
    if rest[0] == "mid":
        if rest[1] in ("block_1", "block_2"):
            j = int(rest[1][-1]) - 1
            return ".".join([side, "mid_block", "resnets", str(j), *rest[2:]])
        if rest[1] == "attn_1" and rest[2] in _COMPVIS_ATTENTION:
            name = _COMPVIS_ATTENTION[rest[2]]
            return ".".join([side, "mid_block", "attentions", "0", name, *rest[3:]])
        return key
    if rest[0] == "norm_out":
        return ".".join([side, "conv_norm_out", *rest[1:]])
    return key


def is_compvis_layout(state: Mapping[str, Any]) -> bool:
    return any(k.startswith(("encoder.down.", "encoder.mid.", "decoder.up.")) for k in state)


def normalize_keys(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Any supported layout -> current diffusers key names (values untouched)."""
    if any(k.startswith(LDM_VAE_PREFIX) for k in state):
        state = {
            k[len(LDM_VAE_PREFIX) :]: v for k, v in state.items() if k.startswith(LDM_VAE_PREFIX)
        }
    state = {k: v for k, v in state.items() if not k.startswith(IGNORED_PREFIXES)}
    if is_compvis_layout(state):
        ups = {int(k.split(".")[2]) for k in state if k.startswith("decoder.up.")}
        n_levels = max(ups) + 1 if ups else 0
        state = {_compvis_to_diffusers(k, n_levels): v for k, v in state.items()}
    out = {}
    for k, v in state.items():
        p = k.split(".")
        if len(p) >= 2 and "attentions" in p and p[-2] in _OLD_ATTENTION:
            k = ".".join([*p[:-2], _OLD_ATTENTION[p[-2]], p[-1]])
        out[k] = v
    return out


def infer_config(state: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """AutoencoderKL fields readable from tensor shapes (diffusers key names).

    The GroupNorm group count is not visible in the shapes; it stays at the SD value, 32.
    """

    def get(k):
        if k not in state:
            raise ValueError(f"cannot infer the VAE config: tensor {k!r} is missing")
        return state[k]

    levels = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.down_blocks.")})
    resnets = {
        int(k.split(".")[4]) for k in state if k.startswith("encoder.down_blocks.0.resnets.")
    }
    return {
        "in_channels": int(get("encoder.conv_in.weight").shape[1]),
        "out_channels": int(get("decoder.conv_out.weight").shape[0]),
        "block_out_channels": tuple(
            int(get(f"encoder.down_blocks.{i}.resnets.0.conv1.weight").shape[0]) for i in levels
        ),
        "layers_per_block": len(resnets),
        "latent_channels": int(get("decoder.conv_in.weight").shape[1]),
        "use_quant_conv": "quant_conv.weight" in state,
        "use_post_quant_conv": "post_quant_conv.weight" in state,
        "mid_block_add_attention": any(".mid_block.attentions." in k for k in state),
    }


def _load_file(path: str) -> dict[str, np.ndarray]:
    if path.endswith(".safetensors"):
        return {k: np.asarray(v, np.float32) if v.dtype.name == "bfloat16" else v
                for k, v in read_safetensors(path).items()}  # fmt: skip
    if path.endswith((".ckpt", ".bin", ".pt", ".pth")):
        obj = load_torch_file(path)
        if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
            obj = obj["state_dict"]
        return {k: np.asarray(v, np.float32) if v.dtype.name == "bfloat16" else v
                for k, v in flatten_tree(obj).items()}  # fmt: skip
    raise UserError(
        f"{path}: unknown weight file type; expected .safetensors, .ckpt, .bin, .pt or .pth"
    )


def read_checkpoint(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read weights and config from a diffusers directory or a single file.

    Returns (state dict with diffusers key names, config dict of AutoencoderKL fields plus
    scaling_factor / shift_factor when the config gives them).
    """
    if not os.path.exists(path):
        raise MissingFileError(f"{path}: VAE weights not found")
    config: dict[str, Any] = {}
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "vae", "config.json")):
            path = os.path.join(path, "vae")  # a whole diffusers pipeline directory
        cfg_file = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_file):
            raise MissingFileError(f"{path}: a diffusers VAE directory needs config.json")
        with open(cfg_file) as f:
            config = json.load(f)
        cls = config.get("_class_name", "AutoencoderKL")
        if cls != "AutoencoderKL":
            raise UserError(f"{cfg_file}: _class_name is {cls!r}, only AutoencoderKL is supported")
        for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
            if os.path.isfile(os.path.join(path, name)):
                weights = os.path.join(path, name)
                break
        else:
            raise MissingFileError(
                f"{path}: no diffusion_pytorch_model.safetensors (or .bin) next to config.json"
            )
        state = normalize_keys(_load_file(weights))
        for kind in ("down_block_types", "up_block_types"):
            bad = [
                t
                for t in config.get(kind, [])
                if t not in ("DownEncoderBlock2D", "UpDecoderBlock2D")
            ]
            if bad:
                raise UserError(f"{cfg_file}: unsupported {kind} {bad}")
        if config.get("act_fn", "silu") != "silu":
            raise UserError(f"{cfg_file}: unsupported act_fn {config['act_fn']!r}")
        try:  # fields an old config.json may lack; the key check below reports real damage
            inferred = infer_config(state)
        except ValueError:
            inferred = {}
        config = {**inferred, **{k: v for k, v in config.items() if not k.startswith("_")}}
    else:
        state = normalize_keys(_load_file(path))
        config = infer_config(state)
    return state, config


def flax_path_to_key(path: tuple[str, ...]) -> str:
    """Flax param path -> diffusers key, e.g. (encoder, down_blocks_0, downsamplers_0, kernel)
    -> encoder.down_blocks.0.downsamplers.0.conv.weight."""
    parts = []
    for name in path[:-1]:
        m = re.fullmatch(r"(.*)_(\d+)", name)
        if m:
            parts += [m.group(1), m.group(2)]
            if m.group(1) in ("downsamplers", "upsamplers"):
                parts.append("conv")
        else:
            parts.append(name)
    parts.append("bias" if path[-1] == "bias" else "weight")
    return ".".join(parts)


def _to_flax(value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Torch layout -> Flax layout for one tensor whose Flax shape is `shape`."""
    v = np.asarray(value)
    if len(shape) == 4 and v.ndim == 4:  # conv OIHW -> HWIO
        v = v.transpose(2, 3, 1, 0)
    elif len(shape) == 2:  # linear (out, in) -> (in, out); a 1x1 conv (out, in, 1, 1) also fits
        if v.ndim == 4 and v.shape[2:] == (1, 1):
            v = v[:, :, 0, 0]
        if v.ndim == 2:
            v = v.T
    return v


def to_flax_params(state: Mapping[str, np.ndarray], shapes: Any, source: str = "checkpoint"):
    """diffusers-named state dict -> Flax params tree matching `shapes` (from jax.eval_shape).

    Raises ValueError listing every missing, unexpected and mis-shaped key.
    """
    flat, treedef = jax.tree.flatten_with_path(shapes)
    keys = [flax_path_to_key(tuple(p.key for p in path)) for path, _ in flat]
    expected = set(keys)
    missing = [k for k in keys if k not in state]
    unexpected = sorted(k for k in state if k not in expected)
    leaves, bad_shape = [], []
    for key, (_, leaf) in zip(keys, flat, strict=True):
        if key not in state:
            continue
        v = _to_flax(state[key], tuple(leaf.shape))
        if tuple(v.shape) != tuple(leaf.shape):
            bad_shape.append(f"{key}: file {tuple(state[key].shape)}, model {tuple(leaf.shape)}")
        leaves.append(np.ascontiguousarray(v, dtype=np.float32))
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
    if bad_shape:
        problems.append(f"shape mismatches ({len(bad_shape)}): {'; '.join(bad_shape)}")
    if problems:
        raise UserError(
            f"{source}: the weights do not match the VAE architecture: " + " | ".join(problems)
        )
    return jax.tree.unflatten(treedef, [jax.numpy.asarray(v) for v in leaves])


def load_vae(path: str, dtype=jnp.float32, **options) -> VAE:
    """Load SD-VAE weights from a local path into a `VAE`.

    path: a diffusers directory (config.json + diffusion_pytorch_model.safetensors, or .bin) or a
    single file: diffusers-layout .safetensors, or the original CompVis/LDM layout (.safetensors or
    .ckpt; a whole Stable Diffusion checkpoint works too: its `first_stage_model.` part is used).
    dtype: compute dtype (float32, or bfloat16 for speed); parameters stay float32.
    options: VAE fields (max_pixels, tile, overlap, scaling_factor) or AutoencoderKL fields that
    override the config (e.g. norm_num_groups for a single file without config.json).
    Missing, unexpected or mis-shaped keys raise ValueError naming them.
    """
    vae_fields = {f.name for f in dataclasses.fields(VAE)} - {"module", "params"}
    vae_opts = {k: v for k, v in options.items() if k in vae_fields}
    module_opts = {k: v for k, v in options.items() if k not in vae_fields}
    state, config = read_checkpoint(path)
    module_fields = {f.name for f in dataclasses.fields(AutoencoderKL)} - {"parent", "name"}
    unknown = set(module_opts) - module_fields
    if unknown:
        raise UserError(f"load_vae: unknown options {sorted(unknown)}")
    cfg = {k: v for k, v in config.items() if k in module_fields}
    cfg.update(module_opts)
    cfg["block_out_channels"] = tuple(cfg.get("block_out_channels", (128, 256, 512, 512)))
    module = AutoencoderKL(**cfg, dtype=dtype)
    f = module.downsample_factor
    shapes = jax.eval_shape(
        lambda: module.init(jax.random.key(0), jnp.zeros((1, f, f, module.in_channels)))
    )["params"]
    params = to_flax_params(state, shapes, source=path)
    vae_opts.setdefault("scaling_factor", config.get("scaling_factor") or SD_SCALING_FACTOR)
    vae_opts.setdefault("shift_factor", config.get("shift_factor") or 0.0)
    return VAE(module, params, **vae_opts)
