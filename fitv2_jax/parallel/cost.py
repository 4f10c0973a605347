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
Check `flops` against the model's own count before trusting `seconds` (the dry run prints both).
A config that unrolls all its blocks (scan_unroll >= depth) has no block loop, so its own
program's cost analysis is whole (`program_cost`); extrapolating from programs of 2 and 4 blocks
was tried and came out 5% low on a 7-block one.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Callable

# the estimate's programs: FSDP matmuls as plain all-gather + matmul, so no hidden loops
ESTIMATE_OPTIONS = {
    "xla_tpu_enable_windowed_einsum_for_all_gather": False,
    "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False,
    # whole-buffer prefetches: no ConcatBitcast custom calls, which the cost model cannot price
    "xla_tpu_sliced_prefetch_max_slices": 0,
}


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
    loop's body counted once); an error naming its custom calls if it has none."""
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, list | tuple) else ca
    flops, seconds = float(ca.get("flops", -1.0)), float(ca.get("optimal_seconds", -1.0))
    if flops < 0 or seconds <= 0:
        raise RuntimeError(f"the compiler gave no cost estimate (flops {flops}, optimal_seconds "
                           f"{seconds}): an op it cannot cost is in the program; its custom "
                           f"calls: {unpriced_ops(compiled.as_text())}")  # fmt: skip
    return flops, seconds


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
