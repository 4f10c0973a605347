r"""The embedded default, end to end on a CPU, offline: `python -m fitv2_jax.demo --out demo_out`.

Prepares crops of scikit-image's bundled photos at nine aspect ratios and trains a small
pixel-space FiTv2 (configs/demo_cpu.py); during training the EMA weights are sampled at four sizes
(two never trained on) and scored (FID/KID/sFID/precision/recall) against held-out crops of each
size with the real FID Inception weights. Writes OUT/report.md with FID over training steps;
rerun to resume after an interruption.
"""

from absl import flags

from fitv2_jax.cli import flags as cli
from fitv2_jax.cli.app import run
from fitv2_jax.recipes.demo import DemoOptions, run_demo
from fitv2_jax.utils.errors import UserError

FLAGS = flags.FLAGS
defaults = DemoOptions()
flags.DEFINE_string("out", defaults.out, "output directory (rerun to resume)")
flags.DEFINE_integer("steps", None, "training steps (default: the config's, 1800)")
flags.DEFINE_integer("eval_every", None, "steps between evaluations (default: the config's, 600)")
flags.DEFINE_string("sizes", None, "HEIGHTxWIDTH list for sampling + FID (default: the config's "
                    "32x32,24x40,16x64,48x48)")  # fmt: skip
flags.DEFINE_integer("num_samples", None, "samples per size per evaluation (default: 96)")
flags.DEFINE_integer("num_steps", None, "Euler steps (default: 20)")
cli.define_renamed("resolutions", "sizes")
cli.define_renamed("early_step", "eval_every")
cli.define_renamed("sample_steps", "num_steps")


def main(argv):
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}; flags look like --out DIR")
    report = run_demo(DemoOptions(out=FLAGS.out, steps=FLAGS.steps, eval_every=FLAGS.eval_every,
                                  sizes=FLAGS.sizes, num_samples=FLAGS.num_samples,
                                  num_steps=FLAGS.num_steps))  # fmt: skip
    print(f"Report: {report}")


if __name__ == "__main__":
    run(main)
