"""Evaluation timings: FID Inception throughput, FID cost, evaluate_npz peak memory.

    python -m fitv2_jax.bench --suite eval                       # Inception images/s at 256x256
    python -m fitv2_jax.bench --suite eval --rss 200,2000        # + peak RSS of evaluate_npz

Inception: images/s at the given input size and batch size (resize included), median of
`--repeats` timed calls after one compile call. FID: seconds for one 2048-d FID by ADM's sqrtm
and by the eigh route. RSS: each count runs `python -m fitv2_jax.evaluate_npz` in a fresh
process on random uint8 samples at `--rss_size` (the same file as reference and samples) and
reports its own peak resident set (VmHWM), so streaming can be checked: 2000 samples should
not need more memory than 200.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile

import numpy as np


def _inception(args) -> None:
    from fitv2_jax.eval.inception import load_inception

    h, w = (int(v) for v in args.size.split("x"))
    model = load_inception(batch_size=args.batch_size)
    images = np.random.default_rng(0).integers(0, 256, (args.batch_size, h, w, 3), np.uint8)
    model(images)  # compile
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        model(images)
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    print(
        f"inception {h}x{w} batch={args.batch_size}: {args.batch_size / med:.2f} images/s "
        f"(median of {args.repeats}: {med:.3f} s per batch)"
    )


def _fid(args) -> None:
    from fitv2_jax.eval.metrics import feature_statistics, fid

    rng = np.random.default_rng(0)
    # Full-rank 2048-d statistics, as from a real 10K-50K sample set.
    a = rng.standard_normal((4096, 2048))
    stats = (*feature_statistics(a[:2048] @ np.diag(rng.uniform(0.5, 1, 2048))),)
    stats += feature_statistics(a[2048:])
    for method in ("sqrtm", "eigh"):
        times = []
        for _ in range(args.fid_repeats):
            t = time.perf_counter()
            value = fid(*stats, method=method)
            times.append(time.perf_counter() - t)
        print(f"fid 2048-d method={method}: {statistics.median(times):.2f} s (value {value:.6f})")


# Runs a module as __main__, then writes its own peak resident set (VmHWM, kB) to argv[1].
# The wait4/getrusage ru_maxrss of a child is not its own peak: Linux carries the parent's
# high-water mark across fork and exec into it, so a bench that has itself held 1.5 GB would
# see >= 1.5 GB in every child. VmHWM belongs to the address space exec created.
_PEAK_RSS_RUNNER = """
import runpy, sys
out, mod = sys.argv[1], sys.argv[2]
sys.argv = [mod, *sys.argv[3:]]
try:
    runpy.run_module(mod, run_name="__main__", alter_sys=True)
finally:
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    with open(out, "w") as f:
        f.write(str(kb))
"""


def peak_rss_of_module(module: str, argv: list[str]) -> tuple[float, float]:
    """(peak resident set in MiB, wall seconds) of `python -m module *argv` in a fresh process.

    Linux only (reads /proc/self/status). Raises with the command line when it fails.
    """
    if not os.path.exists("/proc/self/status"):
        raise SystemExit("peak-RSS measurement needs Linux (/proc/self/status)")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "peak_kb")
        cmd = [sys.executable, "-c", _PEAK_RSS_RUNNER, out, module, *argv]
        t = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wall = time.perf_counter() - t
        if proc.returncode:
            raise RuntimeError(
                f"python -m {module} {' '.join(argv)} failed with exit code {proc.returncode}:\n"
                + proc.stderr[-3000:]
            )
        with open(out) as f:
            return int(f.read()) / 1024, wall


def write_random_npz(path: str, n: int, h: int, w: int, seed: int = 0) -> str:
    """An ADM-style .npz of n random uint8 (h, w, 3) images, written without holding them all."""
    rng = np.random.default_rng(seed)
    arr = np.lib.format.open_memmap(path + ".npy", "w+", np.uint8, (n, h, w, 3))
    for i in range(0, n, 100):
        arr[i : i + 100] = rng.integers(0, 256, arr[i : i + 100].shape, np.uint8)
    arr.flush()
    del arr
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        zf.write(path + ".npy", "arr_0.npy")
    os.remove(path + ".npy")
    return path


def _rss(args) -> None:
    h, w = (int(v) for v in args.rss_size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(v) for v in args.rss.split(",")):
            path = write_random_npz(os.path.join(tmp, f"s{n}.npz"), n, h, w, seed=n)
            argv = [path, path, "--batch_size", str(args.batch_size), "--fid_method", "eigh"]
            argv += ["--json", os.path.join(tmp, f"s{n}.json")]
            peak, wall = peak_rss_of_module("fitv2_jax.evaluate_npz", argv)
            print(
                f"evaluate_npz {n} samples {h}x{w} (as reference and samples), batch "
                f"{args.batch_size}: peak RSS {peak:.0f} MiB, {wall:.0f} s; "
                f"the arr_0 array is {n * h * w * 3 / 2**20:.0f} MiB",
                flush=True,
            )
            os.remove(path)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m fitv2_jax.bench --suite eval", description=__doc__)
    p.add_argument("--size", default="256x256", help="Inception input HxW")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--fid_repeats", type=int, default=1, help="0 skips the FID timing")
    p.add_argument(
        "--rss",
        default="",
        help="comma-separated sample counts for the peak-RSS runs, e.g. 200,2000",
    )
    p.add_argument("--rss_size", default="512x512", help="HxW of the peak-RSS samples")
    args = p.parse_args(argv)
    _inception(args)
    if args.fid_repeats:
        _fid(args)
    if args.rss:
        _rss(args)
