r"""The TPU table: every config x topology x remat x attention compiled by the real TPU compiler
(libtpu, no TPU needed): per-chip peak HBM, whether it fits, the compiler's step-time estimate and
the MFU it implies. Writes OUT.json (one row per compile, resumable: rows already there are kept)
and OUT.md (the README's table). A step the compiler finds too big for the chip's HBM is a row
too ("temporaries N > U usable of M GiB", fits "no"; N: what the compiler needed when it
stopped, a lower bound of the peak; U: what it can use of the chip's M).

    python -m fitv2_jax.bench --suite tpu --out docs/tpu_table
    python -m fitv2_jax.bench --suite tpu --configs configs/fitv2_xl.py --topologies v5p-64 \
        --remat none,full --attention xla,splash --out /tmp/xl
    python -m fitv2_jax.bench --suite tpu --configs configs/fitv2_hr_xl.py --topologies v6e-64 \
        --remat full --attention splash --scan_unroll 1 --out /tmp/hr   # blocks scanned
    python -m fitv2_jax.bench --suite tpu --configs configs/fitv2_xl.py --topologies v5e-256 \
        --remat dots --attention splash --scan_unroll 1 --ici "(2,-1,1)" --out /tmp/xl  # data 2
    python -m fitv2_jax.bench --suite tpu --presets --out /tmp/presets   # each config's presets

With --presets the rows are each config's presets (`config.slices`) on their own slices, with
the preset's settings ("fitv2_xl:v5e-256"; --topologies picks the slices; --remat, --attention,
--scan_unroll and --ici are not used): the table the presets come from, compiled again in one
command.

Each row is `train --dry_run --topology T` (`training.dry_run`) with the config's model at its
context size (256 tokens; 1024 for the HR post-training) and the given global batch. Estimates
are the compiler's cost model, not measurements; see fitv2_jax/parallel/cost.py for how the
scanned blocks are counted.
"""

from __future__ import annotations

import json
import os
import time
import traceback

from absl import flags

from fitv2_jax.config.defaults import mesh_defaults
from fitv2_jax.config.files import load_config
from fitv2_jax.config.slices import canonical
from fitv2_jax.models.attention import resolve_backend
from fitv2_jax.models.short_attention import max_tokens as short_max_tokens
from fitv2_jax.parallel.topology import parse_topology
from fitv2_jax.training.dry_run import dry_run
from fitv2_jax.utils.errors import UserError

FLAGS = flags.FLAGS
CONFIGS = ["configs/fitv2_b.py", "configs/fitv2_xl.py", "configs/fitv2_3b.py",
           "configs/fitv2_hr_xl.py", "configs/fitv2_hr_3b.py"]  # fmt: skip
GIB = 2.0**30
DEFAULT_ICI = tuple(mesh_defaults().ici)  # FSDP over every chip


def define_flags(module_name: str) -> None:
    m = module_name
    flags.DEFINE_list("configs", CONFIGS, "config files", module_name=m)
    flags.DEFINE_list("topologies", ["v5p-64", "v5e-256", "v6e-64"], "TPU slices (see "
                      "train --topology)", module_name=m)  # fmt: skip
    flags.DEFINE_list("remat", ["none", "dots", "full"], "remat policies", module_name=m)
    flags.DEFINE_list("attention", ["xla", "splash", "short"], "attention backends ('short' "
                      "only where the chip takes the rows: 1024 tokens, 512 on v4)",
                      module_name=m)  # fmt: skip
    flags.DEFINE_list("scan_unroll", ["config"], "blocks per scan iteration: 'config' keeps the "
                      "config's (the pod configs unroll every block), 1 scans them (faster to "
                      "compile; the estimate scales the loop body by its trip count)",
                      module_name=m)  # fmt: skip
    flags.DEFINE_multi_string("ici", ["config"], "ICI mesh (data, fsdp, tensor) of a row, as "
                              "--config.mesh.ici takes it, e.g. '(2,-1,1)'; 'config' keeps the "
                              "config's; repeat the flag for several", module_name=m)  # fmt: skip
    flags.DEFINE_bool("presets", False, "rows: each config's presets on their slices, with "
                      "their settings (module doc)", module_name=m)  # fmt: skip
    flags.DEFINE_integer("global_batch", 256, "global batch (the paper's)", module_name=m)
    flags.DEFINE_string("out", "tpu_table", "writes OUT.json and OUT.md", module_name=m)


def _key(row: dict) -> tuple:
    # rows written before --scan_unroll have none (None: compiled again, never matched); rows
    # written before --ici ran the config's mesh, which is what an ici of None means
    ici = row.get("ici")
    return (row["config"], row["topology"], row["remat"], row["attention"], row.get("scan_unroll"),
            None if ici is None else tuple(ici))  # fmt: skip


def parse_ici(value: str) -> tuple[int, int, int] | None:
    """An --ici value: None for 'config' (the config's own mesh), else its (data, fsdp, tensor)."""
    if value == "config":
        return None
    try:
        ici = tuple(int(v) for v in value.strip().strip("()").split(","))
    except ValueError:
        ici = ()
    if len(ici) != 3 or ici.count(-1) > 1 or any(v == 0 or v < -1 for v in ici):
        raise UserError(f"--ici={value!r}: expected 'config' or (data, fsdp, tensor) sizes such "
                        "as '(2,-1,1)', at most one -1 (the rest of the slice's chips).")  # fmt: skip
    return ici


def _unroll(config_path: str, value: str) -> int:
    """The blocks per scan iteration a `--scan_unroll` value means for this config."""
    if value == "config":
        return int(load_config(config_path).model.scan_unroll)
    if not value.isdigit() or int(value) < 1:
        raise UserError(f"--scan_unroll={value!r}: expected 'config' or a positive integer.")
    return int(value)


def _backends(tokens: int, topology: str, attentions: list[str]) -> list[str]:
    """The backends a config of `tokens` tokens can run on a slice ("short" only up to the
    tokens it takes on that chip, `short_attention.max_tokens`)."""
    most = short_max_tokens(parse_topology(topology)[0].device_kind)
    return [a for a in attentions if a != "short" or tokens <= most]


def _name(config_path: str) -> str:
    """A row's config: the file's name, and its preset if the path has one ("fitv2_xl:v5e-256")."""
    path, _, preset = config_path.partition(":")
    name = os.path.basename(path).removesuffix(".py")
    return f"{name}:{preset}" if preset else name


def preset_plan(config_paths: list[str]) -> list[tuple]:
    """(config:preset, topology, remat, attention, unroll, ici) of every preset of the configs,
    with the settings the preset gives (attention as the backend "auto" resolves to there)."""
    plan = []
    for path in config_paths:
        path = path.partition(":")[0]
        for preset in load_config(path).mesh.slice_presets:
            config = load_config(f"{path}:{preset}")
            model = config.model
            remat = str(model.remat_policy)
            tpu = parse_topology(preset)[0].device_kind
            attention = resolve_backend(model.attention_backend, int(model.context_size), tpu,
                                        remat)  # fmt: skip
            ici = tuple(config.mesh.ici)
            plan.append((f"{path}:{preset}", preset, remat, attention, int(model.scan_unroll),
                         None if ici == DEFAULT_ICI else ici))  # fmt: skip
    return plan


def _row(config_path: str, topology: str, remat: str, attention: str, unroll: int,
         ici: tuple[int, int, int] | None, batch: int) -> dict:  # fmt: skip
    config = load_config(config_path)
    config.model.remat_policy, config.model.attention_backend = remat, attention
    config.model.scan_unroll = unroll
    if ici is not None:
        config.mesh.ici = ici
    row = dict(config=_name(config_path), topology=topology,
               remat=remat, attention=attention, scan_unroll=unroll, ici=ici,
               depth=int(config.model.depth), global_batch=batch,
               tokens=int(config.model.context_size))  # fmt: skip
    start = time.perf_counter()
    try:
        r = dry_run(config, batch, topology, verbose=False)
    except Exception as e:  # noqa: BLE001 - a row that does not compile is a result too
        traceback.print_exc()
        return dict(row, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    keep = ("devices", "chips", "peak_bytes", "hbm_bytes_per_device", "fits", "params_total_bytes",
            "estimate_step_seconds", "estimate_mfu", "estimate_mfu_matmuls_only",
            "estimate_flops_ratio", "estimate_error", "collectives", "ici_bytes_per_device",
            "ici_seconds_at_least", "cycle_kinds", "cycle_top", "out_of_hbm")  # fmt: skip
    row.update({k: r[k] for k in keep if k in r})
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def _label(row: dict) -> str:
    """The config's name, how its blocks ran when not as one scan over all of them, and its ICI
    mesh when not the config's."""
    unroll, depth = row.get("scan_unroll"), row.get("depth")
    label = row["config"]
    if unroll is not None and unroll >= depth:  # None: a row written before --scan_unroll
        label += f", {depth} blocks unrolled"
    elif unroll is not None and unroll > 1:
        label += f", scan unrolled x{unroll}"
    if row.get("ici") is not None:
        label += ", ici ({},{},{})".format(*row["ici"])
    return label


def _size(nbytes: float) -> str:
    """Peak bytes as GiB with one decimal, or MiB below 0.1 GiB (a small model on many chips)."""
    return f"{nbytes / GIB:.1f}" if nbytes >= 0.1 * GIB else f"{nbytes / 2**20:.0f} MiB"


def _out_of_hbm(oom: dict, hbm: str) -> str:
    """What the compiler needed when it stopped, against what it can use of the chip's HBM (a
    little less: 15.75 of a v5e chip's 16 GiB)."""
    if not oom["needed_bytes"]:
        return f"over {hbm}"
    what = "temporaries" if oom["what"] == "HLO temporaries" else "needs"
    return (f"{what} {oom['needed_bytes'] / GIB:.2f} > {oom['available_bytes'] / GIB:.2f} "
            f"usable of {hbm}")  # fmt: skip


def markdown(rows: list[dict]) -> str:
    lines = ["| config | tokens | topology | remat | attention | peak HBM / chip | fits | "
             "est. step | est. MFU |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        head = (f"| {_label(r)} | {r['tokens']} | {r['topology']} | {r['remat']} | "
                f"{r['attention']} |")  # fmt: skip
        if "error" in r:
            lines.append(f"{head} did not compile: {r['error']} | | | |")
            continue
        hbm = f"{r['hbm_bytes_per_device'] / GIB:.0f} GiB"
        if "out_of_hbm" in r:  # the compiler stopped: what it needed is a lower bound
            lines.append(f"{head} {_out_of_hbm(r['out_of_hbm'], hbm)} | no | out of HBM | |")
            continue
        lines.append(f"{head} {_size(r['peak_bytes'])} of {hbm} | {'yes' if r['fits'] else 'no'} | "
                     + (f"{1e3 * r['estimate_step_seconds']:.3g} ms | {100 * r['estimate_mfu']:.1f}% |"
                        if "estimate_mfu" in r else "no estimate (an op the compiler cannot cost) | |"))  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    path = FLAGS.out + ".json"
    rows = json.load(open(path)) if os.path.exists(path) else []
    done = {_key(r) for r in rows if "error" not in r}
    rows = [r for r in rows if _key(r) in done]
    if FLAGS.presets:
        slices = {canonical(t) for t in FLAGS.topologies}
        plan = [row for row in preset_plan(FLAGS.configs) if row[1] in slices]
    else:
        unrolls = {c: sorted({_unroll(c, u) for u in FLAGS.scan_unroll}) for c in FLAGS.configs}
        icis = [parse_ici(v) for v in FLAGS.ici]
        tokens = {c: int(load_config(c).model.context_size) for c in FLAGS.configs}
        plan = [(c, t, m, a, u, i) for c in FLAGS.configs for t in FLAGS.topologies
                for m in FLAGS.remat for a in _backends(tokens[c], t, FLAGS.attention)
                for u in unrolls[c] for i in icis]  # fmt: skip
    for n, (c, t, m, a, u, ici) in enumerate(plan, 1):
        name = _name(c)
        if (name, t, m, a, u, ici) in done:
            continue
        mesh = "" if ici is None else f", ici {ici}"
        print(f"[{n}/{len(plan)}] {name} on {t}, remat {m}, attention {a}, scan_unroll {u}{mesh}",
              flush=True)  # fmt: skip
        row = _row(c, t, m, a, u, ici, FLAGS.global_batch)
        rows.append(row)
        print("  " + markdown([row]).splitlines()[-1], flush=True)
        _write(rows, FLAGS.out)  # after every row: a stopped run keeps what it compiled
    _write(rows, FLAGS.out)  # also when every row was there already
    print(f"wrote {path} and {FLAGS.out}.md ({len(rows)} rows)")


def _write(rows: list[dict], out: str) -> None:
    with open(out + ".json.tmp", "w") as f:
        json.dump(rows, f, indent=1)
    os.replace(out + ".json.tmp", out + ".json")
    with open(out + ".md", "w") as f:
        f.write(markdown(rows))
