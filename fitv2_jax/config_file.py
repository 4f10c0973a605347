"""Loading ml_collections config files outside absl: `load_config("configs/fitv2_xl.py")`.

The absl entry points use `config_flags.DEFINE_config_file`; this is the same for library code,
tests and small CLIs, with the same `a.b=value` override syntax.
"""

from __future__ import annotations

import ast
import importlib.util
import os

import ml_collections


def load_config(
    path: str, overrides: list[str] | tuple[str, ...] = ()
) -> ml_collections.ConfigDict:
    """Runs `get_config()` of a config file; an optional `:arg` suffix is passed to it."""
    arg = None
    if ":" in os.path.basename(path):
        path, arg = path.rsplit(":", 1)
    if not os.path.exists(path):
        raise FileNotFoundError(f"Config file {path!r} not found; configs live in configs/*.py.")
    spec = importlib.util.spec_from_file_location(f"_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg) if arg is not None else module.get_config()
    for item in overrides:
        key, _, value = item.partition("=")
        apply_override(config, key.strip(), value.strip())
    return config


def apply_override(config: ml_collections.ConfigDict, dotted: str, text: str) -> None:
    """Sets config.a.b from text, parsed as a Python literal when possible (else a string)."""
    *parents, leaf = dotted.split(".")
    node = config
    for name in parents:
        if name not in node:
            raise KeyError(f"Config override {dotted!r}: no field {name!r}.")
        node = node[name]
    if leaf not in node:
        raise KeyError(
            f"Config override {dotted!r}: no field {leaf!r} (known: {sorted(node.keys())})."
        )
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    with node.ignore_type():
        node[leaf] = value
