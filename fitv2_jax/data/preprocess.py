"""FiT/FiTv2 image preprocessing: the token-budget resize rule, the Algorithm-1 crop variant, flips.

Sizes are `(height, width)` in pixels. `m = patch_size * downsample` is the grid unit (16 for SD-VAE
latents with p = 2, `p` for pixel-space configs): every output side is a multiple of `m`, and an
output of `(H', W')` pixels becomes `(H'/m) * (W'/m)` tokens.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from fitv2_jax.utils.errors import UserError

MIN_TOKENS = 16  # FiTv2 drops images under 16 tokens
RESIZE_RULES = ("official", "max_tokens")


def official_size(height: int, width: int, max_tokens: int, m: int) -> tuple[int, int]:
    """The official `resize_arr` (FITV2_FACTS.md §2), in pixels (H', W'), possibly 0 or over the
    budget: an image of area >= S^2 (S^2 = max_tokens * m^2: 256 px at 256 tokens) is scaled to
    exact area S^2 keeping its aspect ratio; a side under m is scaled up to m; otherwise the
    size is kept. Both sides are then floored to multiples of m."""
    w, h = width, height
    if w * h >= max_tokens * m * m:
        new_w = math.sqrt(w / h) * (math.sqrt(max_tokens) * m)
        new_h = new_w * h / w
    elif w < m:  # an upscale (twice in ImageNet)
        new_w, new_h = m, m * h / w
    elif h < m:
        new_h, new_w = m, m * w / h
    else:
        new_w, new_h = w, h
    return int(new_h / m) * m, int(new_w / m) * m


def _max_token_size(height, width, max_tokens, m, limit) -> tuple[int, int] | None:
    """Most tokens among the sizes with each side the floor or ceil of the exact-aspect area
    `max_tokens` size (never upscaled), whose aspect error does not exceed `limit`."""
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
            error = abs(math.log(hh / ww) - log_aspect)
            key = (hh * ww, -error, hh)
            if error <= limit + 1e-12 and (best_key is None or key > best_key):
                best, best_key = (hh, ww), key
    return None if best is None else (best[0] * m, best[1] * m)


def target_size(
    height: int,
    width: int,
    max_tokens: int,
    patch_size: int,
    downsample: int,
    min_tokens: int = MIN_TOKENS,
    rule: str = "official",
) -> tuple[int, int] | None:
    """The size (H', W') in pixels an image is resized to, or None when it is dropped.

    rule "official": `official_size`, the official code's rule. "max_tokens": the size with the
    most tokens whose sides are within one unit of the exact-aspect size and whose aspect ratio
    is no further from the image's than the official size's is (never upscaled). An image is
    dropped below `min_tokens` tokens, with a side under one unit, or over `max_tokens` (the
    official upscale of a side under m can overflow the budget for extreme aspect ratios).
    """
    if rule not in RESIZE_RULES:
        raise UserError(f"resize rule {rule!r}: use one of {', '.join(RESIZE_RULES)}")
    m = patch_size * downsample
    size = official_size(height, width, max_tokens, m)
    if rule == "max_tokens" and min(size) >= m:
        limit = abs(math.log(size[0] / size[1]) - math.log(height / width))
        size = _max_token_size(height, width, max_tokens, m, limit) or size
    tokens = (size[0] // m) * (size[1] // m)
    if min(size) < m or not min_tokens <= tokens <= max_tokens:
        return None
    return size


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
    rule: str = "official",
) -> dict[str, Image.Image]:
    """Every variant FiTv2's Algorithm 1 can pick for one image, before flipping.

    Returns {} if the image is too small, {"resize": ...} in general, and also {"crop": ...}
    (S x S, S = crop_side) when both sides exceed S, where Algorithm 1 picks either with p = 1/2.
    """
    w, h = img.size
    size = target_size(h, w, max_tokens, patch_size, downsample, min_tokens, rule)
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
