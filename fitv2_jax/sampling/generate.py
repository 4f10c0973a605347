"""Jitted generation at any size: noise -> solver x CFG -> tokens.

    model = model_for_size(config.model, h, w, rule)          # fitv2_jax.sampling.rules
    tokens, nfe = generate(model, params, key, labels, h, w, cfg_scale=1.5, method="dopri5")
    tokens, nfe = generate(model, params, key, labels, h, w, **SolverOptions("euler", 32).kwargs())

h, w in patches; tokens (B, h*w, p*p*C). `initial_noise` draws sample i's noise from (key, i), so
an image depends on its index and the seed only, not on the batch size or device count.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from fitv2_jax.data.tokens import make_grid
from fitv2_jax.flow import solvers
from fitv2_jax.flow.ddpm import ddpm_sample, make_schedule, space_timesteps
from fitv2_jax.flow.guidance import make_velocity_fn
from fitv2_jax.flow.solvers import sample as solve
from fitv2_jax.models.fit import FiT
from fitv2_jax.utils.errors import UserError

METHODS = (*solvers.METHODS, "ddpm")


@dataclasses.dataclass(frozen=True)
class SolverOptions:
    """How to integrate and guide (everything but the size, rule and CFG scale).

    method: euler | heun | dopri5 | sde (rectified flow) or ddpm (FiT v1: ancestral sampling over
    num_steps respaced steps of ddpm_train_steps). num_steps: euler/heun steps (the official
    --num-sampling-steps K is K - 1 here), sde grid points or ddpm steps; dopri5 is adaptive
    with atol/rtol.
    cfg_channels: "official" guides the first 3 of 4 latent channels, "all" every channel.
    scale_pow: power-cosine CFG schedule (0 = constant). cfg_interval: guide only for t in [a, b].
    cfg_state: "official" keeps [cond; uncond] in the solver state as the official sampler
    (changes dopri5's step sizes only); "single" only the guided samples.
    """

    method: str = "dopri5"
    num_steps: int = 250
    ddpm_train_steps: int = 1000
    atol: float = 1e-6
    rtol: float = 1e-3
    cfg_channels: str = "official"
    scale_pow: float = 0.0
    cfg_interval: tuple[float, float] | None = None
    cfg_state: str = "official"

    def __post_init__(self):
        if self.method not in METHODS:
            raise UserError(f"unknown solver {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.method == "ddpm":
            space_timesteps(self.ddpm_train_steps, self.num_steps)  # validates the step count
        if self.num_steps < 1:
            raise UserError(f"--num_steps {self.num_steps}: give at least 1 step")
        if not (self.atol > 0 and self.rtol > 0):
            raise UserError(f"--atol {self.atol} --rtol {self.rtol}: tolerances must be > 0")
        if not math.isfinite(self.scale_pow) or self.scale_pow < 0:
            raise UserError(f"--scale_pow {self.scale_pow}: give a finite value >= 0")
        if self.cfg_channels not in ("official", "all"):
            raise UserError(f"cfg_channels={self.cfg_channels!r}: use official or all")
        if self.cfg_state not in ("official", "single"):
            raise UserError(f"cfg_state={self.cfg_state!r}: use official or single")
        if self.cfg_interval is not None:
            a, b = (float(v) for v in self.cfg_interval)
            if not 0.0 <= a <= b <= 1.0:
                raise UserError(f"cfg_interval=({a}, {b}): give 0 <= A <= B <= 1")
            object.__setattr__(self, "cfg_interval", (a, b))

    def kwargs(self) -> dict:
        """Keyword arguments of `generate`."""
        return dict(
            method=self.method, num_steps=self.num_steps, atol=self.atol, rtol=self.rtol,
            channels=self.cfg_channels, scale_pow=self.scale_pow, interval=self.cfg_interval,
            doubled_state=self.cfg_state == "official", ddpm_train_steps=self.ddpm_train_steps,
        )  # fmt: skip

    def describe(self) -> dict:
        """The settings as recorded in result files (num_steps only where it applies)."""
        out = dataclasses.asdict(self)
        if self.method == "dopri5":
            out["num_steps"] = None
        if self.method != "ddpm":
            out.pop("ddpm_train_steps")
        if self.cfg_interval is not None:
            out["cfg_interval"] = list(self.cfg_interval)
        return out


def grid_inputs(batch: int, h: int, w: int):
    """grid (B, 2, h*w) int32, mask (B, h*w) float32, size (B, 2) int32 for full images."""
    grid = np.broadcast_to(make_grid(h, w), (batch, 2, h * w))
    return (
        jnp.asarray(grid, jnp.int32),
        jnp.ones((batch, h * w), jnp.float32),
        jnp.asarray(np.tile([h, w], (batch, 1)), jnp.int32),
    )


def initial_noise(key, ids, n_tokens: int, token_dim: int):
    """x0 (B, n_tokens, token_dim) float32 with sample i drawn from fold_in(key, ids[i]), so an
    image depends on its index and the seed only, not on the batch size or device count."""
    ids = jnp.asarray(ids, jnp.uint32)
    draw = lambda i: jax.random.normal(jax.random.fold_in(key, i), (n_tokens, token_dim))
    return jax.vmap(draw)(ids)


@functools.partial(
    jax.jit,
    static_argnames=(
        "model", "h", "w", "cfg_scale", "method", "num_steps", "channels", "scale_pow", "interval", "solver_opts",
    "doubled_state", "ddpm_train_steps",
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
    ddpm_train_steps=1000,
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
    ddpm = method == "ddpm"
    velocity = make_velocity_fn(
        apply, labels, grid, mask, size, cfg_scale=cfg_scale, null_label=model.num_classes,
        patch_size=p, in_channels=c, learn_sigma=model.learn_sigma,
        doubled_state=doubled_state and guided and not ddpm, full_output=ddpm, **extra,
    )  # fmt: skip
    if ddpm:  # the ghost half of the official doubled state never reaches the real samples
        return ddpm_sample(velocity, x0, make_schedule(ddpm_train_steps, num_steps), key_sde)
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
    ddpm_train_steps: int = 1000,
):
    """Samples (B, h*w, p*p*C) tokens for `labels` (B,) from N(0, I) noise drawn with `key`.

    x0: optional (B, h*w, p*p*C) starting noise (see `initial_noise`) instead of one draw from
    `key` (which then only seeds the SDE and DDPM noise). doubled_state: the official CFG solver state
    [x; ghost] (only changes dopri5's step sizes, see flow.guidance). Returns (tokens, nfe).
    Jitted per (model, size, options); inputs may be batch-sharded.
    """
    if method not in METHODS:
        raise UserError(f"unknown solver {method!r}; choose one of {', '.join(METHODS)}")
    solver_opts = (("atol", atol), ("rtol", rtol)) if method == "dopri5" else ()
    return _generate(
        params, key, jnp.asarray(labels, jnp.int32), model=model, h=h, w=w, cfg_scale=float(cfg_scale),
        method=method, num_steps=int(num_steps), channels=channels, scale_pow=float(scale_pow),
        interval=None if interval is None else tuple(interval), solver_opts=solver_opts,
        doubled_state=bool(doubled_state), ddpm_train_steps=int(ddpm_train_steps), x0=x0,
    )  # fmt: skip
