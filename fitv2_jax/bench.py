"""Benchmarks: `python -m fitv2_jax.bench --suite NAME [suite flags]`.

Each suite lives in `fitv2_jax/benchmarks/NAME.py` and exposes `main(argv: list[str]) -> None`.
Suites report medians over repeats and ratios measured side by side in the same process, with
the machine (device kind, count, CPU cores) printed first: this machine is noisy, absolute
numbers are only comparable within one run.
"""

import argparse
import importlib
import os
import pkgutil
import platform
import sys

import fitv2_jax.benchmarks as _suites


def available_suites() -> list[str]:
    return sorted(
        m.name for m in pkgutil.iter_modules(_suites.__path__) if not m.name.startswith("_")
    )


def machine_line() -> str:
    import jax

    devs = jax.devices()
    return (
        f"machine: {platform.node()} {platform.machine()} cores={os.cpu_count()} "
        f"jax={jax.__version__} backend={jax.default_backend()} devices={len(devs)}x{devs[0].device_kind}"
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="python -m fitv2_jax.bench",
        description="Timing suites (never run in tests). Extra flags go to the suite; "
        "`--suite NAME --help` lists them.",
        add_help=False,
    )
    parser.add_argument("--suite", choices=available_suites())
    parser.add_argument("-h", "--help", action="store_true")
    args, rest = parser.parse_known_args(argv)
    if args.suite is None:
        parser.print_help()
        print("\nsuites:", ", ".join(available_suites()))
        sys.exit(0 if args.help else 2)
    if args.help:
        rest = ["--help", *rest]
    suite = importlib.import_module(f"fitv2_jax.benchmarks.{args.suite}")
    print(machine_line(), flush=True)
    suite.main(rest)


if __name__ == "__main__":
    main()
