r"""Benchmarks (never run in tests): `python -m fitv2_jax.bench --suite NAME [suite flags]`.

  python -m fitv2_jax.bench --suite model --config configs/tiny.py --batch_size 2 --repeats 1
  python -m fitv2_jax.bench --suite model --help       # the flags of one suite

Each suite lives in `fitv2_jax/benchmarks/NAME.py` (`define_flags(module_name)` and `main()`).
Suites report medians over repeats and ratios measured side by side in the same process, with
the machine (device kind, count, CPU cores) printed first: this machine is noisy, absolute
numbers are only comparable within one run.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import platform
import sys

import jax
from absl import flags

import fitv2_jax.benchmarks as _suites
from fitv2_jax.cli.app import run
from fitv2_jax.utils.errors import UserError

FLAGS = flags.FLAGS


def available_suites() -> list[str]:
    return sorted(
        m.name for m in pkgutil.iter_modules(_suites.__path__) if not m.name.startswith("_")
    )


SUITES = available_suites()
flags.DEFINE_enum("suite", None, SUITES, "the benchmark suite; `--suite NAME --help` lists its "
                  f"flags. Suites: {', '.join(SUITES)}")  # fmt: skip


def suite_from_argv(argv: list[str]) -> str | None:
    """The value of `--suite X` / `--suite=X` in argv, before absl parses the flags."""
    for i, arg in enumerate(argv[1:], 1):
        if arg == "--":
            break
        name, eq, value = arg.lstrip("-").partition("=")
        if not arg.startswith("-") or name != "suite":
            continue
        if eq:
            return value
        return argv[i + 1] if i + 1 < len(argv) else None
    return None


def machine_line() -> str:
    devs = jax.devices()
    return (
        f"machine: {platform.node()} {platform.machine()} cores={os.cpu_count()} "
        f"jax={jax.__version__} backend={jax.default_backend()} "
        f"devices={len(devs)}x{devs[0].device_kind}"
    )


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}; flags look like --batch_size 8")
    if FLAGS.suite is None:
        raise UserError(f"give --suite NAME, one of {', '.join(SUITES)} (see --help)")
    print(machine_line(), flush=True)
    importlib.import_module(f"fitv2_jax.benchmarks.{FLAGS.suite}").main()


def _load_suite(argv: list[str]) -> None:
    """Imports the suite named in argv and defines its flags as this command's (for --help)."""
    name = suite_from_argv(argv)
    if name is None:
        return
    if name not in SUITES:
        sys.stderr.write(f"error: --suite {name}: no such suite; choose one of "
                         f"{', '.join(SUITES)}\n")  # fmt: skip
        sys.exit(2)
    # absl lists the flags of the module run as __main__, which it knows as sys.argv[0].
    module_name = sys.argv[0] if __name__ == "__main__" else __name__
    suite = importlib.import_module(f"fitv2_jax.benchmarks.{name}")
    suite.define_flags(module_name)
    sys.modules[__name__].__doc__ = suite.__doc__  # what --help prints above the flags


if __name__ == "__main__":
    _load_suite(sys.argv)
    run(main)
