"""`--distributed` and friends: one process per host joins a multi-host JAX run.

    define_distributed_flags(__name__)     # in a command's module
    start_distributed()                    # first thing in main(), before any device is touched

auto turns it on when a coordinator is given (--coordinator_address or $JAX_COORDINATOR_ADDRESS),
under SLURM with several tasks, or on a multi-host TPU slice; jax.distributed then finds the
rest itself (SLURM, TPU metadata). Elsewhere (several processes on one machine, a custom
cluster) give --coordinator_address HOST:PORT --num_processes N --process_id I on every process.
CPU devices exchange collectives through gloo (set before initialising; harmless elsewhere).
"""

from __future__ import annotations

import os
import sys

import jax
from absl import flags

from fitv2_jax.utils.errors import UserError

FLAGS = flags.FLAGS


def define_distributed_flags(module: str) -> None:
    m = sys.argv[0] if module == "__main__" else module
    flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"], "call jax.distributed."
                      "initialize() (auto: when a coordinator, SLURM or a TPU pod is found)",
                      module_name=m)  # fmt: skip
    flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (with "
                        "--num_processes and --process_id when no cluster is detected)",
                        module_name=m)  # fmt: skip
    flags.DEFINE_integer("num_processes", None, "processes in the run", module_name=m)
    flags.DEFINE_integer("process_id", None, "this process's index in [0, num_processes)",
                         module_name=m)  # fmt: skip
    flags.DEFINE_integer("heartbeat_timeout", 100, "seconds without a heartbeat before the "
                         "other processes give up on a dead one", module_name=m)  # fmt: skip


def wanted(mode: str, coordinator: str | None) -> bool:
    if mode != "auto":
        return mode == "on"
    if coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h]) > 1


def start_distributed() -> None:
    """jax.distributed.initialize() from the flags, when wanted; a no-op otherwise."""
    address, n, pid = FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id
    if not wanted(FLAGS.distributed, address):
        if address or n is not None or pid is not None:
            raise UserError("--coordinator_address/--num_processes/--process_id need "
                            "--distributed=on or auto")  # fmt: skip
        return
    if (n is None) != (pid is None):
        raise UserError("give --num_processes and --process_id together")
    if n is not None and not 0 <= pid < n:
        raise UserError(f"--process_id {pid}: must be in [0, {n}) for --num_processes {n}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address=address, num_processes=n, process_id=pid,
                                   heartbeat_timeout_seconds=FLAGS.heartbeat_timeout)  # fmt: skip
    except (ValueError, RuntimeError) as e:
        raise UserError(f"--distributed: jax.distributed.initialize failed: {e}") from e
