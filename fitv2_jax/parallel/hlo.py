"""Collectives in a compiled program, from its HLO text: how many run per step and the bytes.

    table = collectives(compiled.as_text())   # {"all-gather": {"count": 72, "bytes": ...}, ...}

An op inside a while loop runs once per iteration: every computation's count is multiplied by
how often it runs (nested loops multiplied). A loop's trip count is the one XLA records on the
while op (`known_trip_count`) or, in TPU programs that do not record it, the constant its
condition compares the counter with (`i < N`; scans and windowed einsums count from 0). `bytes` is per device: the largest array the op touches (an all-gather's
output, a reduce-scatter's input, an all-reduce's buffer), which is what the interconnect moves
up to the factor (n - 1) / n (twice that for an all-reduce).
"""

from __future__ import annotations

import collections
import math
import re

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
                "f8e4m3fn": 1, "f8e5m2": 1}  # fmt: skip
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
_OP = re.compile(r"=\s.*?\b(" + "|".join(KINDS) + r")(-start)?\(")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLEE = re.compile(r"\b(body|calls|to_apply|condition)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_CONST = re.compile(r"%?([\w.\-]+) = [su]\d+\[\]\S* constant\((\d+)\)")
_LT = re.compile(r"ROOT .*compare\(%?[\w.\-]+, %?([\w.\-]+)\), direction=LT")


def _largest_array_bytes(line: str) -> int:
    text = line.split("metadata=")[0]
    sizes = [math.prod(int(d) for d in dims.split(",") if d) * _DTYPE_BYTES[dt]
             for dt, dims in _SHAPE.findall(text)]  # fmt: skip
    return max(sizes, default=0)


def _parse(hlo_text: str):
    """computation -> (collectives [(kind, bytes)], callees [(name, times)]), entry name."""
    comps: dict[str, tuple[list, list]] = {}
    bounds = _loop_bounds(hlo_text)
    entry, current = None, None
    for line in hlo_text.splitlines():
        if line and not line[0].isspace():
            m = _HEADER.match(line)
            current = m.group(1) if m else None
            if current is not None:
                comps[current] = ([], [])
                if line.startswith("ENTRY"):
                    entry = current
            continue
        if current is None:
            continue
        ops, callees = comps[current]
        m = _OP.search(line)
        if m:
            ops.append((m.group(1), _largest_array_bytes(line)))
        trip = _TRIP.search(line)
        found = dict((role, name) for role, name in _CALLEE.findall(line))
        for role, name in found.items():
            times = 1
            if role == "body":
                times = int(trip.group(1)) if trip else bounds.get(found.get("condition"), 1)
            callees.append((name, times))
        for group in _BRANCHES.findall(line):
            callees += [(b.strip().lstrip("%"), 1) for b in group.split(",") if b.strip()]
    return comps, entry


def _loop_bounds(hlo_text: str) -> dict[str, int]:
    """condition computation -> N, for conditions whose root is `counter < constant N`."""
    bounds, consts, current = {}, {}, None
    for line in hlo_text.splitlines():
        if line and not line[0].isspace():
            m = _HEADER.match(line)
            current, consts = (m.group(1) if m else None), {}
            continue
        m = _CONST.search(line)
        if m:
            consts[m.group(1)] = int(m.group(2))
        m = _LT.search(line)
        if m and current and m.group(1) in consts:
            bounds[current] = consts[m.group(1)]
    return bounds


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """{kind: {"count": runs per step, "bytes": per-device bytes per step}} for every kind."""
    comps, entry = _parse(hlo_text)
    runs = collections.Counter()

    def visit(name: str, times: int, depth: int = 0) -> None:
        if name not in comps or depth > 64:
            return
        runs[name] += times
        for callee, k in comps[name][1]:
            visit(callee, times * k, depth + 1)

    if entry is not None:
        visit(entry, 1)
    table = {k: {"count": 0, "bytes": 0} for k in KINDS}
    for name, times in runs.items():
        for kind, nbytes in comps[name][0]:
            table[kind]["count"] += times
            table[kind]["bytes"] += times * nbytes
    return table


def while_trip_counts(hlo_text: str) -> list[int]:
    """Trip counts of the program's while ops (recorded or read off their conditions)."""
    comps, _ = _parse(hlo_text)
    return sorted(k for _, callees in comps.values() for _, k in callees if k > 1)
