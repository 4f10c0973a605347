"""FiT/FiTv2 image preprocessing: the token-budget resize rule, the Algorithm-1 crop variant, flips.

Sizes are `(height, width)` in pixels. `m = patch_size * downsample` is the grid unit (16 for SD-VAE
latents with p = 2, `p` for pixel-space configs): every output side is a multiple of `m`, and an
output of `(H', W')` pixels becomes `(H'/m) * (W'/m)` tokens.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

MIN_TOKENS = 16  # FiTv2 drops images under 16 tokens


def target_size(
    height: int,
    width: int,
    max_tokens: int,
    patch_size: int,
    downsample: int,
    min_tokens: int = MIN_TOKENS,
) -> tuple[int, int] | None:
    """Aspect-preserving target size (H', W') in pixels, or None if the image is too small.

    Rule: scale the image (never up) to the exact aspect ratio with area `max_tokens` units,
    giving `a x b` grid units (fractional). Each side is then the floor or the ceil of that
    (clamped to [1, input side // m]); among those candidates with at most `max_tokens` tokens the
    one with the most tokens wins, ties going to the closer aspect ratio. This keeps each side
    within one unit of the exact aspect ratio and is never smaller than the official
    floor-both-sides rounding. Returns None below `min_tokens` tokens or when a side is under m.
    """
    m = patch_size * downsample
    hmax, wmax = height // m, width // m
    if hmax < 1 or wmax < 1:
        return None
    s = min(1.0, math.sqrt(max_tokens * m * m / (height * width)))
    a, b = height * s / m, width * s / m
    log_aspect = math.log(height / width)
    best, best_key = None, None
    for h in {min(max(math.floor(a), 1), hmax), min(max(math.ceil(a), 1), hmax)}:
        for w in {min(max(math.floor(b), 1), wmax), min(max(math.ceil(b), 1), wmax)}:
            # Clamping a side up to 1 unit can overflow the budget: shrink the other side.
            hh, ww = h, w
            if hh * ww > max_tokens:
                if hh == 1:
                    ww = max_tokens // hh
                elif ww == 1:
                    hh = max_tokens // ww
                else:
                    continue
            key = (hh * ww, -abs(math.log(hh / ww) - log_aspect), hh)
            if best_key is None or key > best_key:
                best, best_key = (hh, ww), key
    if best is None or best[0] * best[1] < min_tokens:
        return None
    return best[0] * m, best[1] * m


def resize(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Bicubic, antialiased resize to size = (H, W); returns img itself when already that size."""
    h, w = size
    if img.size == (w, h):
        return img
    return img.resize((w, h), resample=Image.Resampling.BICUBIC)


def center_crop_square(img: Image.Image, side: int) -> Image.Image:
    """ADM-style variant: short side resized to `side` (bicubic), then a centered square crop."""
    w, h = img.size
    scale = side / min(w, h)
    nw, nh = max(side, round(w * scale)), max(side, round(h * scale))
    img = img.resize((nw, nh), resample=Image.Resampling.BICUBIC)
    left, top = (nw - side) // 2, (nh - side) // 2
    return img.crop((left, top, left + side, top + side))


def crop_side(max_tokens: int, patch_size: int, downsample: int) -> int:
    """S of Algorithm 1: side of a square of max_tokens tokens (256 px at 256 latent tokens)."""
    m = patch_size * downsample
    return math.isqrt(max_tokens) * m


def variants(
    img: Image.Image,
    max_tokens: int,
    patch_size: int,
    downsample: int,
    min_tokens: int = MIN_TOKENS,
) -> dict[str, Image.Image]:
    """Every variant FiTv2's Algorithm 1 can pick for one image, before flipping.

    Returns {} if the image is too small, {"resize": ...} in general, and also {"crop": ...}
    (S x S, S = crop_side) when both sides exceed S, where Algorithm 1 picks either with p = 1/2.
    """
    w, h = img.size
    size = target_size(h, w, max_tokens, patch_size, downsample, min_tokens)
    if size is None:
        return {}
    out = {"resize": resize(img, size)}
    side = crop_side(max_tokens, patch_size, downsample)
    if h > side and w > side:
        out["crop"] = center_crop_square(img, side)
    return out


def algorithm1(
    img: Image.Image,
    rng: np.random.Generator,
    max_tokens: int,
    patch_size: int,
    downsample: int,
    flip_prob: float = 0.5,
) -> Image.Image | None:
    """FiTv2 Algorithm 1 on the fly: crop variant with p = 1/2 when allowed, then a random flip."""
    vs = variants(img, max_tokens, patch_size, downsample)
    if not vs:
        return None
    out = vs["crop"] if "crop" in vs and rng.random() < 0.5 else vs["resize"]
    return hflip(out) if rng.random() < flip_prob else out


def hflip(img):
    """Horizontal flip of a PIL image or an (H, W, C) array."""
    if isinstance(img, Image.Image):
        return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img[:, ::-1]
