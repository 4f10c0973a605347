"""Images/latents <-> token sequences: patchify, the 2D position grid, padding masks.

Layout (the official FiTv2 / SiT one; the model's `x_embedder` weights depend on it):
an image or latent `(H, W, C)` is cut into `p x p` patches; tokens run row-major over the
`(H/p, W/p)` patch grid, and each token's `p*p*C` features are ordered `(c, p1, p2)`
(channel-major inside the patch). The grid is `(2, N)` int32 with row 0 = the column (w) index
and row 1 = the row (h) index.

Every function works on numpy arrays and, where cheap, on `jax.numpy` arrays (the array module
is taken from the input).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np


def _xp(a):
    """The array module of `a`: jax.numpy for jax arrays, numpy otherwise."""
    return jnp if type(a).__module__.startswith("jax") else np


def patchify(img, p: int):
    """img: (H, W, C) with H, W multiples of p -> tokens (N, p*p*C), N = (H/p)*(W/p)."""
    H, W, C = img.shape
    if H % p or W % p:
        raise ValueError(f"patchify: image {H}x{W} is not a multiple of patch size {p}")
    h, w = H // p, W // p
    x = img.reshape(h, p, w, p, C)
    x = x.transpose(0, 2, 4, 1, 3)  # (h, w, c, p1, p2): channel-major inside the patch
    return x.reshape(h * w, C * p * p)


def unpatchify(tokens, h: int, w: int, p: int):
    """tokens: (N >= h*w, p*p*C) -> image (h*p, w*p, C); h, w in patches; extra rows ignored."""
    D = tokens.shape[-1]
    C = D // (p * p)
    if C * p * p != D:
        raise ValueError(f"unpatchify: token width {D} is not p*p*C for p={p}")
    x = tokens[: h * w].reshape(h, w, C, p, p)
    x = x.transpose(0, 3, 1, 4, 2)  # (h, p1, w, p2, c)
    return x.reshape(h * p, w * p, C)


def make_grid(h: int, w: int, xp=np):
    """Patch-grid positions (2, h*w) int32: row 0 = w (column) index, row 1 = h (row) index."""
    idx = xp.arange(h * w, dtype=xp.int32)
    return xp.stack([idx % w, idx // w]).astype(xp.int32)


def pad_tokens(tokens, grid, max_len: int):
    """Pad one sequence to max_len.

    tokens: (N, D), grid: (2, N) -> (tokens (max_len, D), grid (2, max_len) int32,
    mask (max_len,) float32 with 1 = real token). Padding tokens and positions are 0.
    """
    xp = _xp(tokens)
    n = tokens.shape[0]
    if n > max_len:
        raise ValueError(f"pad_tokens: {n} tokens do not fit in max_len={max_len}")
    tokens = xp.pad(tokens, ((0, max_len - n), (0, 0)))
    grid = xp.pad(grid.astype(xp.int32), ((0, 0), (0, max_len - n)))
    mask = (xp.arange(max_len) < n).astype(xp.float32)
    return tokens, grid, mask


def batch_tokens(images: Sequence, p: int, max_len: int) -> dict:
    """Patchify and pad a list of (H_i, W_i, C) arrays into one batch.

    Returns dict(x (B, L, p*p*C) float32, grid (B, 2, L) int32, mask (B, L) float32,
    size (B, 2) int32 = (h, w) in patches), L = max_len.
    """
    if not len(images):
        raise ValueError("batch_tokens: empty list of images")
    xp = _xp(images[0])
    xs, grids, masks, sizes = [], [], [], []
    for img in images:
        h, w = img.shape[0] // p, img.shape[1] // p
        t, g, m = pad_tokens(patchify(img, p), make_grid(h, w, xp), max_len)
        xs.append(t.astype(xp.float32))
        grids.append(g)
        masks.append(m)
        sizes.append((h, w))
    return dict(
        x=xp.stack(xs),
        grid=xp.stack(grids),
        mask=xp.stack(masks),
        size=xp.asarray(sizes, dtype=xp.int32),
    )
