"""Which platform the program being traced will be compiled for.

    compiling_for_tpu()   # True under a TPU mesh (a TPU VM, or `--dry_run --topology` on any host)

Traced code reads it to pick a TPU-tuned form (splash attention; autodiff for the norms, whose
hand-written backward serves CPU and GPU; RoPE's partner channels by a permutation matmul); a
topology compile on a CPU host sees the TPU mesh, not the host's CPU backend.
"""

from __future__ import annotations

import jax


def compiling_for_tpu() -> bool:
    """True when the current mesh (jax.set_mesh), else the default backend, is TPU."""
    mesh = jax.sharding.get_abstract_mesh()
    platform = None if mesh.empty else mesh.abstract_device.platform
    return (platform or jax.default_backend()) == "tpu"
