"""Config files outside a command: `load_config("configs/fitv2_xl.py", ["model.depth=4"])`.

Commands take `--config` through `config_flags.DEFINE_config_file`; this runs the very same
parser on a private flag registry, so an override is typed the same way everywhere
(`model.latent=false` is the bool False, `model.max_pe_len_h=32` an int) and an unknown key or a
missing file is the same error. A `:arg` suffix is passed to `get_config(arg)`.
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

from fitv2_jax.utils.errors import UserError


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
        raise UserError(f"--config {path}: {config_error_message(e)}") from e
    return config


# What config_flags raises for a missing or broken file or a bad override.
CONFIG_ERRORS = (flags.Error, OSError, AttributeError, KeyError, TypeError, ValueError)


def config_error_message(error: BaseException) -> str:
    """One readable line for a config loading error (config_flags nests and repr-quotes them)."""
    text = str(error.args[0] if error.args else error).replace("\\n", " ").replace("\\'", "'")
    text = " ".join(text.split())
    if isinstance(error, AttributeError | KeyError):
        return f"unknown config field {text.replace(chr(39), '')}"
    return text


def check_loaded(config) -> ml_collections.ConfigDict:
    """config_flags defers a file's loading error until the config is used: raise it now."""
    if not isinstance(config, ml_collections.ConfigDict):
        config.keys()
    return config
