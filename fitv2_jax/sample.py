r"""Generate images with a FiT/FiTv2 model at any sizes: PNGs, a grid and an ADM .npz per size.

  # a smoke run with random weights (no files needed; the tiny model in pixel space):
  python -m fitv2_jax.sample --config configs/tiny.py --random_init --config.latent=False \
      --config.model.in_channels=3 --config.model.patch_size=16 \
      --sizes 256x256,160x320,320x320 --num_images 8 --solver euler --num_steps 8
  # the official FiTv2-XL/2 checkpoint with the SD VAE, in and out of distribution:
  python -m fitv2_jax.sample --config configs/fitv2_xl.py --checkpoint FiTv2_XL.safetensors \
      --vae /weights/sd-vae-ft-ema --sizes 256x256,160x320,320x320,224x448 --cfg_scale 1.5 \
      --labels 207,360,387,974 --num_images 16 --out samples/xl

Sizes are HEIGHTxWIDTH in pixels and must be multiples of patch size x VAE downsampling (16 for
the SD-VAE latent configs; the patch size for pixel-space configs, config.latent=False). The RoPE
extrapolation rule is chosen per size: `--rule auto` (default) uses plain RoPE for grids within
the training context (256 tokens: 256x256, 160x320, 128x384) and VisionNTK + attention scale
beyond it (320x320, 224x448, 160x480), as the paper does; a high-resolution model keeps the rule
it was trained with. Any config field can be overridden with --config.a.b=value.

Output, per size: OUT/HxW/000000.png ..., OUT/HxW/grid.png and OUT/HxW/samples_HxW.npz (arr_0:
uint8 N x H x W x 3, the input of `python -m fitv2_jax.evaluate_npz` and ADM's evaluator; arr_1:
the class labels), plus OUT/sample_info.json with every setting and the solver's evaluations.
Sample i uses noise drawn from (seed, i): the same seed gives the same images for any batch size
or device count (for the fixed-step solvers; dopri5's step size and the SDE noise depend on the
batch). Batches are split over all devices (--mesh data: params replicated; --mesh config: the
config's mesh with FSDP-sharded params, for models too big for one device).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zipfile

import numpy as np

DEFAULT_SIZES = "256x256"


class NpzStreamWriter:
    """Writes an .npz whose `arr_0` (N, H, W, 3) uint8 arrives batch by batch (never all in RAM).

    The zip member is a normal .npy (header, then C-order rows), so np.load reads it as usual.
    """

    def __init__(self, path: str, shape: tuple[int, ...]):
        self.path, self.shape, self.rows = path, tuple(shape), 0
        self._tmp = path + ".partial"
        self._zip = zipfile.ZipFile(self._tmp, "w", zipfile.ZIP_STORED, allowZip64=True)
        self._f = self._zip.open("arr_0.npy", "w", force_zip64=True)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8))}
        header.update(fortran_order=False, shape=self.shape)
        np.lib.format.write_array_header_2_0(self._f, header)

    def write(self, images: np.ndarray) -> None:
        images = np.ascontiguousarray(images, np.uint8)
        if images.shape[1:] != self.shape[1:] or self.rows + len(images) > self.shape[0]:
            raise ValueError(f"batch {images.shape} does not fit {self.shape} at row {self.rows}")
        self._f.write(images.tobytes())
        self.rows += len(images)

    def close(self, **extra: np.ndarray) -> str:
        self._f.close()
        if self.rows != self.shape[0]:
            self._zip.close()
            raise ValueError(f"{self.path}: wrote {self.rows} of {self.shape[0]} rows")
        for name, arr in extra.items():
            with self._zip.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(arr), allow_pickle=False)
        self._zip.close()
        os.replace(self._tmp, self.path)  # complete files only
        return self.path


def split_config_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separates `--config.a.b=value` (or `--config.a.b value`) from the other arguments."""
    rest, overrides, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--config."):
            key = a[len("--config.") :]
            if "=" not in key:
                if i + 1 >= len(argv):
                    raise SystemExit(f"{a}: give a value, e.g. {a}=VALUE")
                key, i = f"{key}={argv[i + 1]}", i + 1
            overrides.append(key)
        else:
            rest.append(a)
        i += 1
    return rest, overrides


def load_run_config(path: str, overrides: list[str]):
    from fitv2_jax.config_file import load_config

    try:
        return load_config(path, overrides)
    except (FileNotFoundError, KeyError) as e:
        raise SystemExit(f"error: --config {path}: {e.args[0] if e.args else e}") from e


def random_params(model_cfg, seed: int = 0) -> dict:
    """Random weights drawn with numpy (no compile): kernels N(0, 1/fan_in), every other
    tensor N(0, 0.02^2) (norm scales 1 + that). Unlike the training init nothing is zero, so
    samples of a random model are not just their starting noise."""
    import math

    import jax

    from fitv2_jax.models.convert import abstract_params

    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        names = [str(getattr(k, "key", k)) for k in path]
        noise = rng.standard_normal(leaf.shape, dtype=np.float32)
        if names[-1] == "kernel":
            shape = leaf.shape[1:] if names[0] == "blocks" else leaf.shape  # scanned layer axis
            # the attention output kernel is (heads, head_dim, D); the others (D_in, ...)
            fan_in = math.prod(shape[:-1]) if names[-2] == "proj" else shape[0]
            return noise / math.sqrt(fan_in)
        return (1.0 if names[-1] == "scale" else 0.0) + 0.02 * noise

    return jax.tree_util.tree_map_with_path(draw, abstract_params(model_cfg))


def load_params(config, checkpoint: str | None, random_init: bool, use_ema: bool, seed: int):
    """Params from --checkpoint (any format `load_inference_params` reads) or a random init."""
    if random_init:
        return random_params(config.model, seed)
    from fitv2_jax.training.checkpoint import load_inference_params

    return load_inference_params(checkpoint, config.model, use_ema=use_ema)


def load_vae_for(config, vae_path: str | None):
    """The VAE of a latent config (None for pixel space); errors name --vae and the fix."""
    from fitv2_jax.sampling import is_latent

    if not is_latent(config):
        return None
    path = vae_path or config.get("vae_path", "")
    if not path:
        raise SystemExit(
            "error: this is a latent-space config (model.in_channels="
            f"{config.model.in_channels}): pass --vae /path/to/sd-vae-ft-ema (a diffusers folder "
            "or file) or set config.vae_path."
        )
    if not os.path.exists(path):
        raise SystemExit(f"error: --vae {path}: no such file or directory.")
    from fitv2_jax.models.vae import load_vae

    return load_vae(path)


def make_labels(text: str | None, num: int, num_classes: int, seed: int) -> np.ndarray:
    """--labels '1,2,3' repeated to `num`, or uniform random labels from the seed."""
    if not text:
        return np.random.default_rng(seed).integers(0, num_classes, num)
    try:
        labels = np.array([int(t) for t in text.split(",") if t.strip()], np.int64)
    except ValueError as e:
        raise SystemExit(f"error: --labels {text!r}: give integers, e.g. --labels 1,207,360") from e
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if len(labels) == 0 or len(bad):
        raise SystemExit(
            f"error: --labels {text!r}: labels must be in [0, {num_classes - 1}] "
            f"(config.model.num_classes={num_classes})."
        )
    return np.resize(labels, num)


def make_mesh(config, kind: str = "data"):
    """'data': all devices on the data axis (params replicated); 'config': config.mesh."""
    from fitv2_jax.parallel.mesh import create_mesh

    if kind == "data":
        return create_mesh((-1, 1, 1))
    return create_mesh(config.mesh.ici, config.mesh.dcn)


def add_model_args(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The "model" flags shared by sample and evaluate: --config, --checkpoint | --random_init,
    --raw_params, --vae. Returns the group so callers can add to it."""
    g = p.add_argument_group("model")
    g.add_argument("--config", required=True, help="config file, e.g. configs/fitv2_xl.py")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--checkpoint",
        help="official .safetensors/.bin, our exported .safetensors, a training workdir "
        "(latest step) or WORKDIR/checkpoints/STEP",
    )
    src.add_argument(
        "--random_init",
        action="store_true",
        help="random weights, every layer non-zero (smoke tests; no file needed)",
    )
    g.add_argument(
        "--raw_params",
        action="store_true",
        help="use the raw training params of our checkpoints instead of the EMA params",
    )
    g.add_argument(
        "--vae",
        help="SD VAE for latent configs: diffusers folder or file (default config.vae_path)",
    )
    return g


def build_parser() -> argparse.ArgumentParser:
    from fitv2_jax.sampling import EXTRAPOLATION_RULES

    p = argparse.ArgumentParser(
        prog="python -m fitv2_jax.sample",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    g = p.add_argument_group("sizes and RoPE")
    g.add_argument(
        "--sizes",
        help=f"comma list of HEIGHTxWIDTH in pixels, all made in one run (default {DEFAULT_SIZES})",
    )
    g.add_argument("--height", type=int, help="one size: height in pixels (with --width)")
    g.add_argument("--width", type=int, help="one size: width in pixels (with --height)")
    g.add_argument(
        "--rule",
        default="auto",
        help="RoPE extrapolation rule, one for all sizes or per size "
        "('256x256=none,320x320=vision-ntk'): auto (paper's choice), "
        + ", ".join(EXTRAPOLATION_RULES),
    )
    g = p.add_argument_group("guidance")
    g.add_argument(
        "--cfg_scale",
        default="1.5",
        help="classifier-free guidance scale (1 = off), one value or per size "
        "('256x256=1.5,512x512=1.65')",
    )
    g.add_argument(
        "--scale_pow", type=float, default=0.0, help="power-cosine CFG schedule (0 = constant)"
    )
    g.add_argument(
        "--cfg_channels",
        choices=("official", "all"),
        default="official",
        help="official: guide the first 3 of 4 latent channels (as the official code); all",
    )
    g.add_argument("--cfg_interval", help="guide only for t in [A,B], e.g. 0.0,0.7 (default all t)")
    g.add_argument(
        "--cfg_state",
        choices=("official", "single"),
        default="official",
        help="official: the solver state holds [cond; uncond] as the official sampler (changes "
        "dopri5's step sizes only); single: only the guided samples",
    )
    g = p.add_argument_group("solver")
    g.add_argument("--solver", choices=("dopri5", "euler", "heun", "sde"), default="dopri5")
    g.add_argument(
        "--num_steps",
        type=int,
        default=250,
        help="steps of euler/heun (the official --num-sampling-steps K is K-1 here) or grid "
        "points of sde; dopri5 is adaptive",
    )
    g.add_argument("--atol", type=float, default=1e-6, help="dopri5 absolute tolerance")
    g.add_argument("--rtol", type=float, default=1e-3, help="dopri5 relative tolerance")
    g = p.add_argument_group("what to make")
    g.add_argument("--num_images", type=int, default=16, help="images per size")
    g.add_argument(
        "--labels", help="class labels, comma list repeated to --num_images (default: random)"
    )
    g.add_argument("--seed", type=int, default=0, help="noise and random labels")
    g.add_argument(
        "--batch_size",
        type=int,
        default=16,
        help="images per step over all devices (rounded up to a multiple of the device count)",
    )
    g.add_argument(
        "--mesh",
        choices=("data", "config"),
        default="data",
        help="data: every device holds the params and takes a slice of the batch (fastest to "
        "compile); config: the config's training mesh, params FSDP-sharded (models too big "
        "for one device)",
    )
    g.add_argument("--out", default="samples", help="output directory")
    g.add_argument("--no_png", action="store_true", help="only the grid and the .npz")
    g.add_argument("--grid_images", type=int, default=64, help="at most this many in grid.png")
    g.add_argument("--no_progress", dest="progress", action="store_false")
    return p


def parse_args(argv: list[str]):
    """Parsed args plus config overrides; flag errors exit with a message naming the flag."""
    rest, overrides = split_config_overrides(argv)
    args = build_parser().parse_args(rest)
    args.config_overrides = overrides
    return args


def requested_sizes(args) -> list[tuple[int, int]]:
    from fitv2_jax.sampling import parse_sizes

    if (args.height is None) != (args.width is None):
        raise SystemExit("error: give both --height and --width (or --sizes HxW,...).")
    text = args.sizes or ""
    if args.height is not None:
        text = f"{text},{args.height}x{args.width}" if text else f"{args.height}x{args.width}"
    try:
        return parse_sizes(text or DEFAULT_SIZES)
    except ValueError as e:
        raise SystemExit(f"error: --sizes: {e}") from e


def sample(args, vae=None) -> dict:
    """Runs the sampling CLI for parsed `args`; returns the sample_info dict. `vae` replaces
    --vae (library callers that already hold one)."""
    import jax
    from PIL import Image
    from tqdm.auto import tqdm

    from fitv2_jax import sampling

    config = load_run_config(args.config, args.config_overrides)
    sizes = requested_sizes(args)
    latent = sampling.is_latent(config)
    if latent and vae is None:
        vae = load_vae_for(config, args.vae)
    multiple = sampling.size_multiple(config, vae)
    try:
        patches = {s: sampling.patches_for(*s, multiple) for s in sizes}
    except ValueError as e:
        raise SystemExit(f"error: {e}") from e
    try:
        rules = sampling.parse_per_size(args.rule, sizes, str, "--rule")
        rules = {s: sampling.resolve_rule(r, config.model, *patches[s]) for s, r in rules.items()}
        cfgs = sampling.parse_per_size(args.cfg_scale, sizes, float, "--cfg_scale")
        interval = None
        if args.cfg_interval:
            interval = tuple(float(t) for t in args.cfg_interval.split(","))
            if len(interval) != 2:
                raise ValueError("--cfg_interval: give two times A,B, e.g. 0,0.7")
    except ValueError as e:
        raise SystemExit(f"error: {e}") from e
    missing = [sampling.size_name(*s) for s, c in cfgs.items() if c is None]
    if missing:
        raise SystemExit(f"error: --cfg_scale gives no value for {', '.join(missing)}.")
    if args.num_images < 1 or args.batch_size < 1:
        raise SystemExit("error: --num_images and --batch_size must be at least 1.")

    try:
        params = load_params(
            config, args.checkpoint, args.random_init, not args.raw_params, args.seed
        )
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise SystemExit(f"error: --checkpoint {args.checkpoint}: {e}") from e
    mesh = make_mesh(config, args.mesh)
    sampler = sampling.Sampler(
        config.model, params, mesh, vae=vae, latent=latent, batch_size=args.batch_size
    )
    labels = make_labels(args.labels, args.num_images, int(config.model.num_classes), args.seed)
    key = jax.random.key(args.seed)
    opts = dict(
        method=args.solver, num_steps=args.num_steps, atol=args.atol, rtol=args.rtol,
        channels=args.cfg_channels, scale_pow=args.scale_pow, interval=interval,
        doubled_state=args.cfg_state == "official",
    )  # fmt: skip
    out_dir = os.path.abspath(args.out)
    info = dict(
        config=os.path.abspath(args.config),
        config_overrides=args.config_overrides,
        checkpoint=None if args.random_init else os.path.abspath(args.checkpoint),
        params="raw" if args.raw_params else "ema",
        vae=None if vae is None else (args.vae or config.get("vae_path") or "given"),
        seed=args.seed,
        solver=args.solver,
        num_steps=None if args.solver == "dopri5" else args.num_steps,
        atol=args.atol,
        rtol=args.rtol,
        cfg_channels=args.cfg_channels,
        scale_pow=args.scale_pow,
        cfg_interval=interval,
        devices=len(mesh.devices.flat),
        batch_size=sampler.batch_size,
        sizes={},
    )
    n, bs = args.num_images, sampler.batch_size
    writes = jax.process_index() == 0  # on several hosts all sample, the first one writes
    bar = tqdm(total=len(sizes) * n, unit="img", disable=not args.progress, desc="sampling")
    for size in sizes:
        (height, width), (h, w) = size, patches[size]
        name = sampling.size_name(height, width)
        size_dir = os.path.join(out_dir, name)
        if writes:
            os.makedirs(size_dir, exist_ok=True)
            npz = NpzStreamWriter(
                os.path.join(size_dir, f"samples_{name}.npz"), (n, height, width, 3)
            )
        grid, nfes, start_time = [], [], time.time()
        bar.set_description(f"sampling {name} ({rules[size]}, cfg {cfgs[size]:g})")
        for start in range(0, n, bs):
            ids = np.arange(start, min(start + bs, n))
            images, nfe = sampler.images(
                h, w, ids, labels[ids], key, rule=rules[size], cfg_scale=cfgs[size], **opts
            )
            nfes.append(nfe)
            bar.update(len(ids))
            if not writes:
                continue
            npz.write(images)
            if not args.no_png:
                for i, img in zip(ids, images, strict=True):
                    Image.fromarray(img).save(os.path.join(size_dir, f"{i:06d}.png"))
            grid.extend(images[: max(0, args.grid_images - len(grid))])
        if writes:
            npz.close(arr_1=labels.astype(np.int64))
            Image.fromarray(sampling.image_grid(np.stack(grid))).save(
                os.path.join(size_dir, "grid.png")
            )
        info["sizes"][name] = dict(
            height=height,
            width=width,
            patches=[h, w],
            tokens=h * w,
            rule=rules[size],
            cfg_scale=cfgs[size],
            nfe_per_batch=nfes,
            seconds=round(time.time() - start_time, 2),
            npz=os.path.join(size_dir, f"samples_{name}.npz"),
            grid=os.path.join(size_dir, "grid.png"),
        )
    bar.close()
    info["labels"] = labels.tolist()
    if writes:
        with open(os.path.join(out_dir, "sample_info.json"), "w") as f:
            json.dump(info, f, indent=2)
    summary = ", ".join(f"{k} ({v['rule']})" for k, v in info["sizes"].items())
    print(f"{n} images per size at {summary}; results in {out_dir}")
    return info


def main(argv: list[str] | None = None) -> dict:
    return sample(parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
