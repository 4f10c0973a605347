"""`run(main)`: absl's app.run, with a user's mistake reported as one line instead of a traceback.

Library code raises `fitv2_jax.utils.errors.UserError` for bad input (files, flags, configs,
data, checkpoints); here it becomes `error: <message>` on stderr and exit status 2. Any other
exception is a bug and keeps its traceback. `--traceback` shows it for user errors too.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from absl import app, flags, logging

from fitv2_jax.config.files import CONFIG_ERRORS, check_loaded, config_error_message
from fitv2_jax.utils.errors import UserError
from fitv2_jax.utils.host_memory import keep_freed_memory

flags.DEFINE_bool("traceback", False, "show the Python traceback of input errors too",
                  module_name="fitv2_jax.cli.app")  # fmt: skip
FLAGS = flags.FLAGS


def one_line(error: BaseException) -> str:
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a bad flag or config reported as one line naming it (exit
    status 2)."""
    try:
        rest = FLAGS(argv)
        if "config" in FLAGS and FLAGS["config"].value is not None:
            check_loaded(FLAGS["config"].value)
        return rest
    except CONFIG_ERRORS as e:
        sys.stderr.write(f"error: {config_error_message(e)} (see --help)\n")
        sys.exit(2)


def run(main: Callable[[list[str]], None]) -> None:
    """app.run(main); main returns None (absl would use a return value as the exit status).

    Every command first keeps freed host memory for reuse (`utils.host_memory`): XLA:CPU's
    per-step scratch would otherwise be page-faulted afresh on every call.
    """
    keep_freed_memory()

    def wrapped(argv):
        if not FLAGS["verbosity"].present:
            # warnings and errors only (the commands print their own progress): libraries
            # such as Orbax log every save at INFO; --verbosity=0 shows them
            logging.set_verbosity(logging.WARNING)
        try:
            main(argv)
        except UserError as e:
            if FLAGS.traceback:
                raise
            sys.stderr.write(f"error: {one_line(e)}\n")
            sys.exit(2)

    argv = sys.argv[1:]
    if any(a in ("-h", "-?", "--help", "--helpshort", "--helpfull") for a in argv):
        # absl exits 1 after --help; asking for help is not a failure
        app.usage(shorthelp="--helpfull" not in argv, writeto_stdout=True, exitcode=0)
    app.run(wrapped, flags_parser=parse_flags)
