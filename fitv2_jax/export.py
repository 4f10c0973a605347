r"""Write any checkpoint's params as an official-layout .safetensors file.

  python -m fitv2_jax.export --checkpoint WORKDIR [--step N] --out fitv2_ema.safetensors
  python -m fitv2_jax.export --checkpoint WORKDIR --params raw --out fitv2_raw.safetensors

The file loads in the official PyTorch FiT (`load_state_dict`) and in every command here that
takes --checkpoint. The model config is the run's own (WORKDIR/config.json) unless --config is
given (needed for official files and folders, whose layout this also rewrites).
"""

from absl import flags
from ml_collections import config_flags

from fitv2_jax.cli import flags as cli
from fitv2_jax.cli.app import run
from fitv2_jax.utils import paths
from fitv2_jax.utils.errors import UserError
from fitv2_jax.weights.fit import load_fit_params, save_official

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "config file (default: the run's config.json)",
                                lock_config=False)  # fmt: skip
flags.DEFINE_string("checkpoint", None, "training workdir, WORKDIR/checkpoints/<step>, or an "
                    "official file or folder")  # fmt: skip
flags.DEFINE_integer("step", None, "step to export (default: the latest)")
flags.DEFINE_enum("params", "ema", ["ema", "raw"], "the EMA or the raw training params")
flags.DEFINE_string("out", None, "output .safetensors path or URL (gs://...)")
flags.mark_flags_as_required(["checkpoint", "out"])
cli.define_renamed("output", "out")
cli.define_renamed("raw", "params=raw", boolean=True)


def main(argv):
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}; flags look like --out FILE")
    config = cli.resolve_config(FLAGS.config)
    if paths.absolute(FLAGS.out) == paths.absolute(FLAGS.checkpoint):
        raise UserError(f"--out {FLAGS.out} is the input checkpoint; choose another path")
    params = load_fit_params(FLAGS.checkpoint, config.model, use_ema=FLAGS.params == "ema",
                             step=FLAGS.step)  # fmt: skip
    print(f"wrote {save_official(params, config.model, FLAGS.out)}")


if __name__ == "__main__":
    run(main)
