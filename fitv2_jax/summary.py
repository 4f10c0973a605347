r"""Parameter count and linear-layer GFLOPs of a config, by component. Allocates nothing.

  python -m fitv2_jax.summary --config configs/fitv2_xl.py [--tokens 1024]

GFLOPs follow the paper's convention: multiply-accumulates of the linear layers only, per image,
attention-map products reported separately.
"""

from absl import flags
from ml_collections import config_flags

from fitv2_jax.cli.app import run
from fitv2_jax.models.summary import format_summary, summarize, trainable_subset_params
from fitv2_jax.utils.errors import UserError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/fitv2_xl.py",
                                lock_config=False)  # fmt: skip
flags.DEFINE_integer("tokens", 256, "sequence length (256 or 1024)")
flags.mark_flags_as_required(["config"])


def main(argv):
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}; flags look like --tokens 256")
    if FLAGS.tokens < 1:
        raise UserError(f"--tokens {FLAGS.tokens}: give a positive sequence length")
    print(format_summary(summarize(FLAGS.config.model, FLAGS.tokens)))
    subset = trainable_subset_params(FLAGS.config.model)
    print(f"high-resolution post-training subset (official): {subset / 1e6:.2f}M parameters")


if __name__ == "__main__":
    run(main)
