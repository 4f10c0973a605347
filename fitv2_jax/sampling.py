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

from fitv2_jax.data.tokens import make_grid
from fitv2_jax.flow.guidance import make_velocity_fn
from fitv2_jax.flow.solvers import METHODS
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
    "doubled_state",
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
    doubled_state,
    x0=None,
):
    batch = labels.shape[0]
    p, c = model.patch_size, model.in_channels
    key_noise, key_sde = jax.random.split(key)
    if x0 is None:
        x0 = jax.random.normal(key_noise, (batch, h * w, p * p * c), jnp.float32)
    grid, mask, size = grid_inputs(batch, h, w)

    def apply(x, t, y, grid, mask, size):
        return model.apply({"params": params}, x, t, y, grid, mask, size)

    guided = cfg_scale != 1.0
    extra = dict(channels=channels, scale_pow=scale_pow, interval=interval) if guided else {}
    velocity = make_velocity_fn(
        apply, labels, grid, mask, size, cfg_scale=cfg_scale, null_label=model.num_classes,
        patch_size=p, in_channels=c, learn_sigma=model.learn_sigma,
        doubled_state=doubled_state and guided, **extra,
    )  # fmt: skip
    opts = dict(solver_opts)
    if method == "sde":
        opts["key"] = key_sde
    if method != "dopri5":
        opts["num_steps"] = num_steps
    if doubled_state and guided:  # the official [x; ghost] state, started as [z; z]
        x, nfe = solve(velocity, jnp.concatenate([x0, x0], axis=0), method, **opts)
        return x[:batch], nfe
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
    x0=None,
    doubled_state: bool = False,
):
    """Samples (B, h*w, p*p*C) tokens for `labels` (B,) from N(0, I) noise drawn with `key`.

    x0: optional (B, h*w, p*p*C) starting noise (see `initial_noise`) instead of one draw from
    `key` (which then only seeds the SDE). doubled_state: the official CFG solver state
    [x; ghost] (only changes dopri5's step sizes, see flow.guidance). Returns (tokens, nfe).
    Jitted per (model, size, options); inputs may be batch-sharded.
    """
    if method not in METHODS:
        raise ValueError(f"Unknown solver {method!r}; choose one of {METHODS}.")
    solver_opts = (("atol", atol), ("rtol", rtol)) if method == "dopri5" else ()
    return _generate(
        params, key, jnp.asarray(labels, jnp.int32), model=model, h=h, w=w, cfg_scale=float(cfg_scale),
        method=method, num_steps=int(num_steps), channels=channels, scale_pow=float(scale_pow),
        interval=None if interval is None else tuple(interval), solver_opts=solver_opts,
        doubled_state=bool(doubled_state), x0=x0,
    )  # fmt: skip


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


# ----------------------------------------------------------------------------- sizes and rules


def parse_size(text: str) -> tuple[int, int]:
    """'256x320' -> (height 256, width 320) in pixels."""
    parts = text.strip().lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"Size {text!r} is not HEIGHTxWIDTH in pixels, e.g. 256x256 or 160x320.")
    return int(parts[0]), int(parts[1])


def size_name(height: int, width: int) -> str:
    return f"{height}x{width}"


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'256x256,160x320' -> [(256, 256), (160, 320)] (duplicates dropped, order kept)."""
    sizes = [parse_size(t) for t in text.split(",") if t.strip()]
    if not sizes:
        raise ValueError("No sizes given: pass e.g. --sizes 256x256,160x320.")
    return list(dict.fromkeys(sizes))


def parse_per_size(text, sizes, convert, what: str) -> dict[tuple[int, int], object]:
    """One value for every size ('1.5') or per size ('256x256=1.5,320x320=1.65'; sizes left out
    get the value of an entry without '=', or None)."""
    out: dict[tuple[int, int], object] = {}
    default = None
    for item in str(text).split(","):
        item = item.strip()
        if not item:
            continue
        if "=" in item:
            size_text, value = item.split("=", 1)
            size = parse_size(size_text)
            if size not in sizes:
                raise ValueError(
                    f"{what}: {size_text} is not one of the requested sizes "
                    f"{', '.join(size_name(*s) for s in sizes)}."
                )
            out[size] = convert(value.strip())
        else:
            default = convert(item)
    return {s: out.get(s, default) for s in sizes}


def in_distribution(model_cfg, h: int, w: int) -> bool:
    """A patch grid is in distribution when it has at most `context_size` tokens (the paper's
    split: 256x256, 160x320 and 128x384 are in, 320x320, 224x448 and 160x480 are out)."""
    return h * w <= int(model_cfg.get("context_size", 256))


def rule_of_config(model_cfg) -> str | None:
    """The rule name whose RoPE settings the config trains with (None: plain RoPE)."""
    freqs = model_cfg.get("custom_freqs", "normal")
    if freqs == "normal":
        return None
    decouple = bool(model_cfg.get("decouple", False))
    for name, spec in EXTRAPOLATION_RULES.items():
        if spec["custom_freqs"] == freqs and spec.get("decouple", decouple) == decouple:
            return name
    raise ValueError(f"config.model.custom_freqs={freqs!r} matches no extrapolation rule.")


def resolve_rule(rule: str | None, model_cfg, h: int, w: int) -> str:
    """'auto' (or None) -> the paper's choice: a model trained with a RoPE rule (high-resolution
    post-training) keeps it at every size; otherwise 'none' in distribution and
    'vision-ntk+attn-scale' beyond the training context."""
    if rule not in (None, "auto"):
        if rule not in EXTRAPOLATION_RULES:
            raise ValueError(
                f"Unknown extrapolation rule {rule!r}; choose auto or one of "
                f"{', '.join(EXTRAPOLATION_RULES)}."
            )
        return rule
    trained = rule_of_config(model_cfg)
    if trained is not None:
        return trained
    return "none" if in_distribution(model_cfg, h, w) else "vision-ntk+attn-scale"


# ----------------------------------------------------------------------------- latent vs pixels


def is_latent(config) -> bool:
    """Latent-space config (decode with the VAE) unless `config.latent` says otherwise; the
    default follows the channels: 3 = pixels, anything else = VAE latents."""
    if "latent" in config:
        return bool(config.latent)
    return int(config.model.in_channels) != 3


def size_multiple(config, vae=None) -> int:
    """Pixel sides must be multiples of patch size x VAE downsampling (16 for SD latents).

    The downsampling comes from the loaded VAE, else `config.vae_downsample`, else 8."""
    p = int(config.model.patch_size)
    if not is_latent(config):
        return p
    if vae is not None:
        return p * int(vae.module.downsample_factor)
    return p * int(config.get("vae_downsample", 8))


# ----------------------------------------------------------------------------- devices


def initial_noise(key, ids, n_tokens: int, token_dim: int):
    """x0 (B, n_tokens, token_dim) float32 with sample i drawn from fold_in(key, ids[i]), so an
    image depends on its index and the seed only, not on the batch size or device count."""
    ids = jnp.asarray(ids, jnp.uint32)
    draw = lambda i: jax.random.normal(jax.random.fold_in(key, i), (n_tokens, token_dim))
    return jax.vmap(draw)(ids)


def param_shardings(model: FiT, mesh):
    """NamedShardings of the params on `mesh` from their logical axis names (FSDP / tensor rules
    of the training mesh; replicated on a data-only mesh)."""
    from fitv2_jax.parallel.rules import tree_shardings

    n, d = 4, model.patch_size**2 * model.in_channels

    def init():
        return model.init(
            jax.random.key(0), jnp.zeros((1, n, d)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32),
            jnp.zeros((1, 2, n), jnp.int32), jnp.ones((1, n)), jnp.full((1, 2), 2, jnp.int32),
        )["params"]  # fmt: skip

    return tree_shardings(jax.eval_shape(init), mesh)


def _to_global(x, sharding):
    """A host array (the same on every host) placed as one global array with `sharding`."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def batch_devices(mesh) -> int:
    """How many ways the batch is split: the mesh's data x fsdp axes."""
    return int(mesh.shape["data"] * mesh.shape["fsdp"])


class Sampler:
    """Batch-by-batch image generation on a mesh: the loop shared by sample and evaluate.

        sampler = Sampler(model_cfg, params, mesh, vae=vae, batch_size=32)
        images, nfe = sampler.images(h, w, ids, labels, key, rule="auto", cfg_scale=1.5, ...)

    h, w in patches; ids (B,) global sample indices (they pick each sample's noise), labels
    (B,). The batch is padded up to `batch_size` (a multiple of the data x fsdp device count,
    so one compile serves every batch) with the next indices, then cut back. Returns uint8
    images (B, H, W, 3) numpy and the number of velocity evaluations of the batch.
    """

    def __init__(self, model_cfg, params, mesh, *, vae=None, latent: bool = True, batch_size=16):
        from fitv2_jax.parallel.rules import batch_sharding

        self.model_cfg, self.mesh, self.vae, self.latent = model_cfg, mesh, vae, latent
        if latent and vae is None:
            raise ValueError("A latent-space config needs a VAE to decode samples (--vae).")
        k = batch_devices(mesh)
        self.batch_size = -(-int(batch_size) // k) * k
        self._batch = lambda ndim: batch_sharding(mesh, ndim)
        base = FiT(**dict(model_cfg))
        self.params = jax.tree.map(_to_global, params, param_shardings(base, mesh))

    def tokens(self, h, w, ids, labels, key, *, rule="auto", **opts):
        """(B, h*w, p*p*C) tokens and nfe; opts go to `generate`."""
        ids, labels = np.asarray(ids, np.int64), np.asarray(labels, np.int64)
        n = len(ids)
        if n > self.batch_size:
            raise ValueError(f"{n} samples exceed the batch size {self.batch_size}")
        pad = self.batch_size - n
        ids = np.concatenate([ids, ids.max(initial=-1) + 1 + np.arange(pad)])
        labels = np.concatenate([labels, np.resize(labels, pad)])
        model = model_for_size(self.model_cfg, h, w, resolve_rule(rule, self.model_cfg, h, w))
        p, c = model.patch_size, model.in_channels
        noise_key, sde_key = jax.random.split(key)
        x0 = _to_global(initial_noise(noise_key, ids, h * w, p * p * c), self._batch(3))
        y = _to_global(labels.astype(np.int32), self._batch(1))
        sde_key = jax.random.fold_in(sde_key, int(ids[0]))  # SDE noise per batch
        tokens, nfe = generate(model, self.params, sde_key, y, h, w, x0=x0, **opts)
        if not tokens.is_fully_addressable:  # several hosts: every host gets the whole batch
            from jax.experimental import multihost_utils

            tokens = multihost_utils.process_allgather(tokens, tiled=True)
        return tokens[:n], int(nfe)

    def images(self, h, w, ids, labels, key, **kw):
        tokens, nfe = self.tokens(h, w, ids, labels, key, **kw)
        p = int(self.model_cfg["patch_size"])
        x = tokens_to_images(tokens, h, w, p)
        if self.latent:
            x = self.vae.decode(x)
        return to_uint8(x), nfe
