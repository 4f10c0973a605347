"""Everything a train step needs, built once and shared by the train loop and the dry run.

    setup = build_setup(config)                  # mesh, model, optimizer, shardings, jitted step
    state = setup.init_state(jax.random.key(0))  # sharded on setup.mesh
    state, metrics = setup.step(state, batch)    # under setup.context()

The dry run lowers the same `setup.step` with abstract inputs (`abstract_state`,
`abstract_batch`), so what it compiles is exactly what training runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fitv2_jax.models.build import build_model
from fitv2_jax.models.fit import FiT
from fitv2_jax.parallel.mesh import create_mesh
from fitv2_jax.parallel.rules import LOGICAL_RULES
from fitv2_jax.training.state import (
    TrainState,
    init_state,
    learning_rate,
    make_optimizer,
    state_shardings,
)
from fitv2_jax.training.step import make_train_step
from fitv2_jax.utils.errors import UserError


@dataclasses.dataclass
class TrainSetup:
    config: Any
    mesh: Mesh
    model: FiT
    global_batch: int
    tx: optax.GradientTransformation
    learning_rate: Callable[[int], float]
    abstract_state: TrainState  # unboxed ShapeDtypeStructs
    shardings: TrainState  # NamedShardings of the state
    step: Callable  # jitted (state, batch) -> (state, metrics), state donated

    def context(self):
        """The mesh and logical-axis rules every call of `step` runs under."""
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(LOGICAL_RULES))
        return stack

    def init_state(self, key: jax.Array) -> TrainState:
        tx_factory = lambda params: make_optimizer(self.config.train, self.global_batch, params)
        init = jax.jit(
            lambda k: init_state(self.model, tx_factory, k), out_shardings=self.shardings
        )
        return init(key)

    def abstract_state_sharded(self) -> TrainState:
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            self.abstract_state, self.shardings)  # fmt: skip

    def abstract_batch(self, length: int | None = None) -> dict:
        """ShapeDtypeStructs of a global batch of `length` tokens (default: context_size)."""
        gb, n = self.global_batch, int(length or self.config.model.context_size)
        c = self.model.patch_size**2 * self.model.in_channels
        shapes = dict(x=((gb, n, c), jnp.float32), grid=((gb, 2, n), jnp.int32),
                      mask=((gb, n), jnp.float32), y=((gb,), jnp.int32),
                      size=((gb, 2), jnp.int32))  # fmt: skip
        spec = lambda s: NamedSharding(self.mesh, PartitionSpec(("data", "fsdp"), *[None] * (len(s) - 1)))  # fmt: skip
        return {k: jax.ShapeDtypeStruct(s, d, sharding=spec(s)) for k, (s, d) in shapes.items()}


def build_setup(config, global_batch: int | None = None, mesh: Mesh | None = None) -> TrainSetup:
    """The mesh (config.mesh unless given), model, optimizer, state shardings and jitted step."""
    mesh = mesh or create_mesh(config.mesh.ici, config.mesh.dcn)
    model = build_model(config.model)
    gb = int(global_batch or config.data.global_batch_size)
    ways = int(mesh.shape["data"] * mesh.shape["fsdp"])
    accum = int(config.train.grad_accum_steps)
    if gb < 1 or accum < 1 or gb % (ways * accum):
        raise UserError(f"config.data.global_batch_size = {gb} must be a positive multiple of "
                        f"the mesh's data x fsdp devices ({ways}) x train.grad_accum_steps "
                        f"({accum})")  # fmt: skip
    tx_factory = lambda params: make_optimizer(config.train, gb, params)
    abstract_state, shardings = state_shardings(model, tx_factory, mesh)
    tx = tx_factory(abstract_state.params)
    step = jax.jit(
        make_train_step(model, config, tx),
        in_shardings=(shardings, None),
        out_shardings=(shardings, None),
        donate_argnums=(0,),
    )
    return TrainSetup(config, mesh, model, gb, tx, learning_rate(config.train, gb),
                      abstract_state, shardings, step)  # fmt: skip
