"""Sampling at any height x width: extrapolation rules, sizes, generation, the sharded sampler.

    from fitv2_jax import sampling
    images = sampling.Generator.load("configs/fitv2_xl.py", "FiTv2_XL.safetensors",
                                     vae="/weights/sd-vae-ft-ema").generate(["256x256", "320x320"])
    plans = sampling.plan_sizes(config, "256x256,320x320", rule="auto", cfg_scale=1.5, vae=vae)
    sampler = sampling.Sampler(config.model, params, mesh, vae=vae, batch_size=16)
    images, nfe = sampler.plan_images(plans[0], ids, labels, key, sampling.SolverOptions())

One idea per module: `rules` (RoPE extrapolation by name), `sizes` (parsing and planning sizes),
`generate` (the jitted solver x CFG loop), `sampler` (batches on a mesh), `images` (tokens to
uint8 images and grids), `files` (PNGs, grids and ADM .npz per size), `generator` (a model
loaded from any config and checkpoint form, in one call).
"""

from fitv2_jax.sampling.files import sample_to_files
from fitv2_jax.sampling.generate import SolverOptions, generate, grid_inputs, initial_noise
from fitv2_jax.sampling.generator import Generator, default_options
from fitv2_jax.sampling.images import display_scale, image_grid, to_uint8, tokens_to_images
from fitv2_jax.sampling.rules import (
    EXTRAPOLATION_RULES,
    in_distribution,
    model_for_size,
    resolve_rule,
    rule_of_config,
)
from fitv2_jax.sampling.sampler import Sampler, batch_devices, class_labels, param_shardings
from fitv2_jax.sampling.sizes import (
    SizePlan,
    is_latent,
    nearest_valid,
    parse_per_size,
    parse_size,
    parse_sizes,
    patches_for,
    plan_sizes,
    size_multiple,
    size_name,
)

__all__ = [
    "EXTRAPOLATION_RULES", "Generator", "Sampler", "SizePlan", "SolverOptions", "batch_devices",
    "class_labels", "default_options", "display_scale", "generate", "grid_inputs", "image_grid",
    "in_distribution", "initial_noise",
    "is_latent", "model_for_size", "nearest_valid", "param_shardings", "parse_per_size",
    "parse_size", "parse_sizes", "patches_for", "plan_sizes", "resolve_rule", "rule_of_config",
    "sample_to_files", "size_multiple", "size_name", "to_uint8", "tokens_to_images",
]  # fmt: skip
