r"""Generate images with a FiT/FiTv2 model at any sizes: PNGs, a grid and an ADM .npz per size.

  # a smoke run with random weights (no files needed; a tiny model in pixel space):
  python -m fitv2_jax.sample --config configs/tiny.py --random_init --config.latent=False \
      --config.model.in_channels=3 --config.model.patch_size=16 \
      --sizes 256x256,160x320,320x320 --num_samples 8 --solver euler --num_steps 8
  # the official FiTv2-XL/2 checkpoint with the SD VAE, in and out of distribution:
  python -m fitv2_jax.sample --config configs/fitv2_xl.py --checkpoint FiTv2_XL.safetensors \
      --vae /weights/sd-vae-ft-ema --sizes 256x256,160x320,320x320,224x448 --cfg_scale 1.5 \
      --labels 207,360,387,974 --num_samples 16 --out samples/xl

Sizes are HEIGHTxWIDTH in pixels, multiples of patch size x VAE downsampling (16 for the SD-VAE
latent configs; the patch size for pixel-space configs). `--rule auto` uses plain RoPE within
the training context and VisionNTK + attention scale beyond it, as the paper does; a
high-resolution model keeps the rule it was trained with. With a training workdir as
--checkpoint, --config defaults to its config.json. Output per size: OUT/HxW/*.png, grid.png,
samples_HxW.npz (ADM's format); OUT/sample_info.json records every setting; OUT may be a URL
(gs://bucket/samples, with the gcs extra). Sample i uses noise
from (seed, i): the same seed gives the same images for any batch size or device count (for the
fixed-step solvers).
"""

import jax
from absl import flags
from ml_collections import config_flags

from fitv2_jax.cli import flags as cli
from fitv2_jax.cli.app import run
from fitv2_jax.cli.distributed import define_distributed_flags, start_distributed
from fitv2_jax.sampling import Sampler, class_labels, is_latent, plan_sizes, sample_to_files
from fitv2_jax.utils.errors import UserError

FLAGS = flags.FLAGS
define_distributed_flags(__name__)
config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/fitv2_xl.py",
                                lock_config=False)  # fmt: skip
cli.define_model_flags(__name__)
cli.define_sampling_flags(__name__, sizes="256x256", num_samples=16, batch_size=16)
flags.DEFINE_list("labels", None, "class labels, repeated to --num_samples (default: random)")
flags.DEFINE_string("out", "samples", "output directory or URL (gs://...)")
flags.DEFINE_bool("png", True, "a PNG per sample (--nopng: only the grid and the .npz)")
flags.DEFINE_integer("grid_images", 64, "at most this many images in grid.png")
for old, new in (("num_images", "num_samples"), ("height", "sizes"), ("width", "sizes"),
                 ("output", "out")):  # fmt: skip
    cli.define_renamed(old, new)
cli.define_renamed("no_png", "nopng", boolean=True)


def main(argv):
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}; flags look like --sizes 256x256")
    start_distributed()
    config = cli.resolve_config(FLAGS.config)
    params, vae = cli.load_model(config)
    plans = plan_sizes(config, FLAGS.sizes, FLAGS.rule, FLAGS.cfg_scale, vae)
    options = cli.solver_options(config)
    if FLAGS.num_samples < 1:
        raise UserError(f"--num_samples {FLAGS.num_samples}: give at least 1")
    try:
        given = [int(v) for v in FLAGS.labels or []]
    except ValueError as e:
        raise UserError(f"--labels {FLAGS.labels}: give integers, e.g. --labels 1,207,360") from e
    labels = class_labels(FLAGS.num_samples, int(config.model.num_classes), FLAGS.seed, given)
    sampler = Sampler(config.model, params, cli.mesh_for(config), vae=vae,
                      latent=is_latent(config), batch_size=FLAGS.batch_size)  # fmt: skip
    info = dict(checkpoint=FLAGS.checkpoint, params=FLAGS.params, vae=FLAGS.vae, seed=FLAGS.seed,
                config=config.to_dict())  # fmt: skip
    info = sample_to_files(sampler, plans, labels, jax.random.key(FLAGS.seed), options,
                           FLAGS.out, png=FLAGS.png, grid_images=FLAGS.grid_images,
                           progress=FLAGS.progress, info=info)  # fmt: skip
    done = ", ".join(f"{k} ({v['rule']})" for k, v in info["sizes"].items())
    print(f"{FLAGS.num_samples} images per size at {done}; results in {FLAGS.out}")


if __name__ == "__main__":
    run(main)
