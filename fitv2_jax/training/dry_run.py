"""Compile the real train step ahead of time: per-device memory, collectives, and on a TPU
topology the compiler's step-time estimate and the MFU it implies.

    python -m fitv2_jax.train --config configs/fitv2_xl.py --dry_run --topology v5p-64
    python -m fitv2_jax.train --config configs/fitv2_3b.py --dry_run --num_devices 64   # CPU

The step is the train loop's own (`training.setup.build_setup`). Nothing is allocated: state and
batch are abstract (ShapeDtypeStruct with shardings), the step is lowered for config.mesh over
the devices and compiled. With --topology the devices are compile-only TPU devices from libtpu
(`parallel.topology`; multi-slice when config.mesh.dcn asks for slices) and the compiler is the
TPU one, so the memory plan is the TPU's; without it they are fake CPU devices and the memory is
the CPU compiler's approximation. State bytes are exact either way (from the shardings).
The TPU estimate (`parallel.cost`) is the compiler's cost model, not a measurement. That model
prices a collective as one pass over its buffers in HBM, not by the interconnect (measured: an
all-reduce costs what an elementwise pass over the same buffer does, over 2 or 32 chips alike), so
the report adds the ICI traffic of the compiled step's collectives and the least time it takes at
the chip's documented ICI bandwidth: transfers the estimate assumes free.
A step that does not fit is a result, not a crash: when the TPU compiler runs out of HBM the
report says so (fits False) with the bytes it needed and had, read from its error (`out_of_hbm`).
"""

from __future__ import annotations

import copy
import math
import re
import time

import jax

from fitv2_jax.config.slices import slice_note
from fitv2_jax.models.attention import resolve_backend
from fitv2_jax.models.summary import train_step_flops
from fitv2_jax.parallel.cost import ESTIMATE_OPTIONS, configured_cost
from fitv2_jax.parallel.hlo import collectives, cycle_profile, dcn_bytes, ici_bytes
from fitv2_jax.parallel.mesh import create_mesh
from fitv2_jax.parallel.topology import ici_send_rate, per_device, topology_devices
from fitv2_jax.training.setup import build_setup

GIB = 2.0**30


def _per_device_bytes(tree, shardings) -> int:
    total = 0
    for leaf, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True):
        total += math.prod(sh.shard_shape(leaf.shape)) * leaf.dtype.itemsize
    return total


def _total_bytes(tree) -> int:
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


# libtpu's errors when a program does not fit: compiling for a topology, "Ran out of memory on
# HBM, the total memory required for HLO temporaries (34.92G) exceeds available HBM (31.25G)"
# (FiTv2-HR-3B/2 on v6e-64, remat dots, XLA attention); on a real TPU, with the arguments in HBM,
# "Ran out of memory in memory space hbm. Used 30.21G of 15.48G hbm" (as users report it, e.g.
# EasyDeL issue 142). G is GiB: the compiler offers 31.25 of a v6e chip's 32 GiB, 15.75 of a v5e's.
_OUT_OF_HBM = (
    re.compile(r"required for (?P<what>[\w ]+?) \((?P<need>[\d.]+)(?P<nu>[KMGT])\) exceeds "
               r"available HBM \((?P<have>[\d.]+)(?P<hu>[KMGT])\)"),
    re.compile(r"Used (?P<need>[\d.]+)(?P<nu>[KMGT]) of (?P<have>[\d.]+)(?P<hu>[KMGT]) hbm"),
)  # fmt: skip
_UNIT = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def out_of_hbm(message: str) -> dict | None:
    """From the TPU compiler's out-of-HBM error: {needed_bytes, available_bytes, what (what the
    needed bytes count, e.g. "HLO temporaries", which leave out the arguments), message}; None for
    any other error."""
    if "RESOURCE_EXHAUSTED" not in message and "Ran out of memory" not in message:
        return None
    first = next((line for line in message.splitlines() if line.strip()), message)
    for pattern in _OUT_OF_HBM:
        m = pattern.search(message)
        if m:
            return dict(needed_bytes=int(float(m["need"]) * _UNIT[m["nu"]]),
                        available_bytes=int(float(m["have"]) * _UNIT[m["hu"]]),
                        what=m.groupdict().get("what") or "the program and its arguments",
                        message=first[:300])  # fmt: skip
    if re.search(r"\bhbm\b", message, re.IGNORECASE):
        return dict(
            needed_bytes=None, available_bytes=None, what="the program", message=first[:300]
        )
    return None


def compile_step(config, global_batch, mesh, options=None, setup=None):
    """(setup, compiled): the train step of `config` lowered on abstract state and batch and
    compiled for `mesh` with these compiler options."""
    setup = setup or build_setup(config, global_batch, mesh=mesh)
    n = int(config.model.context_size)
    with setup.context():
        lowered = setup.step.lower(setup.abstract_state_sharded(), setup.abstract_batch(n))
        return setup, lowered.compile(compiler_options=options)


def dry_run(config, global_batch: int | None = None, topology: str | None = None,
            estimate: bool = True, verbose: bool = True) -> dict:  # fmt: skip
    """Compiles the train step for `topology` (e.g. "v5p-64") or the current devices; returns
    the report (see module doc) and prints it unless verbose=False."""
    chip = None
    if topology:
        devices, chip, chips = topology_devices(topology, math.prod(config.mesh.dcn))
        mesh = create_mesh(config.mesh.ici, config.mesh.dcn, devices=devices)
    else:
        mesh = create_mesh(config.mesh.ici, config.mesh.dcn)
    start = time.perf_counter()
    setup = build_setup(config, global_batch, mesh=mesh)
    n = int(config.model.context_size)
    head = dict(mode=f"TPU {topology}" if chip else "CPU fake devices", mesh=dict(setup.mesh.shape),
                global_batch=setup.global_batch, tokens=n, **_state_report(setup))  # fmt: skip
    note = chip and slice_note(config, chip.name, chips // math.prod(config.mesh.dcn))
    if note:
        head["slice_note"] = note
        if verbose:  # before the compile, which may take minutes
            print(f"note: {note}", flush=True)
    try:
        setup, compiled = compile_step(config, global_batch, mesh, setup=setup)
    except jax.errors.JaxRuntimeError as e:
        oom = out_of_hbm(str(e)) if chip else None
        if oom is None:
            raise
        report = dict(head, **_chip_report(chip, chips, head["devices"]), fits=False,
                      out_of_hbm=oom, to_fit=_ways_to_fit(config.model, n, chip.device_kind),
                      compile_seconds=round(time.perf_counter() - start, 1))  # fmt: skip
        if verbose:
            print_report(report)
        return report
    hlo_text = compiled.as_text()
    report = dict(head, **_memory_report(compiled, hlo_text))
    report["compile_seconds"] = round(time.perf_counter() - start, 1)
    model_flops = (
        train_step_flops(config.model, setup.global_batch, n, config.train.trainable)
        / report["devices"]
    )
    report["model_flops_per_device"] = model_flops
    if chip:
        report.update(_chip_report(chip, chips, report["devices"]))
        report.update(_ici_report(report))
        report["fits"] = report["peak_bytes"] <= report["hbm_bytes_per_device"]
        model = config.model
        backend = resolve_backend(model.attention_backend, n, chip.device_kind, model.remat_policy)
        report["attention_kernels"] = backend if backend in ("splash", "short") else None
        if estimate:
            try:
                peak = report["bf16_flops_per_device"]
                report.update(_estimate(config, setup.global_batch, mesh, model_flops, peak))
                report["estimate_flops_ratio"] = report["estimate_flops_per_device"] / model_flops
                bound = matmul_bound(report["estimate_mfu"], report["cycle_kinds"])
                # Pallas kernels (splash, "short") carry no cycles, so the shares leave them out
                if bound is not None and backend not in ("splash", "short"):
                    report["estimate_mfu_matmuls_only"] = bound
            except RuntimeError as e:  # memory and collectives stand without the estimate
                report["estimate_error"] = str(e)
        if "cycle_kinds" not in report:  # no estimate: the main program's profile
            report.update(cycle_report(hlo_text))
    if verbose:
        print_report(report)
    return report


def _ways_to_fit(model, tokens: int, tpu: str) -> list[str]:
    """What may make a step that ran out of HBM fit, starting from the config's own settings."""
    ways = []
    if model.remat_policy != "full":
        more = "dots or full" if model.remat_policy == "none" else "full"
        ways.append(f"rematerialise more (--config.model.remat_policy={more})")
    backend = resolve_backend(model.attention_backend, tokens, tpu, model.remat_policy)
    if backend in ("xla", "einsum"):  # the Pallas kernels keep no (B, H, N, N) array either
        ways.append("splash attention, which keeps tiles, not (B, H, N, N) scores "
                    "(--config.model.attention_backend=splash)")  # fmt: skip
    return ways + ["spread the state and batch over more chips (a larger --topology)",
                   "a smaller global batch (--dry_run_batch)"]  # fmt: skip


def _chip_report(chip, chips: int, devices: int) -> dict:
    """The chip kind and what each device of it offers (HBM bytes, bf16 FLOP/s, ICI bytes/s sent;
    the last None where undocumented)."""
    hbm, peak = per_device(chip, devices, chips)
    return dict(chip=chip.name, chips=chips, hbm_bytes_per_device=hbm, bf16_flops_per_device=peak,
                ici_send_bytes_per_second=ici_send_rate(chip, devices, chips))  # fmt: skip


def _ici_report(report: dict) -> dict:
    """The step's ICI traffic per device and, where the chip's bandwidth is documented, the
    least time it takes (every link busy both ways, nothing waiting)."""
    sent = ici_bytes(report["collectives"])
    out = dict(ici_bytes_per_device=sent)
    rate = report.get("ici_send_bytes_per_second")
    if rate:
        out["ici_seconds_at_least"] = sent / rate
    return out


def _estimate(config, global_batch, mesh, model_flops, peak_flops) -> dict:
    depth, unroll = int(config.model.depth), int(config.model.scan_unroll)
    shown = unroll if unroll >= depth else 1  # the program whose cycle profile the report shows
    priced = {}

    def compile_with(u):
        c = copy.deepcopy(config)
        c.model.scan_unroll = u
        compiled = compile_step(c, global_batch, mesh, ESTIMATE_OPTIONS)[1]
        if u == shown:
            priced["text"] = compiled.as_text()
        return compiled

    flops, seconds = configured_cost(compile_with, depth, unroll)
    return dict(estimate_flops_per_device=flops, estimate_step_seconds=seconds,
                estimate_mfu=model_flops / (seconds * peak_flops),
                **cycle_report(priced["text"]))  # fmt: skip


def matmul_bound(mfu: float, cycle_kinds: dict[str, float]) -> float | None:
    """The MFU the same estimate would give if every cycle but the matmuls' were gone (norms,
    softmax, copies, optimizer): mfu / (the matmuls' share of the cycles). An upper bound of what
    removing overhead alone can reach; the rest is the matmuls' own efficiency at these shapes.
    None without matmul cycles."""
    share = cycle_kinds.get("matmul", 0.0)
    return mfu / share if share > 0 else None


def cycle_report(hlo_text: str, top: int = 10) -> dict:
    """Where the compiled step's estimated cycles go: by op kind and the largest (module, kind,
    fwd/bwd) groups, as shares of the whole step (`parallel.hlo.cycle_profile`). With an
    estimate, of the program it prices (windowed einsums off); else of the main program."""
    rows = cycle_profile(hlo_text)
    kinds: dict[str, float] = {}
    for share, _, _, kind, _ in rows:
        kinds[kind] = kinds.get(kind, 0.0) + share
    return dict(cycle_kinds=dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
                cycle_top=[dict(share=r[0], where=r[2], kind=r[3], direction=r[4])
                           for r in rows[:top]])  # fmt: skip


def _print_out_of_hbm(r: dict) -> None:
    oom = r["out_of_hbm"]
    alone = " alone" if oom["what"] == "HLO temporaries" else ""  # the arguments come on top
    need = (f"{oom['what']}{alone} need {oom['needed_bytes'] / GIB:.2f} GiB of the "
            f"{oom['available_bytes'] / GIB:.2f} it can use" if oom["needed_bytes"] else "")  # fmt: skip
    print(f"HBM: {r['hbm_bytes_per_device'] / GIB:.1f} GiB per device ({r['chip']}, as documented "
          f"by Cloud TPU) -> DOES NOT FIT: the TPU compiler ran out of HBM{': ' if need else ''}"
          f"{need}\n  ({oom['message']})\nno step time is estimated; to fit, try:")  # fmt: skip
    for way in r["to_fit"]:
        print(f"  - {way}")


def peak_bytes(memory_analysis) -> int:
    """Arguments + outputs + temporaries - aliased bytes of a compiled program, per device."""
    get = lambda name: int(getattr(memory_analysis, name, 0) or 0)
    return (get("argument_size_in_bytes") + get("output_size_in_bytes")
            + get("temp_size_in_bytes") - get("alias_size_in_bytes"))  # fmt: skip


def _state_report(setup) -> dict:
    """Bytes of the train state, total and per device (exact, from the shardings)."""
    state, sh = setup.abstract_state, setup.shardings
    return {
        "devices": setup.mesh.devices.size,
        "params_total_bytes": _total_bytes(state.params),
        "params_bytes_per_device": _per_device_bytes(state.params, sh.params),
        "ema_bytes_per_device": _per_device_bytes(state.ema_params, sh.ema_params),
        "opt_bytes_per_device": _per_device_bytes(state.opt_state, sh.opt_state),
        "opt_total_bytes": _total_bytes(state.opt_state),
    }


def _memory_report(compiled, hlo_text: str) -> dict:
    mem = compiled.memory_analysis()
    get = lambda name: int(getattr(mem, name, 0) or 0)
    report = {
        "argument_bytes": get("argument_size_in_bytes"),
        "output_bytes": get("output_size_in_bytes"),
        "temp_bytes": get("temp_size_in_bytes"),
        "alias_bytes": get("alias_size_in_bytes"),
        "collectives": collectives(hlo_text),
    }
    report["peak_bytes"] = peak_bytes(mem)
    return report


def print_report(r: dict) -> None:
    done = "stopped, out of HBM," if "out_of_hbm" in r else "compiled"
    print(f"dry run ({r['mode']}): {r['devices']} devices, mesh {r['mesh']}, global batch "
          f"{r['global_batch']} x {r['tokens']} tokens, {done} in {r['compile_seconds']} s")  # fmt: skip
    print(f"parameters: {r['params_total_bytes'] / GIB:.2f} GiB total, "
          f"{r['params_bytes_per_device'] / GIB:.3f} GiB per device; EMA "
          f"{r['ema_bytes_per_device'] / GIB:.3f} GiB; optimizer state "
          f"{r['opt_bytes_per_device'] / GIB:.3f} GiB per device (exact, from the shardings)")  # fmt: skip
    if "out_of_hbm" in r:
        _print_out_of_hbm(r)
        return
    print(f"compiled step per device: arguments {r['argument_bytes'] / GIB:.3f} GiB, outputs "
          f"{r['output_bytes'] / GIB:.3f} GiB (aliased {r['alias_bytes'] / GIB:.3f}), temporaries "
          f"{r['temp_bytes'] / GIB:.3f} GiB -> peak {r['peak_bytes'] / GIB:.2f} GiB")  # fmt: skip
    if "fits" in r:
        print(f"HBM: {r['hbm_bytes_per_device'] / GIB:.1f} GiB per device ({r['chip']}, as "
              f"documented by Cloud TPU) -> {'fits' if r['fits'] else 'DOES NOT FIT'}")  # fmt: skip
    else:
        print("(CPU compiler: the peak approximates a TPU's; use --topology for the TPU plan)")
    coll = ", ".join(f"{k} {v['count']} ({v['bytes'] / GIB:.2f} GiB)"
                     for k, v in r["collectives"].items() if v["count"])  # fmt: skip
    print(f"collectives per step (per-device bytes): {coll or 'none'}")
    if r.get("ici_bytes_per_device"):
        sent = f"over ICI each device sends {r['ici_bytes_per_device'] / GIB:.2f} GiB per step"
        if "ici_seconds_at_least" in r:
            print(f"{sent}: at least {r['ici_seconds_at_least'] * 1e3:.1f} ms at "
                  f"{r['ici_send_bytes_per_second'] / 1e9:.0f} GB/s each way ({r['chip']}'s "
                  "bidirectional ICI bandwidth as Cloud TPU documents it, every link busy)")  # fmt: skip
        else:
            print(f"{sent} (Cloud TPU documents no ICI bandwidth for {r['chip']})")
    if "cycle_kinds" in r:
        kinds = ", ".join(f"{k} {100 * v:.0f}%" for k, v in r["cycle_kinds"].items() if v >= 0.01)
        kernels = r.get("attention_kernels")
        left_out = "collectives" + (f" and the {kernels} attention kernels" if kernels else "")
        print(f"where the compiler's estimated cycles go ({left_out} carry no cycles): {kinds}; "
              "largest:")  # fmt: skip
        for row in r["cycle_top"]:
            print(
                f"  {100 * row['share']:5.1f}%  {row['where']} ({row['kind']}, {row['direction']})"
            )
    if "estimate_error" in r:
        print(f"no compiler estimate: {r['estimate_error']}")
    if "estimate_step_seconds" in r:
        print(f"compiler estimate (not a measurement): {r['estimate_step_seconds'] * 1e3:.1f} ms "
              f"per step, MFU {100 * r['estimate_mfu']:.1f}% of {r['bf16_flops_per_device'] / 1e12:.1f} "
              f"bf16 TFLOP/s per device; its FLOPs are {r['estimate_flops_ratio']:.3f}x the "
              f"model's {r['model_flops_per_device']:.3e} per device"
              + ("; the splash kernels, which carry no cost estimate, are priced by the "
                 "compiler from their FLOPs and bytes (a roofline: at best; their backward "
                 "recomputes the scores)" if r.get("attention_kernels") == "splash" else "")
              + ("; the short attention kernels are priced by the compiler from the work they "
                 "state (pl.CostEstimate; a roofline: at best; their backward recomputes the "
                 "scores)" if r.get("attention_kernels") == "short" else ""))  # fmt: skip
        if "estimate_mfu_matmuls_only" in r:
            print(f"  with only the matmuls' cycles ({100 * r['cycle_kinds']['matmul']:.0f}% of "
                  f"them) the same estimate would give MFU "
                  f"{100 * r['estimate_mfu_matmuls_only']:.1f}%: the most that removing the "
                  "other work (norms, softmax, copies, optimizer) can reach at these shapes")  # fmt: skip
        if "ici_seconds_at_least" in r:
            est, ms = r["estimate_step_seconds"] * 1e3, r["ici_seconds_at_least"] * 1e3
            print(f"  not in it: the collectives' {ms:.1f} ms or more on the interconnect (the "
                  "estimate prices a collective as a pass over its buffers in HBM): the step "
                  f"takes {est:.1f} ms if they all overlap compute, at least {est + ms:.1f} ms "
                  "if none does")  # fmt: skip
        dcn = dcn_bytes(r["collectives"])
        if dcn:
            print(f"  not in it: the transfers between slices over DCN ({dcn / GIB:.2f} GiB per "
                  "device per step), host transfers the compiler does not price")  # fmt: skip
