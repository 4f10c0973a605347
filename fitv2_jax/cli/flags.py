"""Flag groups shared by the commands, so one idea has one name everywhere.

    config      a config file (config_flags: --config.a.b=value overrides, typed by the field)
    checkpoint  official .safetensors/.bin file or folder, a training workdir, or one step of it
    vae         the SD VAE (diffusers folder or file) of latent configs
    sizes       HEIGHTxWIDTH list in pixels        rule       RoPE extrapolation rule(s)
    cfg_scale   CFG scale(s)                       solver     euler | heun | dopri5 | sde
    num_samples images per size                    batch_size images per step over all devices
    out         where results go                   inception  FID Inception weights file

A group is defined by the command that uses it (`define_*(__name__)`), so each command's --help
lists its own flags. Old spellings are defined as flags that fail with the new name.
"""

from __future__ import annotations

import sys

import jax
import ml_collections
from absl import flags

from fitv2_jax.config import files
from fitv2_jax.parallel.mesh import inference_mesh
from fitv2_jax.sampling.generate import SolverOptions
from fitv2_jax.sampling.rules import EXTRAPOLATION_RULES
from fitv2_jax.sampling.sizes import is_latent
from fitv2_jax.utils.errors import UserError
from fitv2_jax.weights.fit import load_fit_params, random_params
from fitv2_jax.weights.vae import load_vae

FLAGS = flags.FLAGS
SOLVERS = ("auto", "dopri5", "euler", "heun", "sde", "ddpm")


def _module(name: str) -> str:
    """absl attributes a flag to a module; the command run as __main__ is sys.argv[0]."""
    return sys.argv[0] if name == "__main__" else name


def define_renamed(old: str, new: str, boolean: bool = False) -> None:
    """`--old` fails at parse time with a message naming `--new` (kept out of --help)."""
    define = flags.DEFINE_bool if boolean else flags.DEFINE_string
    define(old, None, f"renamed: use --{new}", module_name=__name__)
    flags.register_validator(old, lambda v: v is None,
                             message=f"--{old} was renamed: use --{new}")  # fmt: skip


def define_model_flags(module: str) -> None:
    """--checkpoint | --random_init, --params, --vae (the command defines --config)."""
    m = _module(module)
    flags.DEFINE_string("official_config", None, "an official YAML (configs/fitv2/"
                        "config_fitv2_xl.yaml) instead of --config", module_name=m)  # fmt: skip
    flags.DEFINE_string("checkpoint", None, "official .safetensors/.bin file or Hugging Face "
                        "folder, a training workdir (latest step) or WORKDIR/checkpoints/STEP",
                        module_name=m)  # fmt: skip
    flags.DEFINE_bool("random_init", False, "random weights, every layer non-zero (smoke tests; "
                      "no file needed)", module_name=m)  # fmt: skip
    flags.DEFINE_enum("params", "ema", ["ema", "raw"], "which params of our training "
                      "checkpoints: the EMA or the raw training params", module_name=m)  # fmt: skip
    flags.DEFINE_string("vae", None, "SD VAE for latent configs: diffusers folder or file "
                        "(default: config.vae_path)", module_name=m)  # fmt: skip
    define_renamed("raw_params", "params=raw", boolean=True)


def define_sampling_flags(module: str, *, sizes: str, num_samples: int, batch_size: int) -> None:
    """Sizes, RoPE rule, CFG, solver, seed, batch and mesh (shared by sample and evaluate)."""
    m = _module(module)
    rules = ", ".join(EXTRAPOLATION_RULES)
    flags.DEFINE_string("sizes", sizes, "comma list of HEIGHTxWIDTH in pixels", module_name=m)
    flags.DEFINE_string("rule", "auto", "RoPE extrapolation rule, for all sizes or per size "
                        "('256x256=none,320x320=vision-ntk'): auto (the paper's text: plain "
                        "RoPE within the training context, VisionNTK + attention scale beyond), "
                        "official (the official README's commands: VisionNTK also at "
                        f"in-distribution grids off the training one), {rules}",
                        module_name=m)  # fmt: skip
    flags.DEFINE_string("cfg_scale", "1.5", "classifier-free guidance scale (1 = off), for all "
                        "sizes or per size ('256x256=1.5,512x512=1.65'); official: the README's "
                        "scale for this model (1.65 for FiTv2-XL/2 HR, else 1.5)",
                        module_name=m)  # fmt: skip
    flags.DEFINE_float("scale_pow", 0.0, "power-cosine CFG schedule (0 = constant)", module_name=m)
    flags.DEFINE_enum("cfg_channels", "official", ["official", "all"], "official: guide the "
                      "first 3 of 4 latent channels (as the official code); all", module_name=m)  # fmt: skip
    flags.DEFINE_list("cfg_interval", None, "guide only for t in [A,B], e.g. 0,0.7 (default all t)",
                      module_name=m)  # fmt: skip
    flags.DEFINE_enum("cfg_state", "official", ["official", "single"], "official: the solver "
                      "state holds [cond; uncond] as the official sampler (changes dopri5's step "
                      "sizes only); single: only the guided samples", module_name=m)  # fmt: skip
    flags.DEFINE_enum("solver", "auto", list(SOLVERS), "auto: the official sampler of the model "
                      "(dopri5 for FiTv2's rectified flow, ddpm for FiT v1); euler, heun, dopri5, "
                      "sde (flow models) or ddpm (FiT v1)", module_name=m)  # fmt: skip
    flags.DEFINE_integer("num_steps", 250, "steps of euler/heun (the official "
                         "--num-sampling-steps K is K-1 here), grid points of sde, respaced DDPM "
                         "steps (the official K is K here); dopri5 is adaptive", module_name=m)  # fmt: skip
    flags.DEFINE_float("atol", 1e-6, "dopri5 absolute tolerance", module_name=m)
    flags.DEFINE_float("rtol", 1e-3, "dopri5 relative tolerance", module_name=m)
    flags.DEFINE_integer("seed", 0, "noise and random labels", module_name=m)
    flags.DEFINE_integer("num_samples", num_samples, "images per size", module_name=m)
    flags.DEFINE_integer("batch_size", batch_size, "images per step over all devices (rounded up "
                         "to a multiple of the device count)", module_name=m)  # fmt: skip
    flags.DEFINE_enum("mesh", "data", ["data", "config"], "data: every device holds the params "
                      "and takes a slice of the batch; config: the config's training mesh, "
                      "params FSDP-sharded (models too big for one device)", module_name=m)  # fmt: skip
    flags.DEFINE_bool("progress", True, "progress bars (--noprogress: none)", module_name=m)
    define_renamed("no_progress", "noprogress", boolean=True)


def solver_options(config) -> SolverOptions:
    """--solver and friends for this config's diffusion (auto: its official sampler)."""
    ddpm = config.get("diffusion", {}).get("kind", "rectified_flow") == "ddpm"
    method = FLAGS.solver if FLAGS.solver != "auto" else "ddpm" if ddpm else "dopri5"
    if (method == "ddpm") != ddpm:
        kind = "a DDPM (FiT v1): use --solver ddpm" if ddpm else "a rectified flow: not ddpm"
        raise UserError(f"--solver {method}: this config's model is {kind}")
    interval = None
    if FLAGS.cfg_interval:
        try:
            interval = tuple(float(t) for t in FLAGS.cfg_interval)
        except ValueError as e:
            raise UserError(f"--cfg_interval {FLAGS.cfg_interval}: give two times A,B") from e
        if len(interval) != 2:
            raise UserError(f"--cfg_interval {','.join(FLAGS.cfg_interval)}: give two times A,B")
    return SolverOptions(
        method=method, num_steps=FLAGS.num_steps, atol=FLAGS.atol, rtol=FLAGS.rtol,
        ddpm_train_steps=int(config.get("diffusion", {}).get("num_train_steps", 1000)),
        cfg_channels=FLAGS.cfg_channels, scale_pow=FLAGS.scale_pow, cfg_interval=interval,
        cfg_state=FLAGS.cfg_state,
    )  # fmt: skip


def resolve_config(config: ml_collections.ConfigDict | None) -> ml_collections.ConfigDict:
    """--config, --official_config, or the config saved with a --checkpoint of our runs."""
    official = FLAGS["official_config"].value if "official_config" in FLAGS else None
    if config is not None and official:
        raise UserError("give --config or --official_config, not both")
    checkpoint = FLAGS.checkpoint if "checkpoint" in FLAGS else None
    return files.resolve_config(config if config is not None else official, checkpoint)


def load_model(config) -> tuple[dict, object]:
    """(params, vae or None) from --checkpoint / --random_init, --params and --vae."""
    if FLAGS.random_init == bool(FLAGS.checkpoint):
        raise UserError("give exactly one of --checkpoint PATH and --random_init")
    if FLAGS.random_init:
        params = random_params(config.model, FLAGS.seed if "seed" in FLAGS else 0)
    else:
        params = load_fit_params(FLAGS.checkpoint, config.model, use_ema=FLAGS.params == "ema")
    vae = None
    if is_latent(config):
        path = FLAGS.vae or config.get("vae_path", "")
        if not path:
            raise UserError(f"this is a latent-space config (model.in_channels="
                            f"{config.model.in_channels}): pass --vae /path/to/sd-vae-ft-ema (a "
                            "diffusers folder or file) or set --config.vae_path")  # fmt: skip
        vae = load_vae(path)
    return params, vae


def mesh_for(config, local: bool = False):
    """--mesh over all devices, or over this host's only (local: every host works alone)."""
    return inference_mesh(config, FLAGS.mesh, jax.local_devices() if local else None)
