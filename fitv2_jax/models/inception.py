"""The FID InceptionV3 network (TF graph inception-2015-12-05) in Flax, as ADM's evaluator runs it.

    params, has_logits = load_inception_params(path)        # fitv2_jax.weights.inception
    out = InceptionV3(has_logits).apply({"params": params}, preprocess(images))
    out["pool"]     # (B, 2048) pool_3 (FID, precision/recall)
    out["spatial"]  # (B, 2023) mixed_6/conv[..., :7] flattened as (17, 17, 7) (sFID)
    out["logits"]   # (B, 1008), only with the 1008-way output layer (IS)

What the TF graph does to its input, and so what we do: TF1's legacy bilinear resize to 299x299
(align_corners=False, no half-pixel offset; non-square images are squashed), then (x - 128) / 128.
The logits are pool_3 @ W of the `softmax/logits` layer without its bias, as ADM computes them.
Parameters are named after the TF scopes.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INPUT_SIZE = 299
POOL_DIM = 2048
SPATIAL_DIM = 17 * 17 * 7
NUM_LOGITS = 1008
BN_EPS = 1e-3


# ----------------------------------------------------------------------------- resize


def _legacy_taps(in_size: int, out_size: int):
    """Source rows for TF1's legacy bilinear: src = dst * (in / out), in float32 as TF does."""
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.arange(out_size, dtype=np.float32) * scale
    lo = np.floor(src).astype(np.int32)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = (src - np.floor(src)).astype(np.float32)
    return lo, hi, frac


def tf1_resize_bilinear(images: jax.Array, size: tuple[int, int]) -> jax.Array:
    """TF1 `ResizeBilinear(align_corners=False, half_pixel_centers=False)`.

    images: (B, H, W, C) any numeric dtype -> (B, size[0], size[1], C) float32. The blend order is
    TF's: interpolate along x on the two source rows, then along y.
    """
    x = images.astype(jnp.float32)
    (y0, y1, fy), (x0, x1, fx) = (
        _legacy_taps(x.shape[1], size[0]),
        _legacy_taps(x.shape[2], size[1]),
    )
    top, bottom = x[:, y0], x[:, y1]
    fx = jnp.asarray(fx)[None, None, :, None]
    top = top[:, :, x0] + (top[:, :, x1] - top[:, :, x0]) * fx
    bottom = bottom[:, :, x0] + (bottom[:, :, x1] - bottom[:, :, x0]) * fx
    return top + (bottom - top) * jnp.asarray(fy)[None, :, None, None]


def preprocess(images: jax.Array) -> jax.Array:
    """(B, H, W, 3) in [0, 255] -> (B, 299, 299, 3) float32 in [-1, 1), as the TF graph's head."""
    x = images.astype(jnp.float32)
    if x.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
        x = tf1_resize_bilinear(x, (INPUT_SIZE, INPUT_SIZE))
    return (x - 128.0) * (1.0 / 128.0)  # 1/128 is exact, so this equals TF's Sub then Mul


# ----------------------------------------------------------------------------- network


def _zeros(key, shape, dtype=jnp.float32):
    # Weights always come from a file; init only fixes the tree and its shapes.
    return jnp.zeros(shape, dtype)


class ConvBN(nn.Module):
    """Conv (no bias) -> inference batch norm (eps 1e-3, beta and optional gamma) -> ReLU."""

    features: int
    kernel: tuple[int, int]
    stride: int = 1
    same: bool = True  # TF "SAME" (symmetric k//2 padding here) or "VALID"

    @nn.compact
    def __call__(self, x):
        kh, kw = self.kernel
        w = self.param("kernel", _zeros, (kh, kw, x.shape[-1], self.features))
        beta = self.param("beta", _zeros, (self.features,))
        mean = self.param("mean", _zeros, (self.features,))
        var = self.param("var", _zeros, (self.features,))
        gamma = self.param("gamma", lambda k, s: jnp.ones(s), (self.features,))
        pad = ((kh // 2, kh // 2), (kw // 2, kw // 2)) if self.same else ((0, 0), (0, 0))
        y = jax.lax.conv_general_dilated(
            x, w, (self.stride, self.stride), pad, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        # The same two-step form as torch's CPU batch norm: y * alpha + (beta - mean * alpha).
        alpha = gamma * jax.lax.rsqrt(var + BN_EPS)
        return nn.relu(y * alpha + (beta - mean * alpha))


class Tower(nn.Module):
    """ConvBNs in sequence, named conv, conv_1, conv_2, ... as in the TF graph."""

    specs: Sequence[tuple]  # (features, kernel[, stride, same])

    @nn.compact
    def __call__(self, x):
        for i, spec in enumerate(self.specs):
            x = ConvBN(*spec, name="conv" if i == 0 else f"conv_{i}")(x)
        return x


def _avg_pool_same(x):
    # TF's SAME average pool divides by the number of real (unpadded) inputs.
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_valid(x):
    return nn.max_pool(x, (3, 3), (2, 2), "VALID")


class InceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        return jnp.concatenate(
            [
                ConvBN(64, (1, 1), name="conv")(x),
                Tower([(48, (1, 1)), (64, (5, 5))], name="tower")(x),
                Tower([(64, (1, 1)), (96, (3, 3)), (96, (3, 3))], name="tower_1")(x),
                Tower([(self.pool_features, (1, 1))], name="tower_2")(_avg_pool_same(x)),
            ],
            axis=-1,
        )


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jnp.concatenate(
            [
                ConvBN(384, (3, 3), 2, False, name="conv")(x),
                Tower([(64, (1, 1)), (96, (3, 3)), (96, (3, 3), 2, False)], name="tower")(x),
                _max_pool_valid(x),
            ],
            axis=-1,
        )


class InceptionC(nn.Module):
    c7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.c7
        head = ConvBN(192, (1, 1), name="conv")(x)
        tower = Tower([(c7, (1, 1)), (c7, (1, 7)), (192, (7, 1))], name="tower")(x)
        tower_1 = Tower(
            [(c7, (1, 1)), (c7, (7, 1)), (c7, (1, 7)), (c7, (7, 1)), (192, (1, 7))], name="tower_1"
        )(x)
        tower_2 = Tower([(192, (1, 1))], name="tower_2")(_avg_pool_same(x))
        return jnp.concatenate([head, tower, tower_1, tower_2], axis=-1), head


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jnp.concatenate(
            [
                Tower([(192, (1, 1)), (320, (3, 3), 2, False)], name="tower")(x),
                Tower(
                    [(192, (1, 1)), (192, (1, 7)), (192, (7, 1)), (192, (3, 3), 2, False)],
                    name="tower_1",
                )(x),
                _max_pool_valid(x),
            ],
            axis=-1,
        )


class InceptionE(nn.Module):
    max_pool: bool  # the graph's last block max-pools its pool branch (a quirk of this graph)

    @nn.compact
    def __call__(self, x):
        a = ConvBN(384, (1, 1), name="tower_conv")(x)
        b = ConvBN(448, (1, 1), name="tower_1_conv")(x)
        b = ConvBN(384, (3, 3), name="tower_1_conv_1")(b)
        if self.max_pool:
            pooled = nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)))
        else:
            pooled = _avg_pool_same(x)
        return jnp.concatenate(
            [
                ConvBN(320, (1, 1), name="conv")(x),
                ConvBN(384, (1, 3), name="tower_mixed_conv")(a),
                ConvBN(384, (3, 1), name="tower_mixed_conv_1")(a),
                ConvBN(384, (1, 3), name="tower_1_mixed_conv")(b),
                ConvBN(384, (3, 1), name="tower_1_mixed_conv_1")(b),
                ConvBN(192, (1, 1), name="tower_2_conv")(pooled),
            ],
            axis=-1,
        )


class InceptionV3(nn.Module):
    """x: (B, 299, 299, 3) in [-1, 1) -> dict(pool (B, 2048), spatial (B, 2023)[, logits])."""

    with_logits: bool = False

    @nn.compact
    def __call__(self, x):
        x = ConvBN(32, (3, 3), 2, False, name="conv")(x)
        x = ConvBN(32, (3, 3), 1, False, name="conv_1")(x)
        x = ConvBN(64, (3, 3), name="conv_2")(x)
        x = _max_pool_valid(x)
        x = ConvBN(80, (1, 1), name="conv_3")(x)
        x = ConvBN(192, (3, 3), 1, False, name="conv_4")(x)
        x = _max_pool_valid(x)
        for i, pool_features in enumerate((32, 64, 64)):
            x = InceptionA(pool_features, name="mixed" if i == 0 else f"mixed_{i}")(x)
        x = InceptionB(name="mixed_3")(x)
        for i, c7 in zip((4, 5, 6, 7), (128, 160, 160, 192), strict=True):
            x, head = InceptionC(c7, name=f"mixed_{i}")(x)
            if i == 6:
                # ADM's sFID feature: mixed_6/conv, first 7 channels, flattened in NHWC order.
                spatial = head[..., :7].reshape(head.shape[0], -1)
        x = InceptionD(name="mixed_8")(x)
        x = InceptionE(False, name="mixed_9")(x)
        x = InceptionE(True, name="mixed_10")(x)
        pool = jnp.mean(x, axis=(1, 2))  # the graph's 8x8 VALID average pool: (B, 2048)
        out = {"pool": pool, "spatial": spatial}
        if self.with_logits:
            w = self.param("kernel", _zeros, (POOL_DIM, NUM_LOGITS))
            out["logits"] = pool @ w
        return out
