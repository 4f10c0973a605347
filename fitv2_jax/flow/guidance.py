"""Classifier-free guidance over one batched [cond; uncond] model call.

As the official `forward_with_cfg`: the model runs once on the doubled batch, labels y for the
first half and the null class for the second, and the guided output is
    uncond + s(t) * (cond - uncond)
on the first 3 * p * p output channels only; the other channels keep the conditional output.
Output channels are laid out (c, p1, p2), channel-major, so 3 * p * p channels are the first 3 of
the 4 latent channels: DiT's choice, kept by FiT "for exact reproducibility", and therefore the
default here for official checkpoints. channels="all" guides all p * p * C velocity channels
(the textbook form).

s(t) is constant, or with scale_pow > 0 the power-cosine schedule of MDT:
    s(t) = (cfg - 1) * (1 - cos(pi * (1 - t)^scale_pow)) / 2 + 1,
which is cfg at t = 0 (noise) and falls to 1 at t = 1 (data). interval=(a, b) applies guidance
only where a <= t <= b and returns the conditional output elsewhere; the default None guides at
every t, including t > 1 where the official dopri5 overshoots its last step.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

CHANNEL_MODES = ("official", "all")


def guidance_scale(t: jax.Array, cfg_scale: float, scale_pow: float = 0.0) -> jax.Array:
    """Per-sample guidance scale s(t): (B,) float32. scale_pow 0 means constant cfg_scale."""
    t = jnp.asarray(t, jnp.float32)
    if scale_pow == 0.0:
        return jnp.full_like(t, cfg_scale)
    step = (1.0 - jnp.cos(jnp.pi * (1.0 - jnp.minimum(t, 1.0)) ** scale_pow)) / 2.0
    return (cfg_scale - 1.0) * step + 1.0


def _double(a: jax.Array | None) -> jax.Array | None:
    return None if a is None else jnp.concatenate([a, a], axis=0)


def _check(x, patch_size, in_channels, channels):
    if channels not in CHANNEL_MODES:
        raise ValueError(f"unknown CFG channels mode {channels!r}; choose one of {CHANNEL_MODES}")
    c_vel = patch_size * patch_size * in_channels
    if x.shape[-1] != c_vel:
        raise ValueError(
            f"x has {x.shape[-1]} channels per token, expected patch_size^2 * in_channels = {c_vel}"
        )
    return c_vel


def _run_doubled(model_apply, x, t, y, grid, mask, size, null_label, c_out, learn_sigma):
    """One model call on [x; x] with labels [y; null]: (2B, N, c_out)."""
    labels = jnp.concatenate([y, jnp.full_like(y, null_label)], axis=0)
    out = model_apply(_double(x), _double(t), labels, _double(grid), _double(mask), _double(size))
    if out.shape[-1] != c_out:
        raise ValueError(
            f"model returned {out.shape[-1]} channels per token, expected {c_out} "
            f"(learn_sigma={learn_sigma}; velocity channels = patch_size^2 * in_channels)"
        )
    return out


def _guide(out, t, c_cfg, cfg_scale, scale_pow, interval):
    """Guided first c_cfg channels (B, N, c_cfg) and the in-interval flag (B, 1, 1)."""
    b = out.shape[0] // 2
    cond, uncond = out[:b, ..., :c_cfg], out[b:, ..., :c_cfg]
    s = guidance_scale(t, cfg_scale, scale_pow).astype(out.dtype)[:, None, None]
    guided = uncond + s * (cond - uncond)
    if interval is None:  # everywhere, also at t > 1 where dopri5 overshoots (as official)
        return guided, jnp.ones((b, 1, 1), bool)
    inside = ((t >= interval[0]) & (t <= interval[1]))[:, None, None]
    return jnp.where(inside, guided, cond), inside


def cfg_velocity(
    model_apply: Callable[..., jax.Array],
    x: jax.Array,
    t: jax.Array,
    y: jax.Array,
    grid: jax.Array,
    mask: jax.Array,
    size: jax.Array | None,
    *,
    cfg_scale: float,
    null_label: int,
    channels: str = "official",
    patch_size: int = 2,
    in_channels: int = 4,
    scale_pow: float = 0.0,
    interval: tuple[float, float] | None = None,
    learn_sigma: bool = False,
    full_output: bool = False,
) -> jax.Array:
    """Guided velocity for B samples from one model call on 2B.

    x: (B, N, p*p*C) tokens; t: (B,); y: (B,) int labels; grid: (B, 2, N); mask: (B, N);
    size: (B, n, 2) or None. model_apply(x, t, y, grid, mask, size) -> (2B, N, p*p*C_out).
    Returns (B, N, p*p*C): for learn_sigma models the velocity is the first p*p*C output
    channels (the learned-sigma half is dropped), unless full_output: then (B, N, p*p*C_out),
    the guided epsilon and the conditional sigma channels (FiT v1's DDPM sampler).
    """
    c_vel = _check(x, patch_size, in_channels, channels)
    c_out = 2 * c_vel if learn_sigma else c_vel
    out = _run_doubled(model_apply, x, t, y, grid, mask, size, null_label, c_out, learn_sigma)
    c_cfg = 3 * patch_size * patch_size if channels == "official" else c_vel
    guided, _ = _guide(out, t, c_cfg, cfg_scale, scale_pow, interval)
    b = x.shape[0]
    full = jnp.concatenate([guided, out[:b, ..., c_cfg:]], axis=-1)
    return full if full_output else full[..., :c_vel]


def cfg_velocity_doubled_state(
    model_apply: Callable[..., jax.Array],
    x2: jax.Array,
    t2: jax.Array,
    y: jax.Array,
    grid: jax.Array,
    mask: jax.Array,
    size: jax.Array | None,
    *,
    cfg_scale: float,
    null_label: int,
    channels: str = "official",
    patch_size: int = 2,
    in_channels: int = 4,
    scale_pow: float = 0.0,
    interval: tuple[float, float] | None = None,
    learn_sigma: bool = False,
) -> jax.Array:
    """The official layout: the solver state is [x; ghost] (2B, N, p*p*C), started as [z; z].

    The model sees [x; x] (the ghost half is never read) and the returned velocity is
    [guided + cond rest; guided + uncond rest], as the official forward_with_cfg returns it. The
    first half is what `cfg_velocity` gives; the ghost only matters to adaptive solvers, whose
    error norm runs over the whole state: use this to reproduce the official dopri5 steps
    exactly, then keep the first B samples. y, grid, mask, size: for the B real samples.
    """
    b = x2.shape[0] // 2
    c_vel = _check(x2, patch_size, in_channels, channels)
    c_out = 2 * c_vel if learn_sigma else c_vel
    x, t = x2[:b], t2[:b]
    out = _run_doubled(model_apply, x, t, y, grid, mask, size, null_label, c_out, learn_sigma)
    c_cfg = 3 * patch_size * patch_size if channels == "official" else c_vel
    guided, inside = _guide(out, t, c_cfg, cfg_scale, scale_pow, interval)
    ghost = jnp.where(inside, guided, out[b:, ..., :c_cfg])
    head = jnp.concatenate([guided, ghost], axis=0)
    return jnp.concatenate([head, out[..., c_cfg:]], axis=-1)[..., :c_vel]


def make_velocity_fn(
    model_apply: Callable[..., jax.Array],
    y: jax.Array,
    grid: jax.Array,
    mask: jax.Array,
    size: jax.Array | None = None,
    *,
    cfg_scale: float = 1.0,
    null_label: int = 1000,
    patch_size: int = 2,
    in_channels: int = 4,
    learn_sigma: bool = False,
    doubled_state: bool = False,
    full_output: bool = False,
    **cfg_opts,
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """velocity_fn(x, t) for the solvers: guided when cfg_scale > 1, else one conditional call.

    Like the official sampler, guidance is switched off entirely (no doubled batch) at scale 1.
    doubled_state=True: the solver state is (2B, ...) as in the official sampler, see
    `cfg_velocity_doubled_state` (start from [z; z], keep [:B]); ignored at scale 1.
    full_output=True: every output channel (epsilon and learned sigma, for DDPM), see
    `cfg_velocity`.
    """
    c_vel = patch_size * patch_size * in_channels
    if cfg_scale == 1.0:
        keep = None if full_output else c_vel
        return lambda x, t: model_apply(x, t, y, grid, mask, size)[..., :keep]
    if full_output:
        cfg_opts["full_output"] = True
    fn = cfg_velocity_doubled_state if doubled_state else cfg_velocity
    opts = dict(
        cfg_scale=cfg_scale,
        null_label=null_label,
        patch_size=patch_size,
        in_channels=in_channels,
        learn_sigma=learn_sigma,
        **cfg_opts,
    )
    return lambda x, t: fn(model_apply, x, t, y, grid, mask, size, **opts)
