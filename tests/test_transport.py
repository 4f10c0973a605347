"""The training objective against analytic answers: path, timesteps, masked loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats

from fitv2_jax.flow import transport


def test_linear_path_sit_convention():
    x0, x1 = jnp.full((3, 2, 4), -1.0), jnp.full((3, 2, 4), 3.0)
    t = jnp.array([0.0, 0.25, 1.0])
    xt = transport.interpolate(x0, x1, t)
    # t = 0 is noise, t = 1 is data, linear in between (per sample)
    np.testing.assert_allclose(xt[:, 0, 0], [-1.0, 0.0, 3.0])
    np.testing.assert_allclose(transport.velocity_target(x0, x1), 4.0)


@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (0.5, 1.4)])
def test_logit_normal_quantiles(mean, std):
    n = 200_000
    t = np.asarray(transport.sample_timesteps(jax.random.key(0), (n,), "logit_normal", mean, std))
    assert t.min() > 0 and t.max() < 1
    p = np.array([0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99])
    analytic = special.expit(mean + std * stats.norm.ppf(p))  # t = sigmoid(u) is monotone
    # Standard error of an empirical p-quantile: sqrt(p (1 - p) / n) / density(q); the density
    # of t at q is phi(z) / (std q (1 - q)) with z the normal score. Allow 5 standard errors.
    z = stats.norm.ppf(p)
    density = stats.norm.pdf(z) / (std * analytic * (1 - analytic))
    se = np.sqrt(p * (1 - p) / n) / density
    np.testing.assert_array_less(np.abs(np.quantile(t, p) - analytic), 5 * se)
    # and the whole distribution: Kolmogorov-Smirnov against the analytic CDF
    cdf = lambda q: stats.norm.cdf((special.logit(q) - mean) / std)
    assert stats.kstest(t, cdf).pvalue > 1e-3


def test_uniform_timesteps_and_bad_kind():
    t = np.asarray(transport.sample_timesteps(jax.random.key(1), (100_000,), "uniform"))
    assert stats.kstest(t, "uniform").pvalue > 1e-3
    with pytest.raises(ValueError, match="unknown timestep kind"):
        transport.sample_timesteps(jax.random.key(1), (4,), "cosine")


def _mask(lengths, n):
    return (np.arange(n)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)


def test_masked_loss_is_the_mean_over_valid_tokens():
    rng = np.random.default_rng(0)
    b, n, c = 3, 6, 4
    pred, target = rng.normal(size=(2, b, n, c)).astype(np.float32)
    mask = _mask([6, 2, 4], n)
    loss = np.asarray(transport.masked_loss(pred, target, mask))
    # hand oracle: mean of squared errors over the valid tokens and all channels of each sample
    for i, length in enumerate([6, 2, 4]):
        want = np.mean((pred[i, :length] - target[i, :length]) ** 2)
        np.testing.assert_allclose(loss[i], want, rtol=1e-6)
    # the official form mean_{N,C}(((v - u) * mask)^2) * N / N_valid gives the same numbers
    official = np.mean(((pred - target) * mask[..., None]) ** 2, axis=(1, 2)) * n / mask.sum(1)
    np.testing.assert_allclose(loss, official, rtol=1e-6)


def test_padded_tokens_change_nothing():
    rng = np.random.default_rng(1)
    pred, target = rng.normal(size=(2, 2, 5, 3)).astype(np.float32)
    mask = _mask([3, 1], 5)
    base = transport.masked_loss(pred, target, mask)
    pad = mask[..., None] == 0
    pred2 = np.where(pad, 1e6, pred)
    target2 = np.where(pad, -7.0, target)
    np.testing.assert_array_equal(transport.masked_loss(pred2, target2, mask), base)


def test_flow_matching_loss_targets_and_sample_weighting():
    # A model that knows x1 can recover x0 = (x_t - t x1) / (1 - t) and so return the exact
    # target x1 - x0 plus a chosen offset d: the loss must then be mean_valid(d^2) per sample,
    # averaged over samples with equal weight (not over tokens). A flipped time convention or a
    # wrong target would not give this.
    b, n, c = 2, 8, 4
    x1 = jax.random.normal(jax.random.key(2), (b, n, c))
    mask = jnp.asarray(_mask([8, 2], n))
    d = jnp.concatenate([jnp.full((1, n, c), 0.5), jnp.full((1, n, c), 2.0)])
    d = jnp.where(mask[..., None] > 0, d, 100.0)  # garbage on padding must not count

    def model_fn(xt, t):
        t = t[:, None, None]
        x0 = (xt - t * x1) / (1 - t)
        return x1 - x0 + d

    loss, aux = transport.flow_matching_loss(jax.random.key(3), model_fn, x1, mask)
    np.testing.assert_allclose(aux["loss_per_sample"], [0.25, 4.0], rtol=2e-3)
    # equal sample weights: (0.25 + 4) / 2, not the token-weighted (8 * 0.25 + 2 * 4) / 10
    np.testing.assert_allclose(loss, 2.125, rtol=2e-3)
    assert aux["t"].shape == (b,)
    with pytest.raises(ValueError, match="model_fn returned"):
        transport.flow_matching_loss(jax.random.key(3), lambda x, t: x[..., :2], x1, mask)
