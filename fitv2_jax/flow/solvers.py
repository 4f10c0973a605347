"""Samplers for the rectified flow: integrate noise (t = 0) to data (t = 1).

Every solver takes `velocity_fn(x, t) -> v` with x: (B, ...) the state and t: (B,) float32 (the
same time for every sample, given per sample because the model embeds t per sample), and returns
(x1, nfe): the state at the end and the number of velocity evaluations actually made (an int32
array, so the solvers run unchanged under `jax.jit` with `velocity_fn` closed over the model
parameters). Keep the state in float32.

Step counts follow the meaning of each method's own argument, which is not the official CLI's:
- `euler` / `heun`: `num_steps` steps of size 1/num_steps. The official ODE sampler hands
  torchdiffeq the grid `linspace(0, 1, K)` for `--num-sampling-steps K`, i.e. K - 1 steps: the
  official K is our num_steps = K - 1.
- `sde_euler_maruyama`: `num_steps` exactly as the official `--num-sampling-steps`: a grid of
  num_steps points on [0, 1 - last_step_size], num_steps - 1 stochastic steps and one final step.
"""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp

VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]
METHODS = ("euler", "heun", "dopri5", "sde")
DIFFUSION_FORMS = ("constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing")
LAST_STEPS = (None, "Mean", "Tweedie", "Euler")


def _times(x: jax.Array, t) -> jax.Array:
    """Scalar time -> (B,) float32, the layout velocity_fn expects."""
    return jnp.full((x.shape[0],), t, jnp.float32)


def _fixed_grid(num_steps: int, t0: float, t1: float) -> jax.Array:
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return jnp.linspace(t0, t1, num_steps + 1, dtype=jnp.float32)


def euler(
    velocity_fn: VelocityFn, x0: jax.Array, num_steps: int, *, t0: float = 0.0, t1: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """Explicit Euler on a uniform grid of `num_steps` steps from t0 to t1; nfe = num_steps."""
    ts = _fixed_grid(num_steps, t0, t1)

    def step(i, x):
        return x + (ts[i + 1] - ts[i]) * velocity_fn(x, _times(x, ts[i]))

    return jax.lax.fori_loop(0, num_steps, step, x0), jnp.int32(num_steps)


def heun(
    velocity_fn: VelocityFn, x0: jax.Array, num_steps: int, *, t0: float = 0.0, t1: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """Heun (explicit trapezoid, 2nd order) on a uniform grid; nfe = 2 * num_steps."""
    ts = _fixed_grid(num_steps, t0, t1)

    def step(i, x):
        dt = ts[i + 1] - ts[i]
        v0 = velocity_fn(x, _times(x, ts[i]))
        v1 = velocity_fn(x + dt * v0, _times(x, ts[i + 1]))
        return x + 0.5 * dt * (v0 + v1)

    return jax.lax.fori_loop(0, num_steps, step, x0), jnp.int32(2 * num_steps)


def _rms(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32))))


def initial_step(
    velocity_fn: VelocityFn,
    x0: jax.Array,
    t0: float,
    atol: float,
    rtol: float,
    f0: jax.Array | None = None,
    order: int = 5,
) -> jax.Array:
    """First step guess of Hairer, Norsett & Wanner (Solving ODEs I, II.4): 1 or 2 evaluations.

    The rule torchdiffeq, hence the official sampler, uses (error exponent 1/order).
    """
    scale = atol + jnp.abs(x0) * rtol
    if f0 is None:
        f0 = velocity_fn(x0, _times(x0, t0))
    d0, d1 = _rms(x0 / scale), _rms(f0 / scale)
    h0 = jnp.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / jnp.maximum(d1, 1e-30))
    f1 = velocity_fn(x0 + h0 * f0, _times(x0, t0 + h0))
    d2 = _rms((f1 - f0) / scale) / h0
    dmax = jnp.maximum(d1, d2)
    h1 = jnp.where(
        dmax <= 1e-15,
        jnp.maximum(1e-6, h0 * 1e-3),
        (0.01 / jnp.maximum(dmax, 1e-30)) ** (1 / order),
    )
    return jnp.minimum(100 * h0, h1)


# Dormand-Prince 5(4) tableau (Dormand & Prince 1980) and Shampine's midpoint weights for the
# dense output: c (nodes), a (stage weights), b (5th-order solution = last row of a, FSAL),
# e (b minus the embedded 4th-order weights), mid (y(t0 + dt/2) weights).
_DP_C = (1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DP_A = (
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_DP_E = (
    35 / 384 - 1951 / 21600,
    0.0,
    500 / 1113 - 22642 / 50085,
    125 / 192 - 451 / 720,
    -2187 / 6784 + 12231 / 42400,
    11 / 84 - 649 / 6300,
    -1 / 60,
)
_DP_MID = (
    6025192743 / 30085553152 / 2,
    0.0,
    51252292925 / 65400821598 / 2,
    -2691868925 / 45128329728 / 2,
    187940372067 / 1594534317056 / 2,
    -1776094331 / 19743644256 / 2,
    11237099 / 235043384 / 2,
)


def _weighted(ks, w):
    return sum(wi * ki for wi, ki in zip(w, ks[: len(w)], strict=True) if wi != 0.0)


def dopri5(
    velocity_fn: VelocityFn,
    x0: jax.Array,
    atol: float = 1e-6,
    rtol: float = 1e-3,
    *,
    t0: float = 0.0,
    t1: float = 1.0,
    max_steps: int = 4096,
    overshoot: bool = True,
    safety: float = 0.9,
    ifactor: float = 10.0,
    dfactor: float = 0.2,
) -> tuple[jax.Array, jax.Array]:
    """Adaptive Dormand-Prince 5(4), the official sampler's default (torchdiffeq "dopri5").

    Same algorithm as torchdiffeq, so the official step sequence is reproduced: Hairer's first
    step; error ratio = RMS over the whole batch of err / (atol + rtol * max(|y0|, |y1|)); accept
    if <= 1; next step = dt * clip(safety * ratio^(-1/5), [1 if accepted else dfactor, ifactor]).
    overshoot=True (official): the last step may pass t1 and the result is the quartic dense
    output at t1; overshoot=False clips the last step to land on t1 (what diffrax does).
    atol/rtol may be traced. nfe = 2 + 6 * attempted steps (first-same-as-last reuses the end
    derivative). Exceeding max_steps raises at run time.
    """
    f0 = velocity_fn(x0, _times(x0, t0))
    h = initial_step(velocity_fn, x0, t0, atol, rtol, f0=f0)
    t0, t1 = jnp.float32(t0), jnp.float32(t1)

    def attempt(carry):
        t, y, f, h, n, t_prev, coeffs = carry
        if not overshoot:
            h = jnp.minimum(h, t1 - t)
        ks = [f]
        for ci, ai in zip(_DP_C, _DP_A, strict=True):
            ti = t + h if ci == 1.0 else t + ci * h
            ks.append(velocity_fn(y + h * _weighted(ks, ai), _times(y, ti)))
        y1 = y + h * _weighted(ks, _DP_A[-1])  # 5th-order solution; ks[-1] = f(t + h, y1)
        err = h * _weighted(ks, _DP_E)
        ratio = _rms(err / (atol + rtol * jnp.maximum(jnp.abs(y), jnp.abs(y1))))
        accept = ratio <= 1.0
        factor = jnp.minimum(
            ifactor,
            jnp.maximum(safety * ratio ** (-1 / 5), jnp.where(accept, 1.0, dfactor)),
        )
        h_next = h * jnp.where(ratio == 0.0, ifactor, factor)
        y_mid = y + h * _weighted(ks, _DP_MID)
        f1 = ks[-1]
        # quartic through y, y_mid, y1 with slopes f, f1, in x = (s - t) / h
        new_coeffs = (
            y,
            h * f,
            h * (f1 - 4 * f) - 11 * y - 5 * y1 + 16 * y_mid,
            h * (5 * f - 3 * f1) + 18 * y + 14 * y1 - 32 * y_mid,
            2 * h * (f1 - f) - 8 * (y1 + y) + 16 * y_mid,
        )
        pick = lambda a, b: jnp.where(accept, a, b)
        return (
            pick(t + h, t),
            pick(y1, y),
            pick(f1, f),
            h_next,
            n + 1,
            pick(t, t_prev),
            tuple(pick(a, b) for a, b in zip(new_coeffs, coeffs, strict=True)),
        )

    zero = jnp.zeros_like(x0)
    init = (t0, x0, f0, h, jnp.int32(0), t0, (x0, zero, zero, zero, zero))
    cond = lambda c: (c[0] < t1) & (c[4] < max_steps)
    t, y, _, _, n, t_prev, coeffs = jax.lax.while_loop(cond, attempt, init)
    y = eqx.error_if(y, t < t1, f"dopri5 did not reach t1 within max_steps={max_steps}")
    if overshoot:
        s = ((t1 - t_prev) / jnp.maximum(t - t_prev, 1e-30)).astype(y.dtype)
        y = coeffs[0] + s * (coeffs[1] + s * (coeffs[2] + s * (coeffs[3] + s * coeffs[4])))
    return y, 2 + 6 * n


def _diffusion(t: jax.Array, form: str, norm: float) -> jax.Array:
    """Diffusion coefficient D(t) of the official linear-path SDE (its `compute_diffusion`)."""
    if form == "constant":
        return jnp.full_like(t, norm)
    if form == "SBDM":  # d_alpha/alpha * sigma^2 - sigma * d_sigma; singular at t = 0
        return norm * ((1.0 - t) ** 2 / t + (1.0 - t))
    if form in ("sigma", "linear"):  # sigma_t = 1 - t on this path, so both are norm * (1 - t)
        return norm * (1.0 - t)
    if form == "decreasing":
        return 0.25 * (norm * jnp.cos(jnp.pi * t) + 1.0) ** 2
    if form == "increasing-decreasing":
        return norm * jnp.sin(jnp.pi * t) ** 2
    raise ValueError(f"unknown diffusion_form {form!r}; choose one of {DIFFUSION_FORMS}")


def score_from_velocity(v: jax.Array, x: jax.Array, t: jax.Array) -> jax.Array:
    """grad log p_t(x) from the velocity on the linear path (alpha_t = t, sigma_t = 1 - t).

    score = (alpha/alpha' v - x) / (sigma^2 - alpha/alpha' sigma' sigma) = (t v - x) / (1 - t),
    written in the official algebraic form so the rounding matches. t: (B,).
    """
    t = t.reshape(t.shape + (1,) * (x.ndim - 1)).astype(x.dtype)
    var = (1.0 - t) ** 2 + t * (1.0 - t)
    return (t * v - x) / var


def sde_euler_maruyama(
    velocity_fn: VelocityFn,
    key: jax.Array,
    x0: jax.Array,
    num_steps: int = 250,
    diffusion_form: str = "sigma",
    diffusion_norm: float = 1.0,
    last_step: str | None = "Mean",
    last_step_size: float = 0.04,
) -> tuple[jax.Array, jax.Array]:
    """Euler-Maruyama on dx = [v + D(t) score] dt + sqrt(2 D(t)) dW, then a deterministic end.

    The SDE has the same marginals p_t as the ODE (the score term and the noise cancel in the
    Fokker-Planck equation). Grid: linspace(0, 1 - last_step_size, num_steps), num_steps - 1
    stochastic steps whose Gaussian draws are jax.random.normal(k_i, x.shape) for
    k_i = jax.random.split(key, num_steps - 1)[i]; then at t1 = 1 - last_step_size:
    "Mean" x + drift * last_step_size, "Euler" x + v * last_step_size,
    "Tweedie" x / t1 + (1 - t1)^2 / t1 * score, None nothing (and last_step_size is taken as 0,
    so the grid runs to 1). nfe = num_steps - 1, plus 1 unless last_step is None.
    """
    if last_step not in LAST_STEPS:
        raise ValueError(f"unknown last_step {last_step!r}; choose one of {LAST_STEPS}")
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2 (grid points), got {num_steps}")
    _diffusion(jnp.zeros(()), diffusion_form, diffusion_norm)  # validate the name early
    if last_step is None:
        last_step_size = 0.0
    t_end = 1.0 - last_step_size
    ts = jnp.linspace(0.0, t_end, num_steps, dtype=jnp.float32)
    dt = ts[1] - ts[0]
    keys = jax.random.split(key, num_steps - 1)

    def drift(x, t):
        v = velocity_fn(x, t)
        d = _diffusion(t, diffusion_form, diffusion_norm).reshape(t.shape + (1,) * (x.ndim - 1))
        return v + d.astype(x.dtype) * score_from_velocity(v, x, t)

    def step(i, x):
        t = _times(x, ts[i])
        d = _diffusion(ts[i], diffusion_form, diffusion_norm)
        dw = jax.random.normal(keys[i], x.shape, x.dtype) * jnp.sqrt(dt)
        return x + drift(x, t) * dt + jnp.sqrt(2.0 * d) * dw

    x = jax.lax.fori_loop(0, num_steps - 1, step, x0)
    t = _times(x, t_end)
    if last_step == "Mean":
        x = x + drift(x, t) * last_step_size
    elif last_step == "Euler":
        x = x + velocity_fn(x, t) * last_step_size
    elif last_step == "Tweedie":
        x = x / t_end + (1.0 - t_end) ** 2 / t_end * score_from_velocity(velocity_fn(x, t), x, t)
    nfe = num_steps - 1 + (last_step is not None)
    return x, jnp.int32(nfe)


def sample(
    velocity_fn: VelocityFn,
    x0: jax.Array,
    method: str = "dopri5",
    *,
    key: jax.Array | None = None,
    num_steps: int | None = None,
    **opts,
) -> tuple[jax.Array, jax.Array]:
    """Dispatch to a solver by name: "euler", "heun", "dopri5" or "sde" (needs `key`).

    num_steps defaults: 250 for euler/heun/sde (the official default), unused by dopri5 (pass
    atol/rtol). Other keyword options go to the solver. Returns (x1, nfe).
    """
    if method in ("euler", "heun"):
        solver = euler if method == "euler" else heun
        return solver(velocity_fn, x0, 250 if num_steps is None else num_steps, **opts)
    if method == "dopri5":
        if num_steps is not None:
            raise ValueError("dopri5 is adaptive: pass atol/rtol, not num_steps")
        return dopri5(velocity_fn, x0, **opts)
    if method == "sde":
        if key is None:
            raise ValueError("method 'sde' needs a PRNG key: sample(..., key=jax.random.key(0))")
        n = 250 if num_steps is None else num_steps
        return sde_euler_maruyama(velocity_fn, key, x0, n, **opts)
    raise ValueError(f"unknown sampling method {method!r}; choose one of {METHODS}")
