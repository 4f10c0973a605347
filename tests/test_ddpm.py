"""FiT v1's DDPM: respaced schedule and sampler against a float64 numpy oracle written from the
formulas, the sampler against a closed-form Gaussian, the training loss against the formulas,
and v1 end to end through the sample command and a training step."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli import error_line, run_cli

from fitv2_jax.config.files import load_config
from fitv2_jax.flow import ddpm
from fitv2_jax.training.setup import build_setup

V1_TINY = ["--config", "configs/fit_xl.py", "--config.model.hidden_size=64",
           "--config.model.depth=2", "--config.model.num_heads=4", "--config.latent=false",
           "--config.model.in_channels=3", "--config.model.patch_size=16",
           "--config.model.num_classes=10"]  # fmt: skip


def _oracle_schedule(n=1000, k=250):
    """Respacing from the definitions: the kept steps of one evenly strided section, betas
    1 - abar_i / abar_(previous kept), and the posterior of q(x_(t-1) | x_t, x_0)."""
    base = np.linspace(1e-4, 0.02, n)  # 1000 steps: the linear schedule unscaled
    abar = np.cumprod(1 - base)
    kept, cur = [], 0.0
    for _ in range(k):
        kept.append(round(cur))
        cur += (n - 1) / (k - 1)
    abar_k = abar[kept]
    betas = 1 - abar_k / np.concatenate([[1.0], abar_k[:-1]])
    abar_prev = np.concatenate([[1.0], abar_k[:-1]])
    post_var = betas * (1 - abar_prev) / (1 - abar_k)
    return dict(kept=np.array(kept), betas=betas, abar=abar_k, abar_prev=abar_prev,
                post_var=post_var)  # fmt: skip


def test_respaced_schedule_matches_the_definitions():
    s, o = ddpm.make_schedule(1000, 250), _oracle_schedule()
    assert s.num_steps == 250 and s.timestep_map[0] == 0 and s.timestep_map[-1] == 999
    np.testing.assert_array_equal(s.timestep_map, o["kept"])
    np.testing.assert_allclose(s.betas, o["betas"], rtol=1e-12)
    np.testing.assert_allclose(s.alphas_cumprod, o["abar"], rtol=1e-12)
    clipped = np.log(np.concatenate([o["post_var"][1:2], o["post_var"][1:]]))
    np.testing.assert_allclose(s.posterior_log_variance_clipped, clipped, rtol=1e-12)
    full = ddpm.make_schedule(1000)
    np.testing.assert_allclose(full.betas, np.linspace(1e-4, 0.02, 1000), rtol=1e-12)
    with pytest.raises(ValueError, match="1 to 1000 steps"):
        ddpm.make_schedule(1000, 0)


def _toy_model(x, t):
    """A fixed smooth eps / v field of x and t (the same in jax and numpy)."""
    return jnp.concatenate([0.3 * jnp.sin(x + t[:, None, None] / 300.0), jnp.tanh(x)], -1)


def test_sampler_equals_the_numpy_oracle_on_the_same_noise():
    s, o = ddpm.make_schedule(1000, 20), _oracle_schedule(1000, 20)
    rng = np.random.default_rng(0)
    x_T = rng.standard_normal((3, 5, 2)).astype(np.float32)
    noises = rng.standard_normal((20, 3, 5, 2)).astype(np.float32)
    got, nfe = ddpm.ddpm_sample(_toy_model, jnp.asarray(x_T), s, None,
                                noise_fn=lambda i, shape: jnp.asarray(noises)[i])  # fmt: skip
    x = x_T.astype(np.float64)
    for i in range(19, -1, -1):
        t = np.full(3, o["kept"][i], np.float64)
        eps = 0.3 * np.sin(x + t[:, None, None] / 300.0)
        v = np.tanh(x)
        x0 = np.sqrt(1 / o["abar"][i]) * x - np.sqrt(1 / o["abar"][i] - 1) * eps
        mean = (o["betas"][i] * np.sqrt(o["abar_prev"][i]) / (1 - o["abar"][i]) * x0
                + (1 - o["abar_prev"][i]) * np.sqrt(1 - o["betas"][i]) / (1 - o["abar"][i]) * x)  # fmt: skip
        min_log = np.log(o["post_var"][max(i, 1)])
        log_var = (v + 1) / 2 * np.log(o["betas"][i]) + (1 - v) / 2 * min_log
        x = mean + (i > 0) * np.exp(0.5 * log_var) * noises[i]
    assert int(nfe) == 20
    np.testing.assert_allclose(np.asarray(got), x, rtol=2e-4, atol=2e-5)


def test_sampler_on_gaussian_data_has_the_closed_form_output_variance():
    """Data N(0, sigma^2): the exact eps predictor is linear, k_t x_t with
    k_t = sqrt(1-abar) / (abar sigma^2 + 1-abar), so with a constant v every ancestral step is
    x <- c_i x + s_i z and the output variance follows var <- c_i^2 var + s_i^2 (float64)."""
    s, sigma2, v = ddpm.make_schedule(1000, 50), 0.25, 0.3
    abar = s.alphas_cumprod
    k = np.sqrt(1 - abar) / (abar * sigma2 + 1 - abar)
    c = s.posterior_mean_coef1 * (s.sqrt_recip_alphas_cumprod - s.sqrt_recipm1_alphas_cumprod * k)
    c = c + s.posterior_mean_coef2
    log_var = (v + 1) / 2 * np.log(s.betas) + (1 - v) / 2 * s.posterior_log_variance_clipped
    var = 1.0
    for i in range(s.num_steps - 1, -1, -1):
        var = c[i] ** 2 * var + (np.exp(log_var[i]) if i > 0 else 0.0)
    index = np.zeros(1000, np.int32)
    index[s.timestep_map] = np.arange(s.num_steps)
    kk, idx = jnp.asarray(k, jnp.float32), jnp.asarray(index)

    def exact(x, t):
        kt = kk[idx[t.astype(jnp.int32)]][:, None, None]
        return jnp.concatenate([kt * x, jnp.full_like(x, v)], -1)

    x_T = jax.random.normal(jax.random.key(0), (16384, 1, 4))
    x, _ = jax.jit(lambda x: ddpm.ddpm_sample(exact, x, s, jax.random.key(1)))(x_T)
    assert 0.2 < var < 0.3  # near the data variance, not equal (50 coarse steps)
    assert float(jnp.var(x)) == pytest.approx(var, rel=0.025)  # ~4.5 sampling sigmas
    assert abs(float(jnp.mean(x))) < 0.01


def test_training_loss_is_mse_plus_the_bound_with_the_mean_frozen():
    s = ddpm.make_schedule(1000)
    rng = np.random.default_rng(3)
    x0, noise = (jnp.asarray(rng.standard_normal((2, 6, 3)), jnp.float32) for _ in range(2))
    out = jnp.asarray(rng.standard_normal((2, 6, 6)) * 0.5, jnp.float32)
    mask = jnp.asarray([[1, 1, 1, 1, 0, 0], [1] * 6], jnp.float32)
    out = out * mask[..., None]
    t = jnp.asarray([0, 500])
    x_t = ddpm.q_sample(x0, noise, t, s)
    got = ddpm.ddpm_loss(out, x0, x_t, noise, t, mask, s)
    # oracle from the formulas, float64: ratio = N / N_valid on both terms
    ratio = np.array([6 / 4, 1.0])
    o, xs, xt, nz = (np.asarray(a, np.float64) for a in (out, x0, x_t, noise))
    mse = np.mean((nz * np.asarray(mask)[..., None] - o[..., :3]) ** 2, axis=(1, 2)) * ratio
    ab, b = s.alphas_cumprod[[0, 500]], s.betas[[0, 500]]
    abp = np.append(1.0, s.alphas_cumprod[:-1])[[0, 500]]
    r = lambda a: a[:, None, None]  # noqa: E731
    x0_pred = np.sqrt(1 / r(ab)) * xt - np.sqrt(1 / r(ab) - 1) * o[..., :3]
    c1, c2 = r(b * np.sqrt(abp) / (1 - ab)), r((1 - abp) * np.sqrt(1 - b) / (1 - ab))
    mean, true_mean = c1 * x0_pred + c2 * xt, c1 * xs + c2 * xt
    lv_min = r(s.posterior_log_variance_clipped[[0, 500]])
    log_var = (o[..., 3:] + 1) / 2 * np.log(r(b)) + (1 - o[..., 3:]) / 2 * lv_min
    kl = 0.5 * (-1 + log_var - lv_min + np.exp(lv_min - log_var) + (true_mean - mean) ** 2
                * np.exp(-log_var))  # fmt: skip
    kl = kl.mean(axis=(1, 2)) / np.log(2)
    assert float(got[1]) == pytest.approx(mse[1] + kl[1] * ratio[1], rel=1e-4)
    assert np.isfinite(float(got[0])) and float(got[0]) > mse[0]  # step 0: the decoder NLL
    # the bound trains only the variance: its gradient reaches the v channels, not eps
    g = jax.grad(
        lambda o: (
            ddpm.ddpm_loss(o, x0, x_t, noise, t, mask, s).sum()
            - jnp.sum(jnp.mean((noise * mask[..., None] - o[..., :3]) ** 2, axis=(1, 2)) * ratio)
        )
    )(out)
    np.testing.assert_allclose(np.asarray(g[..., :3]), 0, atol=1e-7)
    assert float(jnp.abs(g[..., 3:]).max()) > 0


def test_v1_config_samples_with_ddpm_and_refuses_flow_solvers(tmp_path):
    out = tmp_path / "v1"
    run_cli("sample", *V1_TINY, "--random_init", "--num_steps", "5", "--num_samples", "2",
            "--sizes", "32x32", "--out", out, "--nopng")  # fmt: skip
    info = json.load(open(out / "sample_info.json"))
    assert info["method"] == "ddpm" and info["num_steps"] == 5
    assert info["sizes"]["32x32"]["nfe_per_batch"] == [5]
    with np.load(out / "32x32" / "samples_32x32.npz") as f:
        assert f["arr_0"].shape == (2, 32, 32, 3)
    proc = run_cli("sample", *V1_TINY, "--random_init", "--solver", "euler", check=False)
    assert "DDPM (FiT v1): use --solver ddpm" in error_line(proc)


def test_v1_trains_with_the_ddpm_loss(tmp_path):
    config = load_config("configs/fit_xl.py", [a.removeprefix("--config.") for a in V1_TINY[2:]])
    config.model.patch_size, config.model.context_size = 2, 16
    setup = build_setup(config, global_batch=8)
    state = setup.init_state(jax.random.key(0))
    rng = np.random.default_rng(0)
    batch = dict(x=rng.standard_normal((8, 16, 12)).astype(np.float32),
                 grid=np.tile(np.stack(np.meshgrid(np.arange(4), np.arange(4))).reshape(2, 16),
                              (8, 1, 1)).astype(np.int32),
                 mask=np.ones((8, 16), np.float32), y=np.arange(8, dtype=np.int32) % 10,
                 size=np.full((8, 2), 4, np.int32))  # fmt: skip
    with setup.context():
        state, metrics = setup.step(state, batch)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
