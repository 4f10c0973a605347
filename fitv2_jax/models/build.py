"""Building the network from a config, example inputs, and parameter shapes without allocation.

model = build_model(config.model)                  # FiT(**config.model)
x, t, y, grid, mask, size = example_inputs(model)  # (1, 4, p*p*C) zeros etc., for init
shapes = abstract_params(config.model)             # ShapeDtypeStructs, unboxed
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fitv2_jax.models.fit import FiT


def build_model(model_config: Any) -> FiT:
    """FiT from a config's model section (a ConfigDict or dict), or the model itself."""
    if isinstance(model_config, FiT):
        return model_config
    return FiT(**dict(model_config))


def example_inputs(model: FiT, batch: int = 1, tokens: int = 4) -> tuple[jax.Array, ...]:
    """(x, t, y, grid, mask, size) of the right dtypes and shapes for `model.init`:
    x (B, N, p*p*C), t (B,), y (B,), grid (B, 2, N), mask (B, N) ones, size (B, 2)."""
    n, d = tokens, model.patch_size**2 * model.in_channels
    return (
        jnp.zeros((batch, n, d), jnp.float32),
        jnp.zeros((batch,), jnp.float32),
        jnp.zeros((batch,), jnp.int32),
        jnp.zeros((batch, 2, n), jnp.int32),
        jnp.ones((batch, n), jnp.float32),
        jnp.full((batch, 2), 2, jnp.int32),
    )


def init_params(model: FiT, key: jax.Array, boxed: bool = False):
    """Freshly initialised params (the official init); boxed keeps the logical-axis metadata."""
    params = model.init(key, *example_inputs(model))["params"]
    return params if boxed else nn.unbox(params)


def abstract_params(model_config: Any, boxed: bool = False):
    """Shapes and dtypes of the params (no allocation)."""
    model = build_model(model_config)
    return jax.eval_shape(lambda: init_params(model, jax.random.key(0), boxed))
