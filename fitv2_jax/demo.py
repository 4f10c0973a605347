r"""The embedded default, end to end on a CPU, offline: `python -m fitv2_jax.demo --out demo_out`.

Prepares crops of scikit-image's bundled photos at nine aspect ratios, trains a small pixel-space
FiTv2 (configs/demo_cpu.py), samples the early and the final checkpoint at four sizes (two never
trained on) and scores FID/sFID/precision/recall against held-out crops of each size with the
real FID Inception weights. Writes OUT/report.md; rerun to resume after an interruption.
"""

from absl import flags

from fitv2_jax.cli import flags as cli
from fitv2_jax.cli.app import run
from fitv2_jax.recipes.demo import DemoOptions, run_demo
from fitv2_jax.utils.errors import UserError

FLAGS = flags.FLAGS
defaults = DemoOptions()
flags.DEFINE_string("out", defaults.out, "output directory (rerun to resume)")
flags.DEFINE_integer("steps", None, "training steps (default: the config's)")
flags.DEFINE_integer("early_step", defaults.early_step, "the early checkpoint scored against the "
                     "final one")  # fmt: skip
flags.DEFINE_string("sizes", defaults.sizes, "HEIGHTxWIDTH list for sampling + FID")
flags.DEFINE_integer("num_samples", defaults.num_samples, "samples per size per checkpoint")
flags.DEFINE_integer("num_steps", defaults.num_steps, "Euler steps")
cli.define_renamed("resolutions", "sizes")
cli.define_renamed("sample_steps", "num_steps")


def main(argv):
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}; flags look like --out DIR")
    report = run_demo(DemoOptions(out=FLAGS.out, steps=FLAGS.steps, early_step=FLAGS.early_step,
                                  sizes=FLAGS.sizes, num_samples=FLAGS.num_samples,
                                  num_steps=FLAGS.num_steps))  # fmt: skip
    print(f"Report: {report}")


if __name__ == "__main__":
    run(main)
