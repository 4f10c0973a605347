"""Every matmul of a traced program, priced alone by the TPU compiler: how fast a train step could
be if nothing but its matmuls cost anything, hence the highest MFU the compiler's cost model
allows at a given per-chip batch (seconds to compute, where `train --dry_run` takes minutes).

    dots = traced_dots(jax.make_jaxpr(step)(state, batch))  # Counter {Dot: calls per step}
    priced = price_dots(dots, device)                        # [PricedDot], most time first
    linear = sum(p.total_seconds for p in priced if not p.dot.batched)

Each distinct `lax.dot_general` (shapes, dtypes, dimension numbers) is compiled on its own for one
TPU device with the dry run's estimate options and priced by `optimal_seconds`; a dot inside a
scan counts once per iteration, a rematerialised one once more per recomputation, a `cond` by
its costliest branch, a while loop's body once (its trip count is not in the jaxpr; the train
step has none). Pallas kernels are not looked into. Dots with batch dimensions (the
attention maps, (B, H) batched) are priced as written, which in a whole program the compiler
can beat by fusing them with the softmax around them; dots without (the linear layers) are the
ceiling's solid part. `python -m fitv2_jax.bench --suite tpu_matmuls` prints it per config,
slice and global batch.
"""

from __future__ import annotations

import collections
import dataclasses
import math

import jax
from jax import lax
from jax._src import core
from jax._src.interpreters import partial_eval as pe
from jax.sharding import SingleDeviceSharding

from fitv2_jax.parallel.cost import ESTIMATE_OPTIONS, program_cost


@dataclasses.dataclass(frozen=True)
class Dot:
    """One `lax.dot_general` as traced: operand shapes and dtypes, dimension numbers
    (((lhs contracting), (rhs contracting)), ((lhs batch), (rhs batch))), result dtype."""

    lhs_shape: tuple[int, ...]
    lhs_dtype: str
    rhs_shape: tuple[int, ...]
    rhs_dtype: str
    dimension_numbers: tuple
    preferred_element_type: str | None

    @property
    def batched(self) -> bool:
        return bool(self.dimension_numbers[1][0])

    @property
    def flops(self) -> float:
        """2 x the multiply-accumulates: lhs elements x rhs free elements."""
        (_, rhs_contract), (_, rhs_batch) = self.dimension_numbers
        rhs_free = [d for i, d in enumerate(self.rhs_shape) if i not in (*rhs_contract, *rhs_batch)]
        return 2.0 * math.prod(self.lhs_shape) * math.prod(rhs_free)

    def __call__(self, lhs, rhs):
        return lax.dot_general(lhs, rhs, self.dimension_numbers,
                               preferred_element_type=self.preferred_element_type)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class PricedDot:
    dot: Dot
    calls: int
    seconds: float  # one call, the compiler's optimal_seconds

    @property
    def total_seconds(self) -> float:
        return self.calls * self.seconds


def _dot_of(eqn) -> Dot:
    lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
    pet = eqn.params.get("preferred_element_type")
    dn = tuple(tuple(tuple(int(i) for i in axes) for axes in pair)
               for pair in eqn.params["dimension_numbers"])  # fmt: skip
    return Dot(tuple(lhs.shape), str(lhs.dtype), tuple(rhs.shape), str(rhs.dtype), dn,
               None if pet is None else str(pet))  # fmt: skip


def traced_dots(closed_jaxpr) -> collections.Counter:
    """{Dot: calls} in a traced program (`jax.make_jaxpr(f)(*args)`), nested jaxprs included;
    dots whose results nothing uses (a gradient no one asked for) are dropped first, as XLA
    drops them."""
    jaxpr = closed_jaxpr.jaxpr
    jaxpr, _ = pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))
    counts: collections.Counter = collections.Counter()
    _walk(jaxpr, 1, counts)
    return counts


def _walk(jaxpr, times: int, counts: collections.Counter) -> None:
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            counts[_dot_of(eqn)] += times
        elif name == "pallas_call":
            continue  # a kernel's block-level dots are not the program's matmuls
        elif name == "cond":
            branches = []
            for branch in eqn.params["branches"]:
                branches.append(collections.Counter())
                _walk(branch.jaxpr, times, branches[-1])
            counts.update(max(branches, key=lambda c: sum(d.flops * n for d, n in c.items())))
        else:
            inner = times * int(eqn.params["length"]) if name == "scan" else times
            for sub in core.jaxprs_in_params(eqn.params):
                _walk(sub, inner, counts)


def price_dots(dots: collections.Counter, device) -> list[PricedDot]:
    """Each distinct dot compiled alone for `device` (a TPU device of a topology), priced by
    the compiler's cost model; most total time first."""
    sharding = SingleDeviceSharding(device)
    priced = []
    for dot, calls in dots.items():
        args = (jax.ShapeDtypeStruct(dot.lhs_shape, dot.lhs_dtype, sharding=sharding),
                jax.ShapeDtypeStruct(dot.rhs_shape, dot.rhs_dtype, sharding=sharding))  # fmt: skip
        program = jax.jit(lambda lhs, rhs, dot=dot: dot(lhs, rhs)).lower(*args)
        compiled = program.compile(ESTIMATE_OPTIONS)
        priced.append(PricedDot(dot, calls, program_cost(compiled)[1]))
    return sorted(priced, key=lambda p: -p.total_seconds)
