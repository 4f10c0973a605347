"""A FiT model ready to sample, from any config and checkpoint form, in one call.

    gen = Generator.load("configs/fitv2_xl.py", "FiTv2_XL.safetensors", vae="/weights/sd-vae-ft-ema")
    images = gen.generate(["256x256", "320x320"], labels=[207, 360, 387, 974])
    images["320x320"].shape        # (4, 320, 320, 3) uint8

The config may be one of configs/*.py, an official YAML (configs/fitv2/config_fitv2_xl.yaml), a
ConfigDict, or None when the checkpoint is one of our runs (its saved config); the checkpoint any
form `weights.fit.load_fit_params` reads, or "random" for random weights. `generate` uses the
official sampler of the model (dopri5 for FiTv2, the DDPM for FiT v1) unless `options` say
otherwise.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from fitv2_jax.config.files import resolve_config
from fitv2_jax.parallel.mesh import inference_mesh
from fitv2_jax.sampling.generate import SolverOptions
from fitv2_jax.sampling.sampler import Sampler, class_labels
from fitv2_jax.sampling.sizes import is_latent, plan_sizes
from fitv2_jax.utils.errors import UserError
from fitv2_jax.weights.fit import load_fit_params, random_params
from fitv2_jax.weights.vae import load_vae


def default_options(config, **changes) -> SolverOptions:
    """The official sampler of the config's model: dopri5 (flow) or DDPM over 250 steps (v1)."""
    diffusion = config.get("diffusion", {})
    ddpm = diffusion.get("kind", "rectified_flow") == "ddpm"
    base = dict(method="ddpm" if ddpm else "dopri5",
                num_steps=int(diffusion.get("sampling_steps", 250)),
                ddpm_train_steps=int(diffusion.get("num_train_steps", 1000)))  # fmt: skip
    return SolverOptions(**{**base, **changes})


@dataclasses.dataclass
class Generator:
    config: object
    sampler: Sampler

    @classmethod
    def load(cls, config=None, checkpoint: str = "random", *, vae=None, use_ema: bool = True,
             batch_size: int = 16, mesh: str = "data", seed: int = 0) -> Generator:  # fmt: skip
        """See the module docstring; vae: a path or a loaded VAE (latent configs)."""
        config = resolve_config(config, checkpoint)
        if checkpoint == "random":
            params = random_params(config.model, seed)
        else:
            params = load_fit_params(checkpoint, config.model, use_ema=use_ema)
        if is_latent(config):
            vae = vae or config.get("vae_path") or None
            if vae is None:
                raise UserError("a latent-space config needs vae= (the SD VAE's path)")
            vae = load_vae(vae) if isinstance(vae, str) else vae
        else:
            vae = None
        sampler = Sampler(config.model, params, inference_mesh(config, mesh), vae=vae,
                          latent=is_latent(config), batch_size=batch_size)  # fmt: skip
        return cls(config, sampler)

    def generate(self, sizes, labels=None, num: int | None = None, *, seed: int = 0,
                 rule: str = "auto", cfg_scale: float | str = 1.5,
                 options: SolverOptions | None = None) -> dict[str, np.ndarray]:  # fmt: skip
        """{"HxW": uint8 (num, H, W, 3)} for each size; labels repeat to num (default: random),
        sample i's noise comes from (seed, i)."""
        num = num or (len(labels) if labels is not None else self.sampler.batch_size)
        labels = class_labels(num, int(self.config.model.num_classes), seed, labels)
        options = options or default_options(self.config)
        key, out = jax.random.key(seed), {}
        for plan in plan_sizes(self.config, sizes, rule, cfg_scale, self.sampler.vae):
            batches = []
            for start in range(0, num, self.sampler.batch_size):
                ids = np.arange(start, min(start + self.sampler.batch_size, num))
                batches.append(self.sampler.plan_images(plan, ids, labels[ids], key, options)[0])
            out[plan.name] = np.concatenate(batches)
        return out
