"""Run a command (`python -m fitv2_jax.NAME ...`) in a fresh process, as a user would."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli_env(env: dict | None = None) -> dict:
    """The environment of the commands the tests run: CPU, 8 fake devices, plus env."""
    full_env = dict(os.environ, JAX_PLATFORMS="cpu", **(env or {}))
    flag = "--xla_force_host_platform_device_count=8"
    if flag not in full_env.get("XLA_FLAGS", ""):
        full_env["XLA_FLAGS"] = (full_env.get("XLA_FLAGS", "") + " " + flag).strip()
    return full_env


def run_cli(name: str, *args, check: bool = True, env: dict | None = None, timeout: int = 600):
    """CompletedProcess of `python -m fitv2_jax.<name> args` run from the repository root on
    8 fake CPU devices; check=True fails the test (with stderr) on a non-zero exit."""
    proc = subprocess.run(
        [sys.executable, "-m", f"fitv2_jax.{name}", *map(str, args)],
        capture_output=True, text=True, cwd=ROOT, env=cli_env(env), timeout=timeout,
    )  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"fitv2_jax.{name} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def error_line(proc) -> str:
    """The one-line error of a failed command (asserting it is one line)."""
    assert proc.returncode != 0, proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(("error:", "FATAL Flags parsing error"))]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]
