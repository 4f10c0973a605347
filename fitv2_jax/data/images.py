"""Robust image decoding: any file PIL can read -> 8-bit RGB, or a BadImage saying why not.

Grayscale, palette, CMYK and 16-bit images are converted (16-bit by dropping the low byte);
alpha is composited over white. Corrupt or truncated files raise BadImage, which callers count
and skip: one bad file in a million must not stop a dataset from being prepared.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image


class BadImage(Exception):
    """An image that cannot be used; `reason` is a short code used in skip counts."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode.startswith("I") or mode == "F":
        a = np.asarray(img).astype(np.float64)
        if mode.startswith("I;16") or a.max() > 255:  # 16-bit samples (PNG "I;16" or "I")
            a = a / 257.0
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
        mode = "L"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, ...


def load_rgb(src: str | bytes | np.ndarray | Image.Image) -> Image.Image:
    """Decode a path, encoded bytes, a uint8 (H, W[, C]) array or a PIL image into RGB."""
    try:
        if isinstance(src, Image.Image):
            img = src
        elif isinstance(src, np.ndarray):
            img = Image.fromarray(src)
        else:
            f = io.BytesIO(src) if isinstance(src, bytes | bytearray) else src
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(f)
                img.load()  # force the decode now: truncation shows up here
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage("too_large", str(e)) from e
    except FileNotFoundError:
        raise
    except (OSError, ValueError, SyntaxError, Image.UnidentifiedImageError) as e:
        msg = str(e)
        raise BadImage("truncated" if "truncated" in msg else "corrupt", msg) from e
    try:
        return _to_rgb(img)
    except (OSError, ValueError) as e:
        raise BadImage("unsupported_mode", f"{img.mode}: {e}") from e
