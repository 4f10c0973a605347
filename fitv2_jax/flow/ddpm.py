"""FiT v1's diffusion: improved-diffusion's Gaussian DDPM with learned sigma, for sampling and
training (the official v1 code runs `create_diffusion` of DiT/improved-diffusion).

    schedule = make_schedule(num_train_steps=1000, respacing=250)   # linear betas, 250 steps
    x, nfe = ddpm_sample(model_fn, x_T, schedule, key)               # ancestral, no clipping
    loss = ddpm_loss(out, x_start, x_t, noise, t, mask, schedule)     # MSE + VB (bits)

The model predicts epsilon (its first D output channels) and a variance interpolation v (the last
D), LEARNED_RANGE: log var = f log(beta_t) + (1 - f) log(posterior var_t), f = (v + 1) / 2.
Respacing keeps the steps `space_timesteps` picks and recomputes betas from the kept cumulative
alphas; the model is called with the original step index (0..999) of each kept step. Arrays are
computed in float64 with numpy, then each coefficient is used in float32 (as the official code
extracts them into float32 tensors).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fitv2_jax.utils.errors import UserError


def linear_betas(num_steps: int) -> np.ndarray:
    """improved-diffusion's "linear" schedule, scaled to keep the same total noise."""
    scale = 1000 / num_steps
    return np.linspace(scale * 0.0001, scale * 0.02, num_steps, dtype=np.float64)


def space_timesteps(num_steps: int, count: int) -> list[int]:
    """The `count` steps of one section kept from `num_steps` (improved-diffusion's rounding of
    an accumulated fractional stride), sorted."""
    if not 1 <= count <= num_steps:
        raise UserError(f"--num_steps {count}: DDPM respacing takes 1 to {num_steps} steps")
    stride = 1 if count <= 1 else (num_steps - 1) / (count - 1)
    taken, cur = [], 0.0
    for _ in range(count):
        taken.append(round(cur))
        cur += stride
    return sorted(set(taken))


@dataclasses.dataclass(frozen=True, eq=False)
class DDPMSchedule:
    """Per kept step i (0 = least noisy): betas and the posterior / prediction coefficients."""

    timestep_map: np.ndarray  # (K,) original step index of kept step i
    betas: np.ndarray
    alphas_cumprod: np.ndarray
    sqrt_alphas_cumprod: np.ndarray
    sqrt_one_minus_alphas_cumprod: np.ndarray
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray
    posterior_log_variance_clipped: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray

    @property
    def num_steps(self) -> int:
        return len(self.betas)


def make_schedule(num_train_steps: int = 1000, respacing: int | None = None) -> DDPMSchedule:
    """The (respaced) schedule; respacing None keeps every training step."""
    base = linear_betas(num_train_steps)
    kept = space_timesteps(num_train_steps, num_train_steps if respacing is None else respacing)
    base_cumprod = np.cumprod(1.0 - base)
    betas, last = [], 1.0
    for i in kept:
        betas.append(1 - base_cumprod[i] / last)
        last = base_cumprod[i]
    betas = np.asarray(betas, np.float64)
    ac = np.cumprod(1.0 - betas)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    return DDPMSchedule(
        timestep_map=np.asarray(kept, np.int64),
        betas=betas,
        alphas_cumprod=ac,
        sqrt_alphas_cumprod=np.sqrt(ac),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1),
        # the first posterior variance is 0: the clipped log uses the second one there
        posterior_log_variance_clipped=np.log(np.append(post_var[1], post_var[1:])),
        posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
        posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(1.0 - betas) / (1.0 - ac),
    )


def _at(arr: np.ndarray, i) -> jax.Array:
    """arr[i] in float32, broadcast over (B, N, D) for a scalar or (B,) step index."""
    v = jnp.asarray(arr, jnp.float32)[i]
    return v if jnp.ndim(v) == 0 else v[:, None, None]


def q_sample(x_start, noise, i, s: DDPMSchedule):
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise."""
    return _at(s.sqrt_alphas_cumprod, i) * x_start + _at(s.sqrt_one_minus_alphas_cumprod, i) * noise


def q_posterior(x_start, x_t, i, s: DDPMSchedule):
    """Mean and clipped log variance of q(x_{t-1} | x_t, x_0)."""
    mean = _at(s.posterior_mean_coef1, i) * x_start + _at(s.posterior_mean_coef2, i) * x_t
    return mean, jnp.broadcast_to(_at(s.posterior_log_variance_clipped, i), x_t.shape)


def p_mean_variance(out, x_t, i, s: DDPMSchedule):
    """Model output (..., 2D) = [eps, v] -> mean, log variance and x_0 of p(x_{t-1} | x_t)."""
    d = x_t.shape[-1]
    eps, v = out[..., :d], out[..., d:]
    min_log = _at(s.posterior_log_variance_clipped, i)
    max_log = _at(np.log(s.betas), i)
    frac = (v + 1) / 2
    log_var = frac * max_log + (1 - frac) * min_log
    x0 = _at(s.sqrt_recip_alphas_cumprod, i) * x_t - _at(s.sqrt_recipm1_alphas_cumprod, i) * eps
    mean, _ = q_posterior(x0, x_t, i, s)
    return mean, log_var, x0


def ddpm_sample(model_fn: Callable, x_T, s: DDPMSchedule, key, noise_fn: Callable | None = None):
    """Ancestral sampling from x_T over every kept step, no clipping (the official v1 sampler).

    model_fn(x, t) -> (B, N, 2D) with t (B,) float32 original step indices. noise_fn(i, shape)
    gives step i's noise (default: normal from fold_in(key, i)). Returns (x_0, nfe).
    """
    steps = jnp.asarray(s.timestep_map, jnp.float32)
    noise_fn = noise_fn or (lambda i, shape: jax.random.normal(jax.random.fold_in(key, i), shape))

    def body(k, x):
        i = s.num_steps - 1 - k
        out = model_fn(x, jnp.full((x.shape[0],), steps[i], jnp.float32))
        mean, log_var, _ = p_mean_variance(out, x, i, s)
        noise = noise_fn(i, x.shape).astype(x.dtype)
        return mean + (i > 0).astype(x.dtype) * jnp.exp(0.5 * log_var) * noise

    x = jax.lax.fori_loop(0, s.num_steps, body, x_T.astype(jnp.float32))
    return x, jnp.int32(s.num_steps)


def normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))  # fmt: skip


def _approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + jnp.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log p(x) of a Gaussian integrated over x's 8-bit bin ([-1, 1] data, 255 steps)."""
    centered, inv_stdv = x - means, jnp.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus,
                     jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))  # fmt: skip


def ddpm_loss(out, x_start, x_t, noise, i, mask, s: DDPMSchedule):
    """The official v1 loss per sample: MSE(eps) + the variational bound in bits, both means
    over all tokens times N / N_valid (`get_flexible_mask_and_ratio`); the bound sees the mean
    prediction frozen, so it trains only the variance, and is the decoder NLL at step 0.

    out: (B, N, 2D) model output (zero on padding, as the model masks it); x_start, x_t, noise:
    (B, N, D); i: (B,) kept-step indices; mask: (B, N). Returns (B,).
    """
    d = x_start.shape[-1]
    m = mask[..., None].astype(out.dtype)
    ratio = mask.shape[-1] / jnp.maximum(jnp.sum(mask != 0, axis=-1), 1)
    mse = jnp.mean((noise * m - out[..., :d]) ** 2, axis=(1, 2)) * ratio
    frozen = jnp.concatenate([jax.lax.stop_gradient(out[..., :d]), out[..., d:]], axis=-1)
    true_mean, true_log_var = q_posterior(x_start, x_t, i, s)
    mean, log_var, _ = p_mean_variance(frozen, x_t, i, s)
    kl = jnp.mean(normal_kl(true_mean, true_log_var, mean, log_var), axis=(1, 2)) / np.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x_start, mean, 0.5 * log_var)
    nll = jnp.mean(nll, axis=(1, 2)) / np.log(2.0)
    return mse + jnp.where(i == 0, nll, kl) * ratio
