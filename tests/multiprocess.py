"""A pod on one machine: N processes of one command joined by jax.distributed on localhost.

    run = Pod("train", ["--config=c.py", "--workdir=w"], num_processes=2, log_dir=tmp_path)
    run.wait(timeout=300)          # [exit status of each process]; run.output(i) is its log

Each process sees `devices` fake CPU devices and exchanges collectives through gloo (the
commands' --distributed flags). Outputs go to files, so a chatty process never blocks on a pipe.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def process_env(devices: int, extra: dict | None = None) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", **(extra or {}))
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
    return env


class Pod:
    """`python -m fitv2_jax.<command> args` on num_processes processes of `devices` devices.

    heartbeat_timeout: 60 s by default. With 10 s, two processes compiling at once on a 2-core
    host once missed their heartbeats and the coordination service aborted both (sample on two
    hosts, 2026-12-05); the test that kills a process passes 10 so that the survivor exits soon.
    """

    def __init__(self, command: str, args: list, *, num_processes: int, log_dir, devices: int = 2,
                 heartbeat_timeout: int = 60, env: dict | None = None, tag: str = ""):  # fmt: skip
        self.logs = [os.path.join(str(log_dir), f"{command}{tag}_p{i}.log")
                     for i in range(num_processes)]  # fmt: skip
        port = free_port()
        self.procs = []
        for i in range(num_processes):
            cmd = [sys.executable, "-m", f"fitv2_jax.{command}", *map(str, args)]
            if num_processes > 1:
                cmd += [f"--coordinator_address=localhost:{port}",
                        f"--num_processes={num_processes}", f"--process_id={i}",
                        f"--heartbeat_timeout={heartbeat_timeout}"]  # fmt: skip
            with open(self.logs[i], "w") as out:
                self.procs.append(subprocess.Popen(
                    cmd, cwd=ROOT, env=process_env(devices, env), stdout=out,
                    stderr=subprocess.STDOUT, text=True,
                ))  # fmt: skip

    def output(self, i: int) -> str:
        with open(self.logs[i]) as f:
            return f.read()

    def signal(self, i: int, sig=signal.SIGTERM) -> None:
        self.procs[i].send_signal(sig)

    def wait(self, timeout: float) -> list[int]:
        """Exit statuses; kills everything and fails if any process outlives the timeout."""
        deadline = time.time() + timeout
        for p in self.procs:
            try:
                p.wait(timeout=max(deadline - time.time(), 0.1))
            except subprocess.TimeoutExpired:
                self.kill()
                logs = "\n".join(
                    f"--- p{i}\n{self.output(i)[-2000:]}" for i in range(len(self.procs))
                )
                raise AssertionError(f"a process outlived {timeout}s:\n{logs}") from None
        return [p.returncode for p in self.procs]

    def check(self, timeout: float) -> None:
        codes = self.wait(timeout)
        if any(codes):
            logs = "\n".join(f"--- p{i} exit {c}\n{self.output(i)[-3000:]}"
                             for i, c in enumerate(codes))  # fmt: skip
            raise AssertionError(f"exit statuses {codes}:\n{logs}")

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
