"""What `prepare` stores per image variant: pixels (no VAE) or SD-VAE latents.

An encoder maps a batch of same-size uint8 RGB images (B, H, W, 3) to the arrays stored in the
records, and says how its output relates to pixels (`downsample`) and how the pipeline turns the
stored values into model inputs (`stored_as`).
"""

from __future__ import annotations

import numpy as np


class PixelEncoder:
    """Pixel-space datasets: images stored as uint8, read back as x / 127.5 - 1 in [-1, 1]."""

    kind = "pixels"
    downsample = 1
    channels = 3
    stored_as = "uint8_pm1"

    def encode(self, images: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(images, np.uint8)

    def describe(self) -> dict:
        return {"kind": self.kind, "downsample": 1, "channels": 3, "stored_as": self.stored_as}


class VaeEncoder:
    """Latent datasets: a loaded `fitv2_jax.models.vae.VAE` encodes [-1, 1] images to scaled
    latents. path: where the VAE was loaded from (recorded in dataset.json)."""

    kind = "latents"
    stored_as = "float"

    def __init__(self, vae, path: str | None = None, dtype: str = "float32"):
        self.vae, self.path, self.dtype = vae, path, np.dtype(dtype)
        self.downsample = int(vae.module.downsample_factor)
        self.channels = int(vae.module.latent_channels)

    def encode(self, images: np.ndarray) -> np.ndarray:
        x = images.astype(np.float32) / 127.5 - 1.0
        return np.asarray(self.vae.encode(x)).astype(self.dtype)

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "downsample": self.downsample,
            "channels": self.channels,
            "stored_as": self.stored_as,
            "dtype": self.dtype.name,
            "vae": self.path,
            "scaling_factor": float(getattr(self.vae, "scaling_factor", 0.0)),
        }


def to_model_input(x: np.ndarray, stored_as: str) -> np.ndarray:
    """Stored record array -> float32 model input (pixels to [-1, 1], latents as they are)."""
    if stored_as == "uint8_pm1":
        return x.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    return x.astype(np.float32)
