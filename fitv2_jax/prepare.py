r"""Prepare a dataset once: preprocess (FiT resize rule + Algorithm-1 crop, both flips), encode
(pixels or SD-VAE latents) and write ArrayRecord shards that the training pipeline reads.

  # the offline demo set, pixel space, 64 tokens of 2x2 patches (16x16-pixel images):
  python -m fitv2_jax.prepare --source demo --out /tmp/demo_px --max_tokens 64 --patch_size 2
  # ImageNet train as SD-VAE latents for 256-token pre-training:
  python -m fitv2_jax.prepare --source imagenet --root /data/imagenet --split train \
      --out /data/in1k_latents_256 --vae /weights/sd-vae-ft-ema --max_tokens 256 --patch_size 2
  # the official pre-extracted latents (no re-encoding):
  python -m fitv2_jax.prepare --source official_latents --root datasets/imagenet1k_latents_256_sd_vae_ft_ema \
      --out /data/in1k_official_latents_256 --max_tokens 256 --patch_size 2

On several hosts run the same command on every host: shard i is written by the host with
`i % process_count == process_index` (jax.process_index()/process_count() unless given).
Rerunning skips finished shards and redoes half-written ones. Bad images are skipped and
counted; the final summary says how many images were read, written and skipped, and why.
"""

from absl import flags

from fitv2_jax.cli import flags as cli
from fitv2_jax.cli.app import run
from fitv2_jax.cli.distributed import define_distributed_flags, start_distributed
from fitv2_jax.data.encoders import PixelEncoder, VaeEncoder
from fitv2_jax.data.preprocess import MIN_TOKENS, RESIZE_RULES
from fitv2_jax.data.shard_writer import PrepareSettings, prepare_split
from fitv2_jax.data.sources import open_source
from fitv2_jax.utils.errors import UserError
from fitv2_jax.weights.vae import load_vae

FLAGS = flags.FLAGS
define_distributed_flags(__name__)
flags.DEFINE_enum("source", None, ["imagenet", "folder", "tfds", "demo", "official_latents"],
                  "imagenet: ROOT/train/<wnid>/*.JPEG (+ ROOT/val); folder: any "
                  "ROOT/<class>/<image> tree; tfds: a prepared tensorflow-datasets dataset; demo: "
                  "crops of scikit-image's bundled photos (offline); official_latents: the "
                  "official pre-extracted ImageNet latents (ROOT/from_16_to_256/, "
                  "ROOT/greater_than_256_resize/, ROOT/greater_than_256_crop/), converted as "
                  "they are")  # fmt: skip
flags.DEFINE_string("root", None, "dataset folder (imagenet, folder)")
flags.DEFINE_string("split", "train", "train | val (imagenet, tfds) | heldout (demo); names the "
                    "shard files")  # fmt: skip
flags.DEFINE_string("out", None, "output directory of the prepared dataset")
flags.DEFINE_string("vae", None, "SD-VAE weights (diffusers folder or .safetensors/.ckpt): write "
                    "latents; omit for a pixel-space dataset")  # fmt: skip
flags.DEFINE_enum("dtype", "float32", ["float32", "float16"], "stored latent dtype (pixels are "
                  "always uint8)")  # fmt: skip
flags.DEFINE_integer("max_tokens", 256, "token budget per image: 256 for pre-training, 1024 for "
                     "high-res")  # fmt: skip
flags.DEFINE_integer("patch_size", 2, "model patch size p")
flags.DEFINE_integer("min_tokens", MIN_TOKENS, "smaller images are skipped (reason too_small)")
flags.DEFINE_enum("resize_rule", "official", list(RESIZE_RULES), "official: the official code's "
                  "resize (exact area, sides floored to multiples of patch x VAE); max_tokens: "
                  "as many tokens as fit without a larger aspect error than official")  # fmt: skip
flags.DEFINE_integer("records_per_shard", 1024, "records per ArrayRecord shard")
flags.DEFINE_integer("num_shards", None, "overrides --records_per_shard")
flags.DEFINE_integer("workers", 4, "threads decoding and resizing images")
flags.DEFINE_integer("encode_batch", 32, "images gathered before encoding; same-size arrays share "
                     "one VAE call")  # fmt: skip
flags.DEFINE_integer("limit", None, "only the first N images (smoke tests)")
flags.DEFINE_string("val_labels", None, "labels file for a flat ImageNet val/ folder")
flags.DEFINE_string("tfds_name", "imagenet2012", "tensorflow-datasets dataset name")
flags.DEFINE_string("tfds_data_dir", None, "tfds data_dir (default $TFDS_DATA_DIR)")
flags.DEFINE_integer("demo_crops", 36, "crops per photo (demo)")
flags.DEFINE_integer("process_index", None, "default jax.process_index()")
flags.DEFINE_integer("process_count", None, "default jax.process_count()")
flags.DEFINE_bool("progress", True, "a progress bar (--noprogress: none)")
flags.DEFINE_bool("log_skipped", False, "print every skipped image")
flags.mark_flags_as_required(["source", "out"])
for old in ("max_tokens", "patch_size", "min_tokens", "records_per_shard", "encode_batch",
            "num_shards", "val_labels", "tfds_name", "tfds_data_dir", "demo_crops",
            "process_index", "process_count"):  # fmt: skip
    cli.define_renamed(old.replace("_", "-"), old)
cli.define_renamed("no-progress", "noprogress", boolean=True)
cli.define_renamed("verbose", "log_skipped", boolean=True)


def main(argv):
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}; flags look like --out DIR")
    start_distributed()
    settings = PrepareSettings(
        out=FLAGS.out, split=FLAGS.split, max_tokens=FLAGS.max_tokens,
        patch_size=FLAGS.patch_size, min_tokens=FLAGS.min_tokens, resize_rule=FLAGS.resize_rule,
        records_per_shard=FLAGS.records_per_shard, num_shards=FLAGS.num_shards,
        limit=FLAGS.limit, workers=FLAGS.workers, encode_batch=FLAGS.encode_batch,
        process_index=FLAGS.process_index, process_count=FLAGS.process_count,
        log_skipped=FLAGS.log_skipped, progress=FLAGS.progress, source_kind=FLAGS.source,
        source_root=FLAGS.root,
    )  # fmt: skip
    if FLAGS.source == "official_latents" and FLAGS.vae:
        raise UserError("--source official_latents is already encoded: drop --vae")
    source = open_source(FLAGS.source, FLAGS.root, FLAGS.split, val_labels=FLAGS.val_labels,
                         tfds_name=FLAGS.tfds_name, tfds_data_dir=FLAGS.tfds_data_dir,
                         demo_crops=FLAGS.demo_crops, max_tokens=FLAGS.max_tokens)  # fmt: skip
    encoder = None if FLAGS.source == "official_latents" else PixelEncoder()
    if FLAGS.vae:
        encoder = VaeEncoder(load_vae(FLAGS.vae), FLAGS.vae, FLAGS.dtype)
    prepare_split(source, encoder, settings)


if __name__ == "__main__":
    run(main)
