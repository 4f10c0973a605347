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

import os
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile

import numpy as np
from absl import flags

from fitv2_jax.eval.features import load_inception
from fitv2_jax.eval.metrics import feature_statistics, fid
from fitv2_jax.utils.errors import UserError

FLAGS = flags.FLAGS


def define_flags(module_name: str) -> None:
    m = module_name
    flags.DEFINE_string("size", "256x256", "Inception input HxW", module_name=m)
    flags.DEFINE_integer("batch_size", 32, "images per Inception call (and per batch of the "
                         "peak-RSS runs)", module_name=m)  # fmt: skip
    flags.DEFINE_integer("repeats", 5, "timed Inception calls, median reported", module_name=m)
    flags.DEFINE_integer("fid_repeats", 1, "timed FIDs per method; 0 skips the FID timing",
                         module_name=m)  # fmt: skip
    flags.DEFINE_list("rss", [], "sample counts for the peak-RSS runs of evaluate_npz, e.g. "
                      "200,2000", module_name=m)  # fmt: skip
    flags.DEFINE_string("rss_size", "512x512", "HxW of the peak-RSS samples", module_name=m)
    flags.DEFINE_string("inception", None, "Inception weights file (default: evaluate_npz's "
                        "default_1.pt)", module_name=m)  # fmt: skip


def _hw(flag: str) -> tuple[int, int]:
    value = FLAGS[flag].value
    try:
        h, w = (int(v) for v in value.lower().split("x"))
    except ValueError as e:
        raise UserError(f"--{flag} {value}: give HEIGHTxWIDTH, e.g. 256x256") from e
    if h < 1 or w < 1:
        raise UserError(f"--{flag} {value}: give positive sizes")
    return h, w


def _inception() -> None:
    h, w = _hw("size")
    batch, repeats = FLAGS.batch_size, FLAGS.repeats
    model = load_inception(FLAGS.inception, batch_size=batch)
    images = np.random.default_rng(0).integers(0, 256, (batch, h, w, 3), np.uint8)
    model(images)  # compile
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        model(images)
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    print(
        f"inception {h}x{w} batch={batch}: {batch / med:.2f} images/s "
        f"(median of {repeats}: {med:.3f} s per batch)",
        flush=True,
    )


def _fid() -> None:
    rng = np.random.default_rng(0)
    # Full-rank 2048-d statistics, as from a real 10K-50K sample set.
    a = rng.standard_normal((4096, 2048))
    stats = (*feature_statistics(a[:2048] @ np.diag(rng.uniform(0.5, 1, 2048))),)
    stats += feature_statistics(a[2048:])
    for method in ("sqrtm", "eigh"):
        times = []
        for _ in range(FLAGS.fid_repeats):
            t = time.perf_counter()
            value = fid(*stats, method=method)
            times.append(time.perf_counter() - t)
        print(
            f"fid 2048-d method={method}: {statistics.median(times):.2f} s (value {value:.6f})",
            flush=True,
        )


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
        raise UserError("--rss: peak-RSS measurement needs Linux (/proc/self/status)")
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


def _rss(counts: list[int]) -> None:
    h, w = _hw("rss_size")
    batch = FLAGS.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        for n in counts:
            path = write_random_npz(os.path.join(tmp, f"s{n}.npz"), n, h, w, seed=n)
            argv = [path, path, "--batch_size", str(batch), "--fid_method", "eigh"]
            argv += ["--out", os.path.join(tmp, f"s{n}.json")]
            if FLAGS.inception:
                argv += ["--inception", os.path.abspath(FLAGS.inception)]
            peak, wall = peak_rss_of_module("fitv2_jax.evaluate_npz", argv)
            print(
                f"evaluate_npz {n} samples {h}x{w} (as reference and samples), batch "
                f"{batch}: peak RSS {peak:.0f} MiB, {wall:.0f} s; "
                f"the arr_0 array is {n * h * w * 3 / 2**20:.0f} MiB",
                flush=True,
            )
            os.remove(path)


def main() -> None:
    if FLAGS.batch_size < 1 or FLAGS.repeats < 1 or FLAGS.fid_repeats < 0:
        raise UserError("--batch_size and --repeats must be >= 1, --fid_repeats >= 0")
    try:
        counts = [int(v) for v in FLAGS.rss]
    except ValueError as e:
        raise UserError(f"--rss {','.join(FLAGS.rss)}: give sample counts, e.g. 200,2000") from e
    if any(n < 1 for n in counts):
        raise UserError(f"--rss {','.join(FLAGS.rss)}: give positive sample counts")
    _inception()
    if FLAGS.fid_repeats:
        _fid()
    if counts:
        _rss(counts)
