"""A config from one of the official YAML files (configs/fitv2/config_fitv2_xl.yaml, ...).

    config = config_from_official_yaml("config_fitv2_hr_xl.yaml")

Read: the network (`diffusion.network_config.params`, the FiT constructor's names as they are),
FiT v1's DDPM (`diffusion.improved_diffusion`), the sampler's ODE tolerances, the training recipe
(`accelerate`: steps, learning rate and its base batch, warmup, clipping, AdamW), the token
budget (`data...target_len`) and, for high-resolution post-training (`finetune: partial` with
`pretrain_ckpt` / `ignore_keys`), the subset that trains and where it starts from.
"""

from __future__ import annotations

import re

import ml_collections
import yaml

from fitv2_jax.config.defaults import base_config, fitv2_model
from fitv2_jax.models.convert import OFFICIAL_POST_TRAINING_KEYS
from fitv2_jax.models.fit import FIELD_NAMES, OWN_FIELDS, FiT
from fitv2_jax.utils.errors import MissingFileError, UserError

# The official FiT constructor's defaults for its network_config names (our FiT mirrors them).
OFFICIAL_DEFAULTS = {name: getattr(FiT, name) for name in FIELD_NAMES if name not in OWN_FIELDS}


def _read(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError as e:
        raise MissingFileError(f"--official_config {path}: file not found") from e
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"--official_config {path}: not a readable YAML file ({e})") from e
    if not isinstance(data, dict) or "diffusion" not in data:
        raise UserError(f"--official_config {path}: no `diffusion` section (an official FiT "
                        "config has diffusion.network_config.params)")  # fmt: skip
    return data


def _tuple(value) -> tuple[float, ...]:
    """OmegaConf's `${tuple:0.9, 0.999}` (or a plain list) -> (0.9, 0.999)."""
    if isinstance(value, str):
        value = re.sub(r"^\$\{tuple:|\}$", "", value.strip()).split(",")
    return tuple(float(v) for v in value)


def _train(config, acc: dict, net: dict) -> None:
    t = config.train
    t.total_steps = int(acc.get("max_train_steps") or t.total_steps)
    t.learning_rate = float(acc.get("learning_rate", t.learning_rate))
    t.lr_base_batch_size = int(acc.get("learning_rate_base_batch_size", t.lr_base_batch_size))
    t.warmup_steps = int(acc.get("lr_warmup_steps", t.warmup_steps) or 0)
    t.grad_clip_norm = float(acc.get("max_grad_norm", t.grad_clip_norm))
    t.grad_accum_steps = int(acc.get("gradient_accumulation_steps", 1))
    opt = (acc.get("optimizer") or {}).get("params") or {}
    if "betas" in opt:
        t.b1, t.b2 = _tuple(opt["betas"])
    t.eps = float(opt.get("eps", t.eps))
    t.weight_decay = float(opt.get("weight_decay", t.weight_decay))
    if net.get("finetune") == "partial":  # high-resolution post-training
        t.trainable, t.reinit_trainable = "post_training", True
        t.init_from = str(net.get("pretrain_ckpt") or "")
        keys = tuple(net.get("ignore_keys") or ())
        if keys and keys != OFFICIAL_POST_TRAINING_KEYS:
            raise UserError(f"ignore_keys {list(keys)}: only the official post-training subset "
                            f"{list(OFFICIAL_POST_TRAINING_KEYS)} is supported")  # fmt: skip


def config_from_official_yaml(path: str) -> ml_collections.ConfigDict:
    """Our config (`base_config` filled from the file); see the module docstring."""
    data = _read(path)
    diffusion = data["diffusion"]
    net = dict((diffusion.get("network_config") or {}).get("params") or {})
    for key in ("hidden_size", "depth", "num_heads"):
        if key not in net:
            raise UserError(f"--official_config {path}: network_config.params lacks {key!r}")
    unknown = sorted(k for k in net if k not in FIELD_NAMES)
    if unknown:
        raise UserError(f"--official_config {path}: unknown network_config.params {unknown}")
    if net.get("ignore_keys") is not None:
        net["ignore_keys"] = tuple(net["ignore_keys"])
    config = base_config()
    # names the file leaves out take the official class's defaults, as the official code does
    config.model = fitv2_model(**{**OFFICIAL_DEFAULTS, **net})
    if "improved_diffusion" in diffusion:  # FiT v1: a DDPM
        steps = int(diffusion["improved_diffusion"].get("diffusion_steps", 1000))
        config.diffusion.update(kind="ddpm", num_train_steps=steps)
        config.model.clamp_time = False
    train = ((data.get("data") or {}).get("params") or {}).get("train") or {}
    config.data.patch_size = int(config.model.patch_size)
    if train.get("target_len"):
        config.model.context_size = int(train["target_len"])
    _train(config, data.get("accelerate") or {}, net)
    return config
