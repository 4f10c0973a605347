"""Which platform the program being traced will be compiled for.

    compiling_for_tpu()   # True under a TPU mesh (a TPU VM, or `--dry_run --topology` on any host)
    tpu_device_kind()     # "TPU v5" (v5p), "TPU v5 lite" (v5e), ...; None when not for a TPU

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


def tpu_device_kind() -> str | None:
    """The device kind of the TPU the program is compiled for (jax's `device_kind`: "TPU v4",
    "TPU v5" for v5p, "TPU v5 lite" for v5e, "TPU v6 lite" for v6e), None when not for a TPU."""
    if not compiling_for_tpu():
        return None
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.abstract_device.device_kind if not mesh.empty else jax.devices()[0].device_kind
