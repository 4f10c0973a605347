"""Sampling library: any height x width, CFG, every solver, the paper's extrapolation rules.

    model = model_for_size(config.model, h, w, rule="vision-ntk+attn-scale")
    tokens, nfe = generate(model, params, key, labels, h, w, cfg_scale=1.5, method="dopri5")
    images = tokens_to_images(tokens, h, w, model.patch_size)      # (B, h*p, w*p, C)

h, w are in patches. Extrapolation rules by name (paper §3 / FITV2_FACTS.md §3) map onto the
model's RoPE fields with the test grid as max_pe_len_h/w and the training grid side as
ori_max_pe_len (sqrt(context_size): 16 for 256-token models):
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from fitv2_jax.data.tokens import make_grid, unpatchify
from fitv2_jax.flow.guidance import make_velocity_fn
from fitv2_jax.flow.solvers import sample as solve
from fitv2_jax.models.fit import FiT

EXTRAPOLATION_RULES: dict[str, dict] = {
    "none": dict(custom_freqs="normal"),
    "pi": dict(custom_freqs="linear", decouple=False),
    "ntk": dict(custom_freqs="ntk-aware", decouple=False),
    "ntk-by-parts": dict(custom_freqs="ntk-by-parts", decouple=False),
    "yarn": dict(custom_freqs="yarn", decouple=False),
    "vision-pi": dict(custom_freqs="linear", decouple=True),
    "vision-ntk": dict(custom_freqs="ntk-aware", decouple=True),
    "vision-ntk-by-parts": dict(custom_freqs="ntk-by-parts", decouple=True),
    "vision-yarn": dict(custom_freqs="yarn", decouple=True),
    "ntk+attn-scale": dict(custom_freqs="ntk-aware-pro2", decouple=False),
    "vision-ntk+attn-scale": dict(custom_freqs="ntk-aware-pro2", decouple=True),
    "vision-ntk+attn-scale-side": dict(custom_freqs="ntk-aware-pro1", decouple=True),
}
__doc__ += "\n".join(f"  {k:<28}{v}" for k, v in EXTRAPOLATION_RULES.items()) + "\n"


def nearest_valid(value: int, multiple: int) -> tuple[int, int]:
    lo = max(multiple, value // multiple * multiple)
    return lo, lo + multiple


def patches_for(height: int, width: int, multiple: int) -> tuple[int, int]:
    """Pixel size -> (h, w) in patches; `multiple` = patch size x VAE downsampling (16 for latents).

    Anything not a positive multiple is a ValueError naming the nearest valid sizes.
    """
    bad = [(n, v) for n, v in (("height", height), ("width", width)) if v <= 0 or v % multiple]
    if bad:
        hints = ", ".join(
            f"--{n} {v}: use {' or '.join(map(str, nearest_valid(v, multiple)))}" for n, v in bad
        )
        raise ValueError(
            f"Image sides must be multiples of {multiple} (patch size x VAE downsampling); {hints}."
        )
    return height // multiple, width // multiple


def model_for_size(
    model_cfg, h: int, w: int, rule: str = "none", ori_max_pe_len: int | None = None
) -> FiT:
    """The model with RoPE set for an (h, w)-patch test grid under an extrapolation rule."""
    if rule not in EXTRAPOLATION_RULES:
        raise ValueError(
            f"Unknown extrapolation rule {rule!r}; choose one of {sorted(EXTRAPOLATION_RULES)}."
        )
    cfg = dict(model_cfg)
    ori = (
        ori_max_pe_len
        or cfg.get("ori_max_pe_len")
        or int(math.isqrt(int(cfg.get("context_size", 256))))
    )
    cfg.update(EXTRAPOLATION_RULES[rule])
    if cfg["custom_freqs"] != "normal":
        cfg.update(max_pe_len_h=h, max_pe_len_w=w, ori_max_pe_len=int(ori))
    cfg["online_rope"] = False
    return FiT(**cfg)


def grid_inputs(batch: int, h: int, w: int):
    """grid (B, 2, h*w) int32, mask (B, h*w) float32, size (B, 2) int32 for full images."""
    grid = np.broadcast_to(make_grid(h, w), (batch, 2, h * w))
    return (
        jnp.asarray(grid, jnp.int32),
        jnp.ones((batch, h * w), jnp.float32),
        jnp.asarray(np.tile([h, w], (batch, 1)), jnp.int32),
    )


@functools.partial(
    jax.jit,
    static_argnames=(
        "model", "h", "w", "cfg_scale", "method", "num_steps", "channels", "scale_pow", "interval", "solver_opts",
    ),
)  # fmt: skip
def _generate(
    params,
    key,
    labels,
    *,
    model,
    h,
    w,
    cfg_scale,
    method,
    num_steps,
    channels,
    scale_pow,
    interval,
    solver_opts,
):
    batch = labels.shape[0]
    p, c = model.patch_size, model.in_channels
    key_noise, key_sde = jax.random.split(key)
    x0 = jax.random.normal(key_noise, (batch, h * w, p * p * c), jnp.float32)
    grid, mask, size = grid_inputs(batch, h, w)

    def apply(x, t, y, grid, mask, size):
        return model.apply({"params": params}, x, t, y, grid, mask, size)

    extra = (
        {} if cfg_scale == 1.0 else dict(channels=channels, scale_pow=scale_pow, interval=interval)
    )
    velocity = make_velocity_fn(
        apply, labels, grid, mask, size, cfg_scale=cfg_scale, null_label=model.num_classes,
        patch_size=p, in_channels=c, learn_sigma=model.learn_sigma, **extra,
    )  # fmt: skip
    opts = dict(solver_opts)
    if method == "sde":
        opts["key"] = key_sde
    if method != "dopri5":
        opts["num_steps"] = num_steps
    return solve(velocity, x0, method, **opts)


def generate(
    model: FiT,
    params,
    key,
    labels,
    h: int,
    w: int,
    *,
    cfg_scale: float = 1.0,
    method: str = "euler",
    num_steps: int = 250,
    channels: str = "official",
    scale_pow: float = 0.0,
    interval: tuple[float, float] | None = None,
    atol: float = 1e-6,
    rtol: float = 1e-3,
):
    """Samples (B, h*w, p*p*C) tokens for `labels` (B,) from N(0, I) noise drawn with `key`.

    Returns (tokens, nfe). Jitted per (model, size, options); inputs may be batch-sharded.
    """
    solver_opts = (("atol", atol), ("rtol", rtol)) if method == "dopri5" else ()
    return _generate(
        params, key, jnp.asarray(labels, jnp.int32), model=model, h=h, w=w, cfg_scale=float(cfg_scale),
        method=method, num_steps=int(num_steps), channels=channels, scale_pow=float(scale_pow),
        interval=None if interval is None else tuple(interval), solver_opts=solver_opts,
    )  # fmt: skip


def tokens_to_images(tokens, h: int, w: int, p: int) -> np.ndarray:
    """(B, h*w, p*p*C) -> (B, h*p, w*p, C) numpy."""
    tokens = np.asarray(tokens)
    return np.stack([unpatchify(t, h, w, p) for t in tokens])


def to_uint8(images) -> np.ndarray:
    """Images in [-1, 1] -> uint8 [0, 255] (ADM's rounding: clip((x + 1) * 127.5 + 0.5))."""
    return np.clip(np.asarray(images, np.float32) * 127.5 + 128.0, 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, cols: int | None = None, pad: int = 2) -> np.ndarray:
    """(B, H, W, C) uint8 -> one (rows*H, cols*W, C) uint8 grid with white padding."""
    b, hh, ww, c = images.shape
    cols = cols or int(math.ceil(math.sqrt(b)))
    rows = int(math.ceil(b / cols))
    out = np.full((rows * (hh + pad) + pad, cols * (ww + pad) + pad, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        out[
            pad + r * (hh + pad) : pad + r * (hh + pad) + hh,
            pad + q * (ww + pad) : pad + q * (ww + pad) + ww,
        ] = img
    return out
