"""Config files outside a command: `load_config("configs/fitv2_xl.py", ["model.depth=4"])`.

Commands take `--config` through `config_flags.DEFINE_config_file`; this runs the very same
parser on a private flag registry, so an override is typed the same way everywhere
(`model.latent=false` is the bool False, `model.max_pe_len_h=32` an int) and an unknown key or a
missing file is the same error. A `:arg` suffix is passed to `get_config(arg)`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

from fitv2_jax.config.official import config_from_official_yaml
from fitv2_jax.utils import paths
from fitv2_jax.utils.errors import MissingFileError, UserError
from fitv2_jax.weights.checkpoints import is_run_dir, saved_config


def load_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Runs `get_config()` of a config file, then applies `a.b=value` overrides."""
    argv = ["load_config", f"--config={path}"]
    argv += ["--config." + o.removeprefix("--config.").removeprefix("config.") for o in overrides]
    registry = flags.FlagValues()
    try:
        # config_flags reads the file at definition time (from sys_argv), so that the
        # --config.a.b overrides exist as flags when argv is parsed
        config_flags.DEFINE_config_file("config", None, "config file", flag_values=registry,
                                        lock_config=False, sys_argv=argv)  # fmt: skip
        registry(argv)
        config = check_loaded(registry.config)
    except CONFIG_ERRORS as e:
        message = config_error_message(e)
        if not message.startswith(("--config", "flag --config")):
            message = f"--config {path}: {message}"
        raise UserError(message) from e
    return config


# What config_flags raises for a missing or broken file or a bad override.
CONFIG_ERRORS = (flags.Error, OSError, AttributeError, KeyError, TypeError, ValueError)


def config_error_message(error: BaseException) -> str:
    """One readable line for a config loading error. config_flags nests the cause in its own
    words ("Configuration is not available because of an earlier failure to load: ...") or in a
    traceback; the line keeps the file and the cause."""
    raw = str(error.args[0] if error.args else error)
    if isinstance(error, OSError) and (cause := _OS_CAUSE.search(raw)):
        errno, path = int(cause.group(1)), cause.group(3)
        if errno == 2:
            where = "" if os.path.isabs(path) else f" (relative to {os.getcwd()})"
            return f"--config {path}: no such file{where}"
        return f"--config {path}: {cause.group(2)}, expected a Python file defining get_config()"
    if "Traceback (most recent call last)" in raw:
        head = raw.split("Traceback (most recent call last)")[0].split("Error whilst parsing")[0]
        last = [line.strip() for line in raw.splitlines() if line.strip()][-1]
        raw = f"{head.strip().rstrip(':')}: {last}"
    text = raw.replace("\\n", " ").replace("\\'", "'")
    text = " ".join(text.split()).replace(f"{UserError.__module__}.UserError: ", "")
    if isinstance(error, AttributeError | KeyError):
        return f"unknown config field {text.replace(chr(39), '')}"
    return text


# "[Errno 2] No such file or directory: 'configs/x.py'" inside config_flags' message
_OS_CAUSE = re.compile(r"\[Errno (\d+)\] ([^:]+): '([^']*)'")


def check_loaded(config) -> ml_collections.ConfigDict:
    """config_flags defers a file's loading error until the config is used: raise it now.
    A plain string (a bench suite's --config path, loaded later) is returned as it is."""
    if not isinstance(config, (ml_collections.ConfigDict, str)):
        config.keys()
    return config


def resolve_config(config, checkpoint: str | None = None) -> ml_collections.ConfigDict:
    """A config given as a ConfigDict, a configs/*.py file, an official YAML, or None: the
    config saved with `checkpoint` when that is one of our runs."""
    if isinstance(config, ml_collections.ConfigDict):
        return config
    if isinstance(config, str):
        if config.endswith((".yaml", ".yml")):
            return config_from_official_yaml(config)
        return load_config(config)
    if checkpoint and checkpoint != "random" and not paths.exists(checkpoint):
        raise MissingFileError(f"--checkpoint {checkpoint}: not found")
    saved = saved_config(checkpoint) if checkpoint and is_run_dir(checkpoint) else None
    if saved is None:
        raise UserError("--config is required (e.g. --config configs/fitv2_xl.py or "
                        "--official_config config_fitv2_xl.yaml), unless --checkpoint is a "
                        "training run, whose saved config is used")  # fmt: skip
    return saved
