"""The rectified-flow training objective: linear path, timestep samplers, masked loss.

SiT convention, as the official FiTv2 code: x_t = t * x1 + (1 - t) * x0 with x0 ~ N(0, I) noise
and x1 data, so t = 0 is pure noise and t = 1 is data, and the regression target is the constant
velocity x1 - x0. Tokens are (B, N, C) with a 0/1 mask (B, N) marking the real (unpadded) tokens.
No loss weighting, no time epsilon (the official train_eps is 0 for a velocity model on this path).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

TIMESTEP_KINDS = ("logit_normal", "uniform")


def sample_timesteps(
    key: jax.Array,
    shape: tuple[int, ...],
    kind: str = "logit_normal",
    mean: float = 0.0,
    std: float = 1.0,
) -> jax.Array:
    """Training times t in (0, 1), float32 of `shape`.

    kind: "logit_normal" -> t = sigmoid(u), u ~ N(mean, std^2) (FiTv2 uses mean 0, std 1);
          "uniform" -> t ~ U[0, 1).
    """
    if kind == "logit_normal":
        u = mean + std * jax.random.normal(key, shape, jnp.float32)
        return jax.nn.sigmoid(u)
    if kind == "uniform":
        return jax.random.uniform(key, shape, jnp.float32)
    raise ValueError(f"unknown timestep kind {kind!r}; choose one of {TIMESTEP_KINDS}")


def _per_sample(t: jax.Array, x: jax.Array) -> jax.Array:
    """t: (B,) -> (B, 1, ..., 1) broadcastable against x: (B, ...)."""
    t = jnp.asarray(t, x.dtype)
    return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def interpolate(x0: jax.Array, x1: jax.Array, t: jax.Array) -> jax.Array:
    """x_t = t * x1 + (1 - t) * x0.  x0, x1: (B, ...); t: (B,) (or a scalar)."""
    t = _per_sample(t, x1)
    return t * x1 + (1.0 - t) * x0


def velocity_target(x0: jax.Array, x1: jax.Array) -> jax.Array:
    """d x_t / dt along the linear path: x1 - x0 (independent of t)."""
    return x1 - x0


def masked_loss(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
    """Per-sample squared error averaged over the valid tokens and all channels: (B,).

    pred, target: (B, N, C); mask: (B, N) of 0/1. Equals the official
    mean_{N,C}(((pred - target) * mask)^2) * N / N_valid, i.e. sum_valid / (N_valid * C), so
    padded tokens contribute nothing and every sample weighs the same whatever its length.
    Computed in float32. A sample without any valid token gets loss 0 (the official code would
    divide by zero there).
    """
    err = (pred.astype(jnp.float32) - target.astype(jnp.float32)) * mask[..., None]
    sq = jnp.sum(jnp.square(err), axis=tuple(range(1, err.ndim)))
    n_valid = jnp.sum(mask.astype(jnp.float32) != 0, axis=-1)
    return sq / (jnp.maximum(n_valid, 1.0) * pred.shape[-1])


def flow_matching_loss(
    key: jax.Array,
    model_fn: Callable[[jax.Array, jax.Array], jax.Array],
    x1: jax.Array,
    mask: jax.Array,
    *,
    time_kind: str = "logit_normal",
    time_mean: float = 0.0,
    time_std: float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """One Monte-Carlo estimate of the rectified-flow loss for a batch of data tokens.

    key: PRNG key (split here into the time and the noise draw); x1: (B, N, C) data tokens;
    mask: (B, N); model_fn(x_t, t) -> predicted velocity (B, N, C) with t: (B,).
    Returns the batch mean of the per-sample masked losses (the official `loss.mean()`) and
    aux {"loss_per_sample": (B,), "t": (B,)}.
    """
    key_t, key_noise = jax.random.split(key)
    t = sample_timesteps(key_t, x1.shape[:1], time_kind, time_mean, time_std)
    x0 = jax.random.normal(key_noise, x1.shape, x1.dtype)
    x_t = interpolate(x0, x1, t)
    pred = model_fn(x_t, t)
    if pred.shape != x1.shape:
        raise ValueError(f"model_fn returned {pred.shape}, expected the data shape {x1.shape}")
    per_sample = masked_loss(pred, velocity_target(x0, x1), mask)
    return jnp.mean(per_sample), {"loss_per_sample": per_sample, "t": t}
