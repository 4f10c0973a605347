"""Keep freed host memory for reuse, so that XLA:CPU does not page-fault its scratch every step.

    keep_freed_memory()   # once, at a command's start, before jax creates its thread pool

XLA:CPU allocates an executable's temporaries as one block per call (269 MB for the demo's
train step) from whichever glibc malloc arena the calling worker thread uses. Blocks that large
come from mmap and go back to the kernel on free, so every step first-touches all of it again:
69k page faults per demo step, a third of the step's CPU time (measured with
`python -m fitv2_jax.bench --suite versus`). Here glibc is told to serve every thread from one
arena (M_ARENA_MAX 1), to never mmap (M_MMAP_MAX 0: a non-main arena would mmap blocks above
64 MB whatever the threshold) and to never give freed heap back (M_TRIM_THRESHOLD -1, which glibc
stores as SIZE_MAX: an int threshold would stop at 2 GB, and FiTv2-B/2's step at batch 8 x 256
needs 4.5 GB of scratch): the block is reused from the heap and no longer faults. Resident memory
then stays at its peak instead of shrinking between steps, which is what a training process
wants.

A no-op off glibc (macOS, musl), and when FITV2_KEEP_FREED_MEMORY=0. Applied to the process
that calls it; arenas made before the call keep serving their threads.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
NEVER_TRIM = -1  # mallopt's int, converted to size_t SIZE_MAX by glibc

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Sets glibc's malloc to reuse freed memory (see the module docstring); True if it did."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("FITV2_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith(
        "linux"
    ):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(
        mallopt(M_ARENA_MAX, 1) and mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, NEVER_TRIM)
    )
    return _applied
