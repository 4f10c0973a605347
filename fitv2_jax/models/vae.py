"""The Stable Diffusion VAE (AutoencoderKL, kl-f8) in Flax Linen, NHWC.

FiTv2 diffuses in the latent space of `stabilityai/sd-vae-ft-ema`: an image (B, H, W, 3) in
[-1, 1] becomes latents (B, H/8, W/8, 4), multiplied by the scaling factor 0.18215 so they have
roughly unit variance. `fitv2_jax.weights.vae.load_vae(path)` reads the weights a user brings
(diffusers directory or single file, or the original CompVis/LDM checkpoint); `VAE.encode` /
`VAE.decode` are the jitted, memory-bounded entry points the data, sampling and evaluation code use.

Parameter names follow the diffusers module tree with list indices folded into the name
(`encoder.down_blocks.0.resnets.1.conv1.weight` -> `encoder/down_blocks_0/resnets_1/conv1/kernel`),
so the conversion in `fitv2_jax/weights/vae.py` is a renaming plus a transpose.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

SD_SCALING_FACTOR = 0.18215
# A pixel budget per compiled call: 8 images at 256x256. The widest activation of the kl-f8
# decoder is 128 channels at full resolution (512 B per pixel in float32), so one call holds a few
# hundred MiB of live activations; the batch is split into chunks of at most this many pixels.
DEFAULT_MAX_PIXELS = 8 * 256 * 256
# Latent side above which encode/decode work on overlapping tiles (128 latents = 1024 px, which
# still decodes exactly in one piece within ~3 GiB); tiles are this size with `DEFAULT_OVERLAP`.
DEFAULT_TILE = 128
DEFAULT_OVERLAP = 16
# The SD kl-f8 sizes (the AutoencoderKL defaults), e.g. `random_vae(key, **KL_F8)`.
KL_F8 = dict(block_out_channels=(128, 256, 512, 512), norm_num_groups=32, layers_per_block=2)


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3, twice, plus a (1x1-projected when widths differ) skip.

    x: (B, H, W, C_in) -> (B, H, W, out_channels).
    """

    out_channels: int
    groups: int = 32
    eps: float = 1e-6
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(
            nn.Conv, kernel_size=(3, 3), padding=1, dtype=self.dtype, precision=self.precision
        )
        norm = functools.partial(
            nn.GroupNorm,
            num_groups=self.groups,
            epsilon=self.eps,
            dtype=self.dtype,
            use_fast_variance=False,  # E[(x-m)^2], not E[x^2]-m^2: large means would cancel
        )
        h = conv(self.out_channels, name="conv1")(nn.silu(norm(name="norm1")(x)))
        h = conv(self.out_channels, name="conv2")(nn.silu(norm(name="norm2")(h)))
        if x.shape[-1] != self.out_channels:
            x = nn.Conv(
                self.out_channels,
                (1, 1),
                dtype=self.dtype,
                precision=self.precision,
                name="conv_shortcut",
            )(x)
        return x + h


class MidAttention(nn.Module):
    """Single-head self-attention over all H*W positions, with a residual.

    Exact, but queries are processed `query_chunk` at a time so the (N, N) score matrix never
    exists in full: a 1024x1024 image has N = 128*128 = 16384 latent positions (1 GiB of scores).
    x: (B, H, W, C) -> (B, H, W, C).
    """

    groups: int = 32
    eps: float = 1e-6
    query_chunk: int = 2048
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        dense = functools.partial(nn.Dense, c, dtype=self.dtype, precision=self.precision)
        y = nn.GroupNorm(
            num_groups=self.groups,
            epsilon=self.eps,
            dtype=self.dtype,
            use_fast_variance=False,
            name="group_norm",
        )(x).reshape(b, h * w, c)
        q = dense(name="to_q")(y) * (1.0 / math.sqrt(c))
        k = dense(name="to_k")(y)
        v = dense(name="to_v")(y)
        o = _chunked_attention(q, k, v, self.query_chunk, self.precision)
        o = dense(name="to_out_0")(o.astype(self.dtype))
        return x + o.reshape(b, h, w, c)


def _chunked_attention(q, k, v, chunk: int, precision=None):
    """softmax(q k^T) v, scores in float32, `chunk` queries at a time.

    q, k, v: (B, N, C) -> (B, N, C).
    """

    def attend(qc):
        s = jnp.einsum(
            "bqc,bkc->bqk", qc, k, precision=precision, preferred_element_type=jnp.float32
        )
        p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
        return jnp.einsum("bqk,bkc->bqc", p, v, precision=precision)

    b, n, c = q.shape
    if n <= chunk:
        return attend(q)
    n_chunks = -(-n // chunk)
    qp = jnp.pad(q, ((0, 0), (0, n_chunks * chunk - n), (0, 0)))
    qp = qp.reshape(b, n_chunks, chunk, c).transpose(1, 0, 2, 3)
    out = jax.lax.map(attend, qp)  # (n_chunks, B, chunk, C)
    return out.transpose(1, 0, 2, 3).reshape(b, n_chunks * chunk, c)[:, :n]


class MidBlock(nn.Module):
    """resnet -> attention -> resnet at the lowest resolution. x: (B, h, w, C) -> same."""

    groups: int = 32
    eps: float = 1e-6
    add_attention: bool = True
    query_chunk: int = 2048
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        kw = dict(groups=self.groups, eps=self.eps, dtype=self.dtype, precision=self.precision)
        c = x.shape[-1]
        x = ResnetBlock(c, **kw, name="resnets_0")(x)
        if self.add_attention:
            x = MidAttention(**kw, query_chunk=self.query_chunk, name="attentions_0")(x)
        return ResnetBlock(c, **kw, name="resnets_1")(x)


class Encoder(nn.Module):
    """Images (B, H, W, in_channels) -> moments (B, H/f, W/f, 2*latent_channels), f = 2^(L-1)."""

    block_out_channels: Sequence[int] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    groups: int = 32
    eps: float = 1e-6
    mid_attention: bool = True
    query_chunk: int = 2048
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        kw = dict(groups=self.groups, eps=self.eps, dtype=self.dtype, precision=self.precision)
        conv = functools.partial(nn.Conv, dtype=self.dtype, precision=self.precision)
        x = conv(self.block_out_channels[0], (3, 3), padding=1, name="conv_in")(x)
        last = len(self.block_out_channels) - 1
        for i, ch in enumerate(self.block_out_channels):
            x = DownBlock(ch, self.layers_per_block, i < last, **kw, name=f"down_blocks_{i}")(x)
        x = MidBlock(
            **kw, add_attention=self.mid_attention, query_chunk=self.query_chunk, name="mid_block"
        )(x)
        x = nn.GroupNorm(
            num_groups=self.groups,
            epsilon=self.eps,
            dtype=self.dtype,
            use_fast_variance=False,
            name="conv_norm_out",
        )(x)
        return conv(2 * self.latent_channels, (3, 3), padding=1, name="conv_out")(nn.silu(x))


class DownBlock(nn.Module):
    """`layers` resnets, then (except at the last level) a stride-2 conv.

    x: (B, H, W, C) -> (B, H/2, W/2, out_channels), or (B, H, W, out_channels) at the last level.
    """

    out_channels: int
    layers: int
    downsample: bool
    groups: int = 32
    eps: float = 1e-6
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        for j in range(self.layers):
            x = ResnetBlock(
                self.out_channels,
                groups=self.groups,
                eps=self.eps,
                dtype=self.dtype,
                precision=self.precision,
                name=f"resnets_{j}",
            )(x)
        if self.downsample:
            # Asymmetric padding (bottom/right only), then a VALID stride-2 conv: the SD layout.
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
            x = nn.Conv(
                self.out_channels,
                (3, 3),
                strides=2,
                padding="VALID",
                dtype=self.dtype,
                precision=self.precision,
                name="downsamplers_0",
            )(x)
        return x


class UpBlock(nn.Module):
    """`layers` resnets, then (except at the last level) nearest 2x upsampling and a conv3x3."""

    out_channels: int
    layers: int
    upsample: bool
    groups: int = 32
    eps: float = 1e-6
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        for j in range(self.layers):
            x = ResnetBlock(
                self.out_channels,
                groups=self.groups,
                eps=self.eps,
                dtype=self.dtype,
                precision=self.precision,
                name=f"resnets_{j}",
            )(x)
        if self.upsample:
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
            x = nn.Conv(
                self.out_channels,
                (3, 3),
                padding=1,
                dtype=self.dtype,
                precision=self.precision,
                name="upsamplers_0",
            )(x)
        return x


class Decoder(nn.Module):
    """Latents (B, h, w, latent_channels) -> images (B, h*f, w*f, out_channels)."""

    block_out_channels: Sequence[int] = (128, 256, 512, 512)
    layers_per_block: int = 2
    out_channels: int = 3
    groups: int = 32
    eps: float = 1e-6
    mid_attention: bool = True
    query_chunk: int = 2048
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, z):
        kw = dict(groups=self.groups, eps=self.eps, dtype=self.dtype, precision=self.precision)
        conv = functools.partial(nn.Conv, dtype=self.dtype, precision=self.precision)
        x = conv(self.block_out_channels[-1], (3, 3), padding=1, name="conv_in")(z)
        x = MidBlock(
            **kw, add_attention=self.mid_attention, query_chunk=self.query_chunk, name="mid_block"
        )(x)
        widths = list(reversed(self.block_out_channels))
        for i, ch in enumerate(widths):
            up = i < len(widths) - 1
            x = UpBlock(ch, self.layers_per_block + 1, up, **kw, name=f"up_blocks_{i}")(x)
        x = nn.GroupNorm(
            num_groups=self.groups,
            epsilon=self.eps,
            dtype=self.dtype,
            use_fast_variance=False,
            name="conv_norm_out",
        )(x)
        return conv(self.out_channels, (3, 3), padding=1, name="conv_out")(nn.silu(x))


class AutoencoderKL(nn.Module):
    """The kl-f8 autoencoder with a diagonal Gaussian posterior (unscaled latents).

    Defaults are the SD VAE. `dtype` is the compute dtype (bfloat16 halves memory; norms and
    attention softmax statistics stay float32); parameters are whatever the caller passes.
    `apply(v, x)` runs encode-mean then decode (used for `init`);
    `apply(v, x, method="encode_moments")` -> (mean, logvar), each (B, H/8, W/8, latent_channels);
    `apply(v, z, method="decode")` with z (B, h, w, latent_channels) -> (B, 8h, 8w, out_channels).
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: Sequence[int] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    query_chunk: int = 2048
    dtype: Any = jnp.float32
    precision: Any = None

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def setup(self):
        kw = dict(
            block_out_channels=tuple(self.block_out_channels),
            layers_per_block=self.layers_per_block,
            groups=self.norm_num_groups,
            eps=self.norm_eps,
            mid_attention=self.mid_block_add_attention,
            query_chunk=self.query_chunk,
            dtype=self.dtype,
            precision=self.precision,
        )
        self.encoder = Encoder(latent_channels=self.latent_channels, **kw)
        self.decoder = Decoder(out_channels=self.out_channels, **kw)
        conv1x1 = functools.partial(nn.Conv, kernel_size=(1, 1), dtype=self.dtype)
        if self.use_quant_conv:
            self.quant_conv = conv1x1(2 * self.latent_channels, precision=self.precision)
        if self.use_post_quant_conv:
            self.post_quant_conv = conv1x1(self.latent_channels, precision=self.precision)

    def encode_moments(self, x):
        """x: (B, H, W, in_channels) -> mean, logvar: (B, H/8, W/8, latent_channels), float32."""
        m = self.encoder(x.astype(self.dtype))
        if self.use_quant_conv:
            m = self.quant_conv(m)
        mean, logvar = jnp.split(m.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z):
        """z: (B, h, w, latent_channels) unscaled -> images (B, 8h, 8w, out_channels), float32."""
        z = z.astype(self.dtype)
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, x):
        mean, _ = self.encode_moments(x)
        return self.decode(mean)


# ---------------------------------------------------------------------------------------------
# Jitted, memory-bounded entry points.


@functools.partial(jax.jit, static_argnums=0)
def _moments(module: AutoencoderKL, params, x):
    return module.apply({"params": params}, x, method="encode_moments")


@functools.partial(jax.jit, static_argnums=0)
def _decode(module: AutoencoderKL, params, z):
    return module.apply({"params": params}, z, method="decode")


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of length `tile` covering [0, size), neighbours sharing >= overlap.

    All tiles have the same length (one compiled shape); they are spread evenly, the first at 0
    and the last ending at `size`. Example: tile_starts(40, 16, 4) -> [0, 12, 24].
    """
    if tile >= size:
        return [0]
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap must be in [0, tile={tile}), got {overlap}")
    n = -(-(size - overlap) // (tile - overlap))
    return [round(i * (size - tile) / (n - 1)) for i in range(n)]


def _ramp(length: int, ramp: int, start_edge: bool, end_edge: bool) -> np.ndarray:
    """Blend weight along one tile axis: linear ramps of width `ramp` at inner edges, else 1."""
    p = np.arange(length, dtype=np.float64) + 0.5
    w = np.ones(length)
    if ramp > 0 and not start_edge:
        w = np.minimum(w, p / ramp)
    if ramp > 0 and not end_edge:
        w = np.minimum(w, (length - p) / ramp)
    return w


def _run_tiled(
    fn: Callable[[np.ndarray], np.ndarray],
    x: np.ndarray,
    out_scale: float,
    tile: int,
    overlap: int,
    lat_shape: tuple[int, int],
) -> np.ndarray:
    """Apply `fn` to overlapping spatial tiles of x and blend the outputs.

    Tiles are laid out on the latent grid `lat_shape` (h, w) with `tile` and `overlap` in latent
    units; `x` is (B, h*s_in, w*s_in, C) where s_in = 1 (latents) or 8 (pixels); fn maps a tile to
    an output scaled by out_scale relative to the input. Returns the blended output, float32.
    """
    h, w = lat_shape
    s_in = x.shape[1] // h
    s_out = int(round(s_in * out_scale))
    th, tw = min(tile, h), min(tile, w)
    ys, xs = tile_starts(h, th, overlap), tile_starts(w, tw, overlap)
    out = acc = None
    for i, y0 in enumerate(ys):
        wy = _ramp(th * s_out, overlap * s_out, i == 0, i == len(ys) - 1)
        for j, x0 in enumerate(xs):
            wx = _ramp(tw * s_out, overlap * s_out, j == 0, j == len(xs) - 1)
            piece = x[:, y0 * s_in : (y0 + th) * s_in, x0 * s_in : (x0 + tw) * s_in]
            y = np.asarray(fn(piece), dtype=np.float64)
            if out is None:
                out = np.zeros((x.shape[0], h * s_out, w * s_out, y.shape[-1]))
                acc = np.zeros((h * s_out, w * s_out))
            wt = wy[:, None] * wx[None, :]
            sl = (slice(y0 * s_out, (y0 + th) * s_out), slice(x0 * s_out, (x0 + tw) * s_out))
            out[:, sl[0], sl[1]] += y * wt[None, :, :, None]
            acc[sl] += wt
    return (out / acc[None, :, :, None]).astype(np.float32)


def _batched(fn: Callable[[Any], Any], x, chunk: int):
    """fn over the leading axis, `chunk` rows at a time (last chunk zero-padded: one shape)."""
    b = x.shape[0]
    if b <= chunk:
        return fn(x)
    outs = []
    for s in range(0, b, chunk):
        piece = x[s : s + chunk]
        n = piece.shape[0]
        if n < chunk:
            piece = jnp.concatenate([piece, jnp.zeros((chunk - n, *piece.shape[1:]), piece.dtype)])
        outs.append(jax.tree.map(lambda a, n=n: a[:n], fn(piece)))
    return jax.tree.map(lambda *a: jnp.concatenate(a), *outs)


@dataclasses.dataclass(frozen=True, eq=False)
class VAE:
    """A loaded VAE: module + params + latent scaling, with jitted, memory-bounded encode/decode.

    Latents seen by the rest of the project are scaled: z = (raw - shift_factor) * scaling_factor.
    Batches are split so that one compiled call sees at most `max_pixels` image pixels; images
    whose latent side exceeds `tile` are processed in overlapping `tile`x`tile` latent tiles
    (`overlap` latents shared, linearly blended). Tiling is approximate (GroupNorm statistics and
    attention become per tile); `tile=None` disables it.
    """

    module: AutoencoderKL
    params: Any
    scaling_factor: float = SD_SCALING_FACTOR
    shift_factor: float = 0.0
    max_pixels: int = DEFAULT_MAX_PIXELS
    tile: int | None = DEFAULT_TILE
    overlap: int = DEFAULT_OVERLAP

    def _check(self, x, what: str, channels: int, mult: int):
        if x.ndim != 4 or x.shape[-1] != channels:
            raise ValueError(f"{what}: expected (B, H, W, {channels}) NHWC, got {x.shape}")
        if x.shape[1] % mult or x.shape[2] % mult:
            raise ValueError(f"{what}: H and W must be multiples of {mult}, got {x.shape[1:3]}")

    def _chunk(self, pixels_per_image: int) -> int:
        return max(1, self.max_pixels // pixels_per_image)

    def _needs_tiles(self, h: int, w: int) -> bool:
        return self.tile is not None and max(h, w) > self.tile

    def moments(self, images):
        """images: (B, H, W, 3) in [-1, 1] -> unscaled posterior mean, logvar (B, H/8, W/8, 4)."""
        f = self.module.downsample_factor
        self._check(images, "VAE.encode images", self.module.in_channels, f)
        x = jnp.asarray(images, jnp.float32)
        h, w = x.shape[1] // f, x.shape[2] // f

        def run(piece):
            return _batched(
                lambda a: _moments(self.module, self.params, a),
                jnp.asarray(piece),
                self._chunk(piece.shape[1] * piece.shape[2]),
            )

        if not self._needs_tiles(h, w):
            return run(x)
        c = self.module.latent_channels
        both = _run_tiled(
            lambda p: jnp.concatenate(run(p), axis=-1),
            np.asarray(x),
            1.0 / f,
            self.tile,
            self.overlap,
            (h, w),
        )
        return jnp.asarray(both[..., :c]), jnp.asarray(both[..., c:])

    def encode(self, images, key: jax.Array | None = None) -> jax.Array:
        """images: (B, H, W, 3) float in [-1, 1], H, W multiples of 8 -> latents (B, H/8, W/8, 4).

        Returns the scaled posterior mean, or a posterior sample when `key` is given (the noise
        is drawn for the whole batch at once, so it does not depend on chunking or tiling).
        """
        mean, logvar = self.moments(images)
        z = mean
        if key is not None:
            z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
        return (z - self.shift_factor) * self.scaling_factor

    def decode(self, latents) -> jax.Array:
        """latents: (B, h, w, 4) scaled -> images (B, 8h, 8w, 3) float32, roughly in [-1, 1]."""
        f = self.module.downsample_factor
        self._check(latents, "VAE.decode latents", self.module.latent_channels, 1)
        z = jnp.asarray(latents, jnp.float32) / self.scaling_factor + self.shift_factor
        h, w = z.shape[1], z.shape[2]

        def run(piece):
            return _batched(
                lambda a: _decode(self.module, self.params, a),
                jnp.asarray(piece),
                self._chunk(piece.shape[1] * piece.shape[2] * f * f),
            )

        if not self._needs_tiles(h, w):
            return run(z)
        return jnp.asarray(_run_tiled(run, np.asarray(z), f, self.tile, self.overlap, (h, w)))

    def with_options(self, **changes) -> VAE:
        """A copy with other chunking/tiling/scaling options (e.g. `tile=None`)."""
        return dataclasses.replace(self, **changes)


def random_vae(
    key: jax.Array,
    block_out_channels: Sequence[int] = (32, 32, 64, 64),
    norm_num_groups: int = 8,
    layers_per_block: int = 1,
    dtype=jnp.float32,
    **module_kwargs,
) -> VAE:
    """A VAE with random weights (small by default) for tests and the CPU demo.

    Every tensor, norms included, is random (a VAE built from init alone would have unit
    GroupNorm scales and zero biases). `random_vae(key, **KL_F8)` has the real SD sizes.
    """
    module = AutoencoderKL(
        block_out_channels=tuple(block_out_channels),
        norm_num_groups=norm_num_groups,
        layers_per_block=layers_per_block,
        dtype=dtype,
        **module_kwargs,
    )
    f = module.downsample_factor
    shapes = jax.eval_shape(
        lambda: module.init(jax.random.key(0), jnp.zeros((1, f, f, module.in_channels)))
    )["params"]
    # numpy draws: compiling Flax's initialisers for ~100 tensors takes longer than the tests.
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
    leaves, treedef = jax.tree.flatten_with_path(shapes)
    new = []
    for path, leaf in leaves:
        name = path[-1].key
        noise = rng.standard_normal(leaf.shape, dtype=np.float32)
        if name == "kernel":
            new.append(noise / math.sqrt(math.prod(leaf.shape[:-1])))
        elif name == "scale":
            new.append(1.0 + 0.2 * noise)
        else:  # biases
            new.append(0.1 * noise)
    return VAE(module, jax.tree.unflatten(treedef, [jnp.asarray(a) for a in new]))
