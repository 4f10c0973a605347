"""Commands run many times over, without paying the imports each time.

A command in a fresh process spends about 4.5 of its 5 seconds importing jax, flax, orbax, grain
and torch. A forkserver process imports them (and the library, not the commands) once; each
command then runs in a child forked from it: `runpy` runs `fitv2_jax.NAME` as `__main__`, the code
`python -m fitv2_jax.NAME` runs, with the same environment, argv, stdout/stderr files, exit status
and atexit handlers. Nothing in the server touches a jax backend, so every child starts its own.

  with Forkservers(2) as servers:
      proc = servers.run("train", "--config", "configs/tiny.py")   # a CompletedProcess

The server side is this file run as a script; it reads one JSON request per line on stdin and
answers with the child's exit status on its original stdout.
"""

import itertools
import json
import os
import queue
import subprocess
import sys
import tempfile

from cli import ROOT


def _preload():
    """Import the library's modules, not its commands (they define absl flags at import)."""
    import importlib
    import pkgutil

    import fitv2_jax

    for info in pkgutil.walk_packages(fitv2_jax.__path__, "fitv2_jax."):
        if info.name.count(".") >= 2 and not info.name.startswith("fitv2_jax.benchmarks"):
            importlib.import_module(info.name)


def _child(request):
    """Runs in the forked child; never returns."""
    import atexit
    import runpy
    import signal
    import threading
    import traceback

    code = 1
    try:
        signal.alarm(request["timeout"])  # the default action ends the child, like a timeout
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        sys.argv = [f"fitv2_jax.{request['name']}", *request["args"]]
        try:
            runpy.run_module(f"fitv2_jax.{request['name']}", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        threading._shutdown()  # what interpreter exit does: join non-daemon threads,
        atexit._run_exitfuncs()  # then run the exit handlers
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _serve():
    sys.path[0] = ROOT  # as `python -m` from the repository root
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # the library's prints must not reach the answer pipe
    _preload()
    answers.write("ready\n")
    answers.flush()
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            answers.close()
            _child(request)
        _, status = os.waitpid(pid, 0)
        answers.write(f"{os.waitstatus_to_exitcode(status)}\n")
        answers.flush()


class Forkservers:
    """n forkservers; `run` takes a free one, so n threads may call it at once."""

    def __init__(self, n: int, env: dict):
        self._tmp = tempfile.TemporaryDirectory()
        self._free = queue.Queue()
        for _ in range(n):
            proc = subprocess.Popen([sys.executable, os.path.abspath(__file__)], cwd=ROOT, env=env,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
            if proc.stdout.readline() != "ready\n":
                raise RuntimeError("the forkserver failed to start (its stderr is above)")
            self._free.put(proc)
        self._n, self._ids = n, itertools.count()

    def run(self, name: str, *args, timeout: int = 600) -> subprocess.CompletedProcess:
        server = self._free.get()
        try:
            i = next(self._ids)
            out, err = (os.path.join(self._tmp.name, f"{i}.{s}") for s in ("out", "err"))
            request = {"name": name, "args": list(map(str, args)), "stdout": out, "stderr": err,
                       "timeout": timeout}  # fmt: skip
            server.stdin.write(json.dumps(request) + "\n")
            server.stdin.flush()
            answer = server.stdout.readline()
            if not answer:
                raise RuntimeError(f"the forkserver died running {name} {args} (stderr above)")
            returncode = int(answer)
            with open(out) as fo, open(err) as fe:
                stdout, stderr = fo.read(), fe.read()
        finally:
            self._free.put(server)
        return subprocess.CompletedProcess(["-m", f"fitv2_jax.{name}", *args], returncode,
                                           stdout, stderr)  # fmt: skip

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for _ in range(self._n):
            server = self._free.get()
            server.stdin.close()
            server.wait(timeout=60)
        self._tmp.cleanup()


if __name__ == "__main__":
    _serve()
