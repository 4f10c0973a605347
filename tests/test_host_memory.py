"""utils.host_memory: after keep_freed_memory(), a large block freed and allocated again (as
XLA:CPU's per-call scratch is, from worker threads) is reused instead of page-faulted afresh."""

import json
import os
import subprocess
import sys

import pytest

PROBE = r"""
import ctypes, json, resource, threading
from fitv2_jax.utils.host_memory import keep_freed_memory
applied = keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def cycle(out):  # malloc, touch and free 256 MB three times (plain malloc, as XLA's scratch;
    for _ in range(3):  # numpy would ask for huge pages); faults of the last cycle
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        p = libc.malloc(256 << 20)
        ctypes.memset(p, 1, 256 << 20)
        libc.free(p)
        out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)

main, worker = [], []
cycle(main)
t = threading.Thread(target=cycle, args=(worker,))
t.start(); t.join()
print(json.dumps(dict(applied=applied, main=main[-1], worker=worker[-1])))
"""


def _faults(keep: bool) -> dict:
    env = dict(os.environ, FITV2_KEEP_FREED_MEMORY="1" if keep else "0")
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                         check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_freed_blocks_are_reused_instead_of_faulted_again():
    pages = (256 << 20) // os.sysconf("SC_PAGE_SIZE")
    default = _faults(keep=False)
    assert not default["applied"]
    # the control: glibc maps and unmaps a block this large, so every cycle faults it all in
    assert default["main"] > 0.9 * pages and default["worker"] > 0.9 * pages, default
    kept = _faults(keep=True)
    assert kept["applied"]
    assert kept["main"] < 0.01 * pages and kept["worker"] < 0.01 * pages, kept
