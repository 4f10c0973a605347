"""Solvers against analytic oracles: data from a known Gaussian / Gaussian mixture.

For data x1 ~ N(mu, S) and noise x0 ~ N(0, I) on the path x_t = t x1 + (1 - t) x0 the marginal is
p_t = N(t mu, A_t) with A_t = t^2 S + (1 - t)^2 I, the exact velocity E[x1 - x0 | x_t = x] is
    v(x, t) = mu + (t S - (1 - t) I) A_t^{-1} (x - t mu),
and its flow maps each noise sample deterministically to x1 = mu + S^{1/2} x0 (S^{1/2} the
symmetric root): a per-sample exact answer, so solver errors are measured without sampling noise.
For a mixture sum_k pi_k N(m_k, s_k^2 I) the velocity is the posterior-weighted sum of the
component fields. Tokens are (B, N, C): every token is an independent C = 4 dimensional sample.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fitv2_jax.flow import solvers

C = 4
MU = np.array([1.0, -0.5, 0.3, 2.0])
EIG = np.array([0.04, 0.25, 1.0, 2.25])  # std 0.2 ... 1.5: a narrow direction makes t -> 1 stiff
Q = np.linalg.qr(np.arange(1.0, 17.0).reshape(4, 4) ** 0.5 + np.eye(4))[0]
SIGMA = Q @ np.diag(EIG) @ Q.T
SQRT_SIGMA = Q @ np.diag(np.sqrt(EIG)) @ Q.T


def v_gauss(x, t):
    """Exact velocity for N(MU, SIGMA), evaluated in the eigenbasis of SIGMA (float32)."""
    t = t.reshape(-1, *([1] * (x.ndim - 1)))
    q, lam, mu = jnp.asarray(Q, x.dtype), jnp.asarray(EIG, x.dtype), jnp.asarray(MU, x.dtype)
    y = (x - t * mu) @ q
    y = y * (t * lam - (1 - t)) / (t**2 * lam + (1 - t) ** 2)
    return mu + y @ q.T


PI = np.array([0.5, 0.3, 0.2])
M = np.array([[2.0, 0.0, 0.0, 1.0], [-2.0, 1.0, 0.0, 0.0], [0.0, -2.0, 1.0, -1.0]])
S = np.array([0.3, 0.5, 0.4])
MIX_MEAN = PI @ M
MIX_COV = sum(
    p * (s**2 * np.eye(C) + np.outer(m, m)) for p, m, s in zip(PI, M, S, strict=True)
) - np.outer(MIX_MEAN, MIX_MEAN)


def v_mix(x, t):
    """Exact velocity for the mixture: responsibilities under p_t times component fields."""
    t = t.reshape(-1, *([1] * (x.ndim - 1)))[..., None]  # (B, 1, 1, 1) against (B, N, K, C)
    m, s2 = jnp.asarray(M, x.dtype), jnp.asarray(S**2, x.dtype)[:, None]
    var = t**2 * s2 + (1 - t) ** 2  # (B, 1, K, 1)
    d = x[..., None, :] - t * m  # (B, N, K, C)
    logw = jnp.log(jnp.asarray(PI, x.dtype))[:, None] - 0.5 * C * jnp.log(var)
    logw = logw - 0.5 * jnp.sum(d**2, -1, keepdims=True) / var
    w = jax.nn.softmax(logw, axis=-2)
    return jnp.sum(w * (m + (t * s2 - (1 - t)) / var * d), axis=-2)


def noise(seed, batch, tokens=8):
    return jax.random.normal(jax.random.key(seed), (batch, tokens, C), jnp.float32)


def exact_gauss(x0):
    return MU + np.asarray(x0, np.float64) @ SQRT_SIGMA


def max_err(x, x0):
    return float(np.max(np.abs(np.asarray(x, np.float64) - exact_gauss(x0))))


def moments(x):
    x = np.asarray(x, np.float64).reshape(-1, C)
    return x.mean(0), np.cov(x, rowvar=False), x.shape[0]


def assert_moments(x, mean, cov, bias=0.0):
    """Sample mean/cov within 5 standard errors (+ a stated discretisation budget) of the truth.

    SE(mean_i) = sqrt(cov_ii / n); SE(cov_ij) = sqrt((cov_ii cov_jj + cov_ij^2) / n) for
    Gaussian-like data. 5 SE leaves a ~1e-6 chance per entry of a false alarm for a correct
    solver, while a wrong drift (a sign, a missing score term) moves the moments by O(1).
    """
    m, c, n = moments(x)
    d = np.sqrt(np.diag(cov))
    np.testing.assert_array_less(np.abs(m - mean), 5 * d / np.sqrt(n) + bias)
    se_cov = np.sqrt((np.outer(d**2, d**2) + cov**2) / n)
    np.testing.assert_array_less(np.abs(c - cov), 5 * se_cov + bias)


def test_oracle_velocity_is_the_flow_of_the_gaussian_path():
    # d/dt [t mu + A_t^{1/2} x0] must equal v at that point: check by central differences.
    x0 = np.asarray(noise(0, 4))
    for t in (0.1, 0.5, 0.9):
        h = 1e-4
        xt = lambda s: s * MU + x0 @ (Q @ np.diag(np.sqrt(s**2 * EIG + (1 - s) ** 2)) @ Q.T)
        fd = (xt(t + h) - xt(t - h)) / (2 * h)
        v = v_gauss(jnp.asarray(xt(t), jnp.float32), jnp.full((4,), t))
        np.testing.assert_allclose(v, fd, atol=2e-4)


def test_euler_first_order_heun_second_order():
    x0 = noise(0, 64)
    e = [max_err(solvers.euler(v_gauss, x0, n)[0], x0) for n in (32, 64, 128)]
    h = [max_err(solvers.heun(v_gauss, x0, n)[0], x0) for n in (32, 64, 128)]
    # Global error C/N (Euler) and C/N^2 (Heun): doubling N divides it by 2 and 4. Measured
    # ratios are 1.98-1.99 and 3.8-3.9 (still approaching 4); the bands leave a margin of 10%.
    for a, b in zip(e[:-1], e[1:], strict=True):
        assert 1.8 < a / b < 2.2, e
    for a, b in zip(h[:-1], h[1:], strict=True):
        assert 3.5 < a / b < 4.4, h


# one compiled dopri5 for every tolerance (atol/rtol are traced, not baked into the program)
dopri5_gauss = jax.jit(lambda z, atol=1e-6, rtol=1e-3: solvers.dopri5(v_gauss, z, atol, rtol))


def test_dopri5_tolerance_and_cost_versus_euler():
    x0 = noise(1, 64)
    exact = exact_gauss(x0)
    errs = []
    for atol, rtol in ((1e-7, 1e-4), (1e-8, 1e-5)):
        x, nfe = dopri5_gauss(x0, atol, rtol)
        # The controller keeps each step's error estimate below atol + rtol |x| in RMS; global
        # error is a handful of those local errors (measured 6x and 4x), so we hold it to 10x.
        scaled = (np.asarray(x) - exact) / (atol + rtol * np.abs(exact))
        assert np.sqrt(np.mean(scaled**2)) < 10, (rtol, np.sqrt(np.mean(scaled**2)))
        errs.append(max_err(x, x0))
        # Equal error: Euler's error falls only as 1/N; given 10x dopri5's evaluations it is
        # still far worse (measured 40x at rtol 1e-4, 440x at 1e-5).
        assert max_err(solvers.euler(v_gauss, x0, 10 * int(nfe))[0], x0) > 20 * errs[-1]
    assert errs[1] < errs[0] / 5  # tightening the tolerance 10x buys accuracy
    # The official defaults (atol 1e-6, rtol 1e-3): 26 evaluations, and Euler with 10x as many
    # is still less accurate (measured 0.020 vs 0.016).
    x, nfe = dopri5_gauss(x0)
    assert int(nfe) < 40
    assert max_err(solvers.euler(v_gauss, x0, 10 * int(nfe))[0], x0) > max_err(x, x0)


def test_dopri5_takes_the_same_steps_as_diffrax():
    # diffrax (an independent implementation of the same Dormand-Prince pair and PI controller
    # with the same defaults) started from our first step and landing on t1 must give the same
    # answer as ours with overshoot=False; a wrong tableau entry or controller rule would not.
    import diffrax

    x0 = noise(8, 16)
    atol, rtol = 1e-7, 1e-4
    ours, nfe = solvers.dopri5(v_gauss, x0, atol, rtol, overshoot=False)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, y, args: v_gauss(y, jnp.full((y.shape[0],), t))),
        diffrax.Dopri5(),
        t0=0.0,
        t1=1.0,
        dt0=solvers.initial_step(v_gauss, x0, 0.0, atol, rtol),
        y0=x0,
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        saveat=diffrax.SaveAt(t1=True),
    )
    assert int(nfe) == 2 + 6 * int(sol.stats["num_steps"])
    np.testing.assert_allclose(ours, sol.ys[0], rtol=1e-5, atol=1e-4)  # float32 rounding
    with pytest.raises(Exception, match="max_steps"):
        jax.block_until_ready(solvers.dopri5(v_gauss, x0, atol, rtol, max_steps=2))


def test_nfe_counts_every_velocity_call():
    # Count calls with a host callback inside the jitted solvers: nfe must equal the real count.
    calls = []

    def counted(x, t):
        z = jax.experimental.io_callback(
            lambda: (calls.append(1), np.float32(0))[1],
            jax.ShapeDtypeStruct((), jnp.float32),
            ordered=True,
        )
        return v_gauss(x, t) + z

    x0 = noise(2, 4)
    runs = {
        "euler": lambda: solvers.euler(counted, x0, 7),
        "heun": lambda: solvers.heun(counted, x0, 7),
        "dopri5": lambda: solvers.dopri5(counted, x0, 1e-7, 1e-4),
        "sde": lambda: solvers.sde_euler_maruyama(counted, jax.random.key(0), x0, 9),
        "sde-none": lambda: solvers.sde_euler_maruyama(
            counted, jax.random.key(0), x0, 9, last_step=None
        ),
    }
    expected = {"euler": 7, "heun": 14, "sde": 9, "sde-none": 8}
    for name, run in runs.items():
        calls.clear()
        _, nfe = jax.jit(run)()
        jax.effects_barrier()
        assert int(nfe) == len(calls), (name, int(nfe), len(calls))
        if name in expected:
            assert len(calls) == expected[name], name


@pytest.mark.parametrize("method", ["euler", "heun", "dopri5"])
def test_ode_solvers_carry_noise_to_the_gaussian(method):
    x0 = noise(3, 2048)  # 16384 samples
    opts = {"euler": {"num_steps": 250}, "heun": {"num_steps": 50}, "dopri5": {}}[method]
    x, _ = jax.jit(lambda z: solvers.sample(v_gauss, z, method, **opts))(x0)
    # Per sample: Euler-250 is within ~0.03 of the exact map (error 6/N from the order test),
    # Heun-50 within 2e-3, dopri5 at the official tolerance within ~0.03.
    assert max_err(x, x0) < 0.05
    assert_moments(x, MU, SIGMA, bias=0.03 if method != "heun" else 0.0)


def test_sde_carries_noise_to_the_analytic_end_distribution():
    # The SDE keeps the marginals p_t, so at t1 = 1 - 0.04 the state is N(t1 mu, A_t1) up to the
    # Euler-Maruyama bias; the final "Mean" step x + h[(1 + t1) v - x] (drift with D = 1 - t)
    # is affine, x -> L x + c, so the result is exactly N(L t1 mu + c, L A L^T).
    h = 0.04
    t1 = 1 - h
    a = t1**2 * SIGMA + (1 - t1) ** 2 * np.eye(C)
    mv = (t1 * SIGMA - (1 - t1) * np.eye(C)) @ np.linalg.inv(a)  # v = mu + mv (x - t mu)
    lin = (1 - h) * np.eye(C) + h * (1 + t1) * mv.T  # row-vector convention: x @ lin
    c = h * (1 + t1) * (MU - t1 * MU @ mv.T)
    mean, cov = t1 * MU @ lin + c, lin.T @ a @ lin
    x, nfe = jax.jit(lambda k, z: solvers.sde_euler_maruyama(v_gauss, k, z, 250))(
        jax.random.key(4), noise(5, 2048)
    )
    assert int(nfe) == 250
    # Weak Euler-Maruyama error is O(dt) = O(0.004) per moment; 0.02 covers it with margin.
    assert_moments(x, mean, cov, bias=0.02)
    # and the end distribution is close to the data (the last step is what makes it so)
    assert_moments(x, MU, SIGMA, bias=0.06)


def test_dopri5_and_sde_on_a_gaussian_mixture():
    x0 = noise(6, 2048)
    x, _ = jax.jit(lambda z: solvers.dopri5(v_mix, z))(x0)
    # Mixture moments; SE from the mixture covariance (the 5 SE bound is conservative for these
    # light-tailed mixtures), 0.03 for the solver's per-sample error as for the Gaussian.
    assert_moments(x, MIX_MEAN, MIX_COV, bias=0.03)
    # Each sample must land in a component: distance to the nearest mean within ~5 std.
    d = np.min(np.linalg.norm(np.asarray(x).reshape(-1, 1, C) - M, axis=-1) / S, axis=-1)
    assert np.quantile(d, 0.999) < 6.0
    xs, _ = jax.jit(lambda k, z: solvers.sde_euler_maruyama(v_mix, k, z, 250))(
        jax.random.key(7), x0
    )
    # The SDE ends with a mean step from t = 0.96, where each component still has std
    # sqrt(0.96^2 s^2 + 0.04^2) and the step shrinks the residual noise; budget 0.06.
    assert_moments(xs, MIX_MEAN, MIX_COV, bias=0.06)


def test_sample_dispatch_errors():
    x0 = noise(0, 2)
    with pytest.raises(ValueError, match="unknown sampling method"):
        solvers.sample(v_gauss, x0, "rk4")
    with pytest.raises(ValueError, match="PRNG key"):
        solvers.sample(v_gauss, x0, "sde")
    with pytest.raises(ValueError, match="diffusion_form"):
        solvers.sde_euler_maruyama(v_gauss, jax.random.key(0), x0, 5, diffusion_form="cosine")
