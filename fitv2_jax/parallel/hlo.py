"""Collectives in a compiled program, from its HLO text: how many run per step and the bytes;
and where a TPU program's estimated cycles go.

    table = collectives(compiled.as_text())   # {"all-gather": {"count": 72, "bytes": ...}, ...}
    rows = cycle_profile(compiled.as_text())  # [(share, cycles, "attn/qkv", "matmul", "bwd"), ...]

An op inside a while loop runs once per iteration: every computation's count is multiplied by
how often it runs (nested loops multiplied). A loop's trip count is the one XLA records on the
while op (`known_trip_count`) or, in TPU programs that do not record it, the constant its
condition compares the counter with (`i < N`; scans and windowed einsums count from 0).

`bytes` is per device: the arrays the op yields (an all-gather's output, an all-reduce's buffer;
all of them for an op that combines several, which the TPU compiler does with gradients and
gathers), which is what the interconnect moves up to the factor (n - 1) / n (twice that for an
all-reduce); for an async `-start` op, whose result holds its operands too, the largest array;
for a plain `reduce-scatter` op its output, the shard, n times less than it reduces.
`ici_bytes` is what each device sends over the interconnect (and receives) for those ops, by the
bandwidth-optimal algorithms with n the op's group size (its `replica_groups`): (n - 1) / n of an
all-gather's output, of a reduce-scatter's or all-to-all's whole buffer, 2 (n - 1) / n of an
all-reduce's buffer, and a collective-permute's whole buffer. The TPU compiler's cost model does
not price this traffic (`parallel.cost`: it prices a collective as one pass over its buffers in
HBM, whatever the group), so it is counted here.
One collective is counted once: libtpu writes an async collective as a start fusion (its op
feeding an "AsyncCollectiveStart" custom call), continuation fusions (`%async_collective_fusion`,
compute fused with the transfer's progress) and a done fusion ("AsyncCollectiveDone"), each
holding an op of the whole collective; only the start's counts (FiTv2-XL/2 on v5e-256: each
block's fc1 kernel gathers were read 3 to 4 times). Ops that share a channel elsewhere (the
shifts of a windowed einsum's collective-permutes) are distinct transfers and each counts.
A TPU program writes a reduce-scatter as a fusion calling `%all-reduce-scatter...`: an all-reduce
and the slice each device keeps, which runs as one reduce-scatter; its all-reduce counts as a
reduce-scatter of the whole buffer. Across slices (config.mesh.dcn) the TPU program hands
buffers to the multi-slice runtime as host transfers (`send` ops marked with a megascale transfer
type); they count as "dcn all-reduce" etc., the bytes each device sends. The compiler's cost
model does not price them (`parallel.cost`).
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
_DCN_PREFIX = "dcn "  # the kinds of DCN transfers: "dcn all-reduce", ...
_DCN = re.compile(r'=\s.*?\bsend\(.*_xla_megascale_transfer_type="(\w+)"')
_REDUCE_SCATTER_FUSION = re.compile(r"^all-reduce-scatter(\.\d+)?$")  # TPU's reduce-scatter
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLEE = re.compile(r"\b(body|calls|to_apply|condition)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_CONST = re.compile(r"%?([\w.\-]+) = [su]\d+\[\]\S* constant\((\d+)\)")
_LT = re.compile(r"ROOT .*compare\(%?[\w.\-]+, %?([\w.\-]+)\), direction=LT")
_PARTITIONS = re.compile(r"\bnum_partitions=(\d+)")
_GROUP_LIST = re.compile(r"replica_groups=\{\{([\d,\s]*)\}")  # {{0,1,2,3},{4,5,6,7}}
_GROUP_IOTA = re.compile(r"replica_groups=\[(\d+),(\d+)\]<=")  # [2,4]<=[8]: 2 groups of 4
# mesh['axis_0'=4,'axis_1'=1,'axis_2'=2], device_ids=([2,4]T(1,0)) {'axis_0'}: groups over axis_0
_GROUP_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\](?:[^{,]*(?:,\s*device_ids=[^{]*)?"
                         r"\{([^}]*)\})?")  # fmt: skip
_MESH_AXIS = re.compile(r"'([^']+)'=(\d+)")
_CONTINUATION = "async_collective_fusion"  # the name libtpu gives an async collective's steps
_DONE = 'custom_call_target="AsyncCollectiveDone"'


def _array_bytes(text: str) -> list[int]:
    return [math.prod(int(d) for d in dims.split(",") if d) * _DTYPE_BYTES[dt]
            for dt, dims in _SHAPE.findall(text)]  # fmt: skip


def _collective_bytes(line: str, match: re.Match) -> int:
    """Bytes of a collective op's result: every array of a combined (tuple) result, or the
    largest one of an async start (whose tuple repeats its operands)."""
    result = line[match.start() + 1 : match.start(1)]  # between "=" and the opcode
    sizes = _array_bytes(result)
    return max(sizes, default=0) if match.group(2) else sum(sizes)


def group_size(line: str, partitions: int) -> int:
    """How many devices a collective op's groups hold (`replica_groups={}`: all `partitions`)."""
    m = _GROUP_LIST.search(line)
    if m:
        return len([d for d in m.group(1).split(",") if d.strip()])
    m = _GROUP_IOTA.search(line)
    if m:
        return int(m.group(2))
    m = _GROUP_MESH.search(line)
    if m:
        sizes = {name: int(n) for name, n in _MESH_AXIS.findall(m.group(1))}
        named = re.findall(r"'([^']+)'", m.group(2) or "") or list(sizes)
        return math.prod(sizes[a] for a in named)
    return partitions


def _ici_bytes(kind: str, nbytes: int, n: int, whole: bool) -> float:
    """Bytes one device sends over the interconnect for a collective of `nbytes` (as counted in
    the table) over groups of n devices; `whole`: a reduce-scatter counted by its whole buffer."""
    if kind == "collective-permute":
        return float(nbytes)
    if n <= 1:
        return 0.0
    if kind == "reduce-scatter" and not whole:
        return float(nbytes * (n - 1))  # its output is the shard
    return nbytes * (n - 1) / n * (2 if kind == "all-reduce" else 1)


def _largest_array_bytes(line: str) -> int:
    return max(_array_bytes(line.split("metadata=")[0]), default=0)


def _lines(hlo_text: str) -> list[str]:
    """The text's lines with every op on one line. An attribute string may hold a newline (the
    splash kernel's metadata does), which leaves an unindented tail; read as a line of its own it
    ended the computation, so every op after the first splash call went uncounted."""
    lines: list[str] = []
    inside = False
    for line in hlo_text.splitlines():
        if line and not line[0].isspace():
            if _HEADER.match(line):
                inside = True
            elif line.strip() == "}":
                inside = False
            elif inside and lines:  # the tail of the op above
                lines[-1] += " " + line
                continue
        lines.append(line)
    return lines


def _parse(hlo_text: str):
    """computation -> (collectives [(kind, bytes)], callees [(name, times)], lines), entry."""
    comps: dict[str, tuple[list, list]] = {}
    lines = _lines(hlo_text)
    bounds = _loop_bounds(lines)
    m = _PARTITIONS.search(hlo_text[:4096])
    partitions = int(m.group(1)) if m else 1
    entry, current = None, None
    for line in lines:
        if line and not line[0].isspace():
            m = _HEADER.match(line)
            current = m.group(1) if m else None
            if current is not None:
                comps[current] = ([], [], [])
                if line.startswith("ENTRY"):
                    entry = current
            continue
        if current is None:
            continue
        ops, callees, lines = comps[current]
        lines.append(line)
        m = _OP.search(line)
        if m:
            kind, whole = m.group(1), False
            if kind == "all-reduce" and _REDUCE_SCATTER_FUSION.match(current):
                kind, whole = "reduce-scatter", True
            nbytes, n = _collective_bytes(line, m), group_size(line, partitions)
            ops.append((kind, nbytes, _ici_bytes(kind, nbytes, n, whole)))
        m = _DCN.search(line) if "_xla_megascale_transfer_type" in line else None
        if m:
            kind = _DCN_PREFIX + m.group(1).lower().replace("_", "-")
            ops.append((kind, _largest_array_bytes(line), 0.0))  # not over ICI
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


def _loop_bounds(lines: list[str]) -> dict[str, int]:
    """condition computation -> N, for conditions whose root is `counter < constant N`."""
    bounds, consts, current = {}, {}, None
    for line in lines:
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


def _runs(comps, entry) -> collections.Counter:
    """How many times each computation runs per execution of the entry."""
    runs = collections.Counter()

    def visit(name: str, times: int, depth: int = 0) -> None:
        if name not in comps or depth > 64:
            return
        runs[name] += times
        for callee, k in comps[name][1]:
            visit(callee, times * k, depth + 1)

    if entry is not None:
        visit(entry, 1)
    return runs


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """{kind: {"count": runs per step, "bytes": per-device bytes per step, "ici_bytes": what
    each device sends over ICI per step}} for every kind in KINDS, and the DCN transfers
    ("dcn all-reduce", ...) a multi-slice program makes (ici_bytes 0)."""
    comps, entry = _parse(hlo_text)
    table = {k: {"count": 0, "bytes": 0, "ici_bytes": 0} for k in KINDS}
    for name, times in _runs(comps, entry).items():
        ops, _, lines = comps[name]
        if name.startswith(_CONTINUATION) or any(_DONE in line for line in lines):
            continue  # a later part of a collective its start fusion counts
        for kind, nbytes, ici in ops:
            row = table.setdefault(kind, {"count": 0, "bytes": 0, "ici_bytes": 0})
            row["count"] += times
            row["bytes"] += times * nbytes
            row["ici_bytes"] += round(times * ici)
    return table


def ici_bytes(table: dict[str, dict[str, int]]) -> int:
    """Per-device bytes per step sent over ICI, from a `collectives` table."""
    return sum(v["ici_bytes"] for k, v in table.items() if not k.startswith(_DCN_PREFIX))


def dcn_bytes(table: dict[str, dict[str, int]]) -> int:
    """Per-device bytes per step sent between slices, from a `collectives` table."""
    return sum(v["bytes"] for k, v in table.items() if k.startswith(_DCN_PREFIX))


def while_trip_counts(hlo_text: str) -> list[int]:
    """Trip counts of the program's while ops (recorded or read off their conditions)."""
    comps, _ = _parse(hlo_text)
    return sorted(k for _, callees, _ in comps.values() for _, k in callees if k > 1)


_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_MATMUL = re.compile(r"\s(convolution|dot)\(")
_CYCLES = re.compile(r'"estimated_cycles":"(\d+)"')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_OPCODE = re.compile(r"=\s+\S+(?:\s+\S+)*?\s+([a-z][\w\-]*)\(")
# JAX's tracing layers in an op_name, which say nothing about where in the model an op is
_TRACE_PARTS = re.compile(r"^(jit\(.*\)|jvp\(.*\)|transpose\(.*\)|while|body|cond|closed_call|"
                          r"checkpoint|remat\d*|rematted_computation|vmap\(.*\)|pjit|"
                          r"shard_map|[A-Z]\w*(\(.*\))?)$")  # fmt: skip


def _matmul_computations(comps) -> set[str]:
    """Computations holding a matmul (a convolution or dot), directly or in a fusion they call."""
    direct = {n for n, c in comps.items() if any(_MATMUL.search(line) for line in c[2])}
    found, changed = set(direct), True
    while changed:
        changed = False
        for n, c in comps.items():
            if n not in found and any(m in found for m, _ in c[1]):
                found.add(n)
                changed = True
    return found


def _op_kind(line: str, opcode: str, matmuls: set[str]) -> str:
    callee = _CALLS.search(line)
    if opcode in ("convolution", "dot") or (callee and callee.group(1) in matmuls):
        return "matmul"
    for kind in KINDS:
        if opcode.startswith(kind):
            return "collective"
    if opcode in ("copy", "copy-start", "copy-done", "transpose"):
        return "copy/layout"
    if opcode == "custom-call":
        target = re.search(r'custom_call_target="([^"]+)"', line)
        return f"custom-call {target.group(1)}" if target else "custom-call"
    return "elementwise/reduce" if opcode == "fusion" else opcode


def _where(op_name: str) -> tuple[str, str]:
    """("blocks/attn/qkv", "bwd") from an op_name such as
    jit(step)/transpose(jvp(FiT))/while/body/closed_call/blocks/attn/qkv/dot_general."""
    parts = op_name.split("/")
    path = [p for p in parts[:-1] if not _TRACE_PARTS.match(p)]
    return "/".join(path) or "(top level)", "bwd" if "transpose(" in op_name else "fwd"


def _op_where(line: str, comps) -> tuple[str, str]:
    """(module path, fwd/bwd) of an op; a fusion whose own name says no more than the top level
    (its root a convert or a reduce of the step's) takes the path that at least half of its named
    fused ops name. Only half: an optimizer update fusing 28 top-level ops with one of the label
    embedding's gradient was the "y_embedder" backward, 4.9% of FiTv2-3B/2's step on v6e-64."""
    op_name = _OP_NAME.search(line)
    where, direction = _where(op_name.group(1)) if op_name else ("(no source)", "")
    callee = _CALLS.search(line) if where in ("(top level)", "(no source)") else None
    if callee and callee.group(1) in comps:
        names = [m.group(1) for m in map(_OP_NAME.search, comps[callee.group(1)][2]) if m]
        inner = collections.Counter(w for w in map(_where, names) if w[0] != "(top level)")
        for path, count in inner.most_common(1):
            if 2 * count >= len(names):
                return path
    return where, direction


def cycle_profile(hlo_text: str) -> list[tuple[float, float, str, str, str]]:
    """Where a compiled TPU program's estimated cycles go: rows (share, cycles per step, module
    path, op kind, fwd/bwd), largest first. Each op's `estimated_cycles` (the TPU compiler's
    annotation) times how often its computation runs per step; a loop counted per iteration."""
    comps, entry = _parse(hlo_text)
    matmuls = _matmul_computations(comps)
    totals: collections.Counter = collections.Counter()
    for name, times in _runs(comps, entry).items():
        for line in comps[name][2]:
            cycles = _CYCLES.search(line)
            opcode = _OPCODE.search(line.split(", metadata=")[0].split(", backend_config=")[0])
            if not cycles or not opcode:
                continue
            where, direction = _op_where(line, comps)
            totals[(where, _op_kind(line, opcode.group(1), matmuls), direction)] += (
                int(cycles.group(1)) * times
            )
    grand = sum(totals.values()) or 1
    return [(c / grand, float(c), *key) for key, c in totals.most_common()]
