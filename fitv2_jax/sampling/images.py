"""Tokens to images, uint8 conversion and sample grids (numpy; jax arrays stay on device)."""

from __future__ import annotations

import math

import jax
import numpy as np


def tokens_to_images(tokens, h: int, w: int, p: int):
    """(B, h*w, p*p*C) -> (B, h*p, w*p, C), the official (c, p1, p2) token layout.

    numpy in, numpy out; a jax array stays on its devices (the VAE decodes it there).
    """
    if not isinstance(tokens, jax.Array):
        tokens = np.asarray(tokens)
    b, n, d = tokens.shape
    c = d // (p * p)
    x = tokens[:, : h * w].reshape(b, h, w, c, p, p).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, h * p, w * p, c)


def to_uint8(images) -> np.ndarray:
    """Images in [-1, 1] -> uint8 [0, 255] as the official sampler: clamp(127.5 x + 128) then
    truncate (i.e. round to nearest)."""
    return np.clip(np.asarray(images, np.float32) * 127.5 + 128.0, 0, 255).astype(np.uint8)


def display_scale(height: int, width: int, target: int = 128) -> int:
    """The whole-number nearest-neighbour upscale that shows an image at about target x target
    pixels of area (a 32x32 sample: 4, so it is 128 screen pixels, not 32); 1 for large ones."""
    return max(1, round(target / math.sqrt(height * width)))


def image_grid(images: np.ndarray, cols: int | None = None, pad: int = 2,
               scale: int = 1) -> np.ndarray:  # fmt: skip
    """(B, H, W, C) uint8 -> one (rows*H*s, cols*W*s, C) uint8 grid with white padding, every
    image upscaled `scale` (s) times by nearest neighbour (pixels stay sharp squares)."""
    images = np.asarray(images)
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
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
