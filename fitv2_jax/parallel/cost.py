"""The TPU compiler's cost estimate of a program with scanned layers, made whole.

    est = scanned_cost(lambda unroll: compile_with(unroll), depth=36)
    est.flops, est.seconds      # per device, for the whole step
    flops, seconds = configured_cost(compile_with, depth=36, unroll=config.model.scan_unroll)

`compiled.cost_analysis()` counts a while loop's body once, whatever its trip count (measured:
a 10-step fori_loop of a matmul reports one matmul). Two loops matter here: the scan over the
`depth` blocks (forward and backward), and the windowed-einsum loops the TPU SPMD partitioner
makes of FSDP matmuls (an all-gather overlapped with the matmul, one shard per iteration). So the
estimate compiles the program twice with windowed einsum off, with the blocks' scan unrolled 1
and u times (u the smallest divisor of depth above 1, so each loop iteration holds exactly u
blocks): one block (forward + backward) costs (cu - c1) / (u - 1), and the step costs
c1 + (depth - 1) * block. Both FLOPs and the compiler's `optimal_seconds` are corrected so.
The estimate's programs also keep memory-space assignment from prefetching a buffer in slices:
on v5e and v6e it slices the stacked block kernels and joins them with a "ConcatBitcast" custom
call, which the cost model prices at -1 s each (measured: FiTv2-B with 2 blocks on v5e-16 gave
optimal_seconds -0.999 for its forward, -16.0 for its gradient), so no estimate came out at all.
Multi-slice programs (config.mesh.dcn) carry two custom calls the cost model prices at exactly
-1 s each, "SliceId" and "ZeroCrop" (the buffers handed to the DCN all-reduce); `program_cost`
adds 1 s back per call (measured: a 3-block tiny FiT on 2 slices of v5p:2x2x1 has 1 + 23 of them
and optimal_seconds -23.99978, i.e. 0.22 ms; 6 blocks 1 + 41 and -41.99960, 0.40 ms; the same
step on one v5p:2x2x2 slice with the data axis on ICI 0.27 ms). The DCN transfers themselves are
host transfers to the multi-slice runtime (send/recv with no cost annotation), so the estimate
leaves them out; `parallel.hlo.collectives` counts their bytes.
Check `flops` against the model's own count before trusting `seconds` (the dry run prints both).
A config that unrolls all its blocks (scan_unroll >= depth) has no block loop, so its own
program's cost analysis is whole (`program_cost`); extrapolating from programs of 2 and 4 blocks
was tried and came out 5% low on a 7-block one.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

# the estimate's programs: FSDP matmuls as plain all-gather + matmul, so no hidden loops
ESTIMATE_OPTIONS = {
    "xla_tpu_enable_windowed_einsum_for_all_gather": False,
    "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False,
    # whole-buffer prefetches: no ConcatBitcast custom calls, which the cost model cannot price
    "xla_tpu_sliced_prefetch_max_slices": 0,
}


# custom calls the TPU cost model prices at -1 s each (module doc)
MINUS_ONE_SECOND_CALLS = ("SliceId", "ZeroCrop")


def unpriced_ops(hlo_text: str) -> dict[str, int]:
    """Custom-call targets in a compiled TPU program, by count (what the cost model may skip)."""
    return dict(
        sorted(collections.Counter(re.findall(r'custom_call_target="([^"]+)"', hlo_text)).items())
    )


@dataclasses.dataclass(frozen=True)
class CostEstimate:
    flops: float  # per device, whole program
    seconds: float  # the compiler's estimate (optimal_seconds), whole program
    block_flops: float  # one scanned block, per device
    block_seconds: float


def program_cost(compiled) -> tuple[float, float]:
    """(FLOPs, optimal_seconds) of a compiled TPU program, as its cost analysis gives them (a
    loop's body counted once), with the 1 s the cost model subtracts per multi-slice custom call
    added back (`MINUS_ONE_SECOND_CALLS`), plus its splash attention kernels priced by the
    compiler from their work (`splash_kernel_work`, `kernel_seconds`); an error naming its custom
    calls if the compiler gave no estimate."""
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, list | tuple) else ca
    flops, seconds = float(ca.get("flops", -1.0)), float(ca.get("optimal_seconds", -1.0))
    text = compiled.as_text()
    calls = unpriced_ops(text)
    seconds += sum(calls.get(name, 0) for name in MINUS_ONE_SECOND_CALLS)
    if flops < 0 or seconds <= 0:
        raise RuntimeError(f"the compiler gave no cost estimate (flops {flops}, optimal_seconds "
                           f"{seconds}): an op it cannot cost is in the program; its custom "
                           f"calls: {calls}")  # fmt: skip
    kernels = splash_kernel_work(text)
    if kernels:
        device = _a_device(compiled)
        for work, count in kernels.items():
            flops += count * work.flops
            seconds += count * kernel_seconds(device, work)
    return flops, seconds


@dataclasses.dataclass(frozen=True)
class KernelWork:
    """One Pallas kernel call's work, as `pl.CostEstimate` takes it."""

    flops: float
    transcendentals: float
    bytes_accessed: float


# splash kernels: name -> (matmuls of (L x L x Dh) MACs per head, exps per score); the fused
# backward recomputes the scores and does dp, dv, dq and dk; unfused, dq's kernel redoes s and dp
_SPLASH_KERNELS = {"splash_mha_fwd": (2, 1), "splash_mha_dkv": (5, 1), "splash_mha_dq": (3, 1)}
_KERNEL_CALL = re.compile(r"%(splash_mha_(?:fwd|dkv|dq))\S* = \(?(.*?)\)? custom-call\(")
_ARRAY = re.compile(r"\b(bf16|f32|f16)\[([\d,]+)\]")


def splash_kernel_work(hlo_text: str) -> dict[KernelWork, int]:
    """The splash attention calls in a compiled program (each loop body once, as the cost
    analysis counts), by their work. The Mosaic kernels carry no cost estimate, and the compiler
    prices a Pallas call without one at zero time and zero FLOPs (measured: 1 or 8 chained
    splash calls on one v5p chip, 6.9 us either way, all of it the copies around them). Each
    call's (B, H, L, Dh) is read from its results; with unfused backward kernels dkv does s, dp,
    dv and dk (4 matmuls)."""
    calls: collections.Counter = collections.Counter()
    fused = "splash_mha_dq" not in hlo_text
    for name, results in _KERNEL_CALL.findall(hlo_text):
        arrays = [
            (dtype, [int(d) for d in dims.split(",")]) for dtype, dims in _ARRAY.findall(results)
        ]
        if not arrays:
            continue
        # the first result of the largest rank: the forward's output (..., H, L, Dh) or the
        # backward's dq (..., 1, H, L, Dh); scratch buffers have one axis fewer
        dtype, dims = next(a for a in arrays if len(a[1]) == max(len(x[1]) for x in arrays))
        if len(dims) < 3:
            continue
        b, (h, n, dh) = math.prod(dims[:-3]), dims[-3:]
        matmuls, exps = _SPLASH_KERNELS[name]
        if name == "splash_mha_dkv" and not fused:
            matmuls = 4
        width = 2 if dtype in ("bf16", "f16") else 4
        tensors = 4 if name == "splash_mha_fwd" else 7  # q, k, v, o / q, k, v, do, dq, dk, dv
        calls[KernelWork(flops=2.0 * matmuls * b * h * n * n * dh,
                         transcendentals=float(exps * b * h * n * n),
                         bytes_accessed=float(tensors * b * h * n * dh * width))] += 1  # fmt: skip
    return dict(calls)


def kernel_seconds(device, work: KernelWork) -> float:
    """The compiler's time for a Pallas call of this work on `device` (a TPU device of a
    topology): an empty kernel compiled with `pl.CostEstimate(work)`, whose cost analysis is then
    the compiler's own pricing of that estimate (measured: a 2048^3 bf16 matmul kernel so
    annotated is priced at 394 TFLOP/s on v5p, the rate of the issue's matmul probe)."""
    return _kernel_seconds(device, work)


@functools.lru_cache(maxsize=256)
def _kernel_seconds(device, work: KernelWork) -> float:
    def copy(x_ref, o_ref):
        o_ref[...] = x_ref[...]

    estimate = pl.CostEstimate(**{k: int(v) for k, v in dataclasses.asdict(work).items()})
    call = pl.pallas_call(copy, out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32),
                          cost_estimate=estimate)  # fmt: skip
    arg = jax.ShapeDtypeStruct((8, 128), jnp.float32,
                               sharding=jax.sharding.SingleDeviceSharding(device))  # fmt: skip
    compiled = jax.jit(call).lower(arg).compile(compiler_options=ESTIMATE_OPTIONS)
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, list | tuple) else ca
    return float(ca.get("optimal_seconds", 0.0))


def _a_device(compiled):
    shardings = jax.tree.leaves(compiled.input_shardings)
    return next(iter(shardings[0].device_set))


def scanned_cost(compile_with_unroll: Callable[[int], object], depth: int) -> CostEstimate:
    """compile_with_unroll(u) -> a compiled program whose `depth` blocks are scanned with
    unroll u (compiled with ESTIMATE_OPTIONS)."""
    f1, s1 = program_cost(compile_with_unroll(1))
    if depth == 1:
        return CostEstimate(f1, s1, f1, s1)
    u = next(k for k in range(2, depth + 1) if depth % k == 0)
    fu, su = program_cost(compile_with_unroll(u))
    bf, bs = (fu - f1) / (u - 1), (su - s1) / (u - 1)
    return CostEstimate(f1 + (depth - 1) * bf, s1 + (depth - 1) * bs, bf, bs)


def configured_cost(
    compile_with_unroll: Callable[[int], object], depth: int, unroll: int
) -> tuple[float, float]:
    """(FLOPs, seconds) per device of the program as the config runs it: its own cost analysis
    when every block is unrolled (no loop), else the scanned estimate."""
    if unroll >= depth:
        return program_cost(compile_with_unroll(unroll))
    est = scanned_cost(compile_with_unroll, depth)
    return est.flops, est.seconds
