"""The train state (one pytree), the optimizer, and their shardings from the logical-axis rules.

TrainState = params (fp32 master weights), EMA params, optimizer state, step, base PRNG key.
The per-step randomness is fold_in(rng, step), so a resumed run draws exactly what the
uninterrupted run drew.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fitv2_jax.models.build import init_params
from fitv2_jax.models.convert import is_post_training_param
from fitv2_jax.models.fit import FiT
from fitv2_jax.parallel.rules import tree_shardings
from fitv2_jax.utils.errors import UserError


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array


def learning_rate(train_cfg, global_batch_size: int):
    """Linear warmup from 0 to the peak, then constant (official constant_with_warmup)."""
    peak = train_cfg.learning_rate
    if train_cfg.scale_lr:
        peak = peak * global_batch_size / train_cfg.lr_base_batch_size
    if train_cfg.warmup_steps > 0:
        return optax.join_schedules(
            [
                optax.linear_schedule(0.0, peak, train_cfg.warmup_steps),
                optax.constant_schedule(peak),
            ],
            [train_cfg.warmup_steps],
        )
    return optax.constant_schedule(peak)


def trainable_labels(params, trainable: str):
    """'train' / 'freeze' label per parameter for optax.multi_transform."""
    if trainable == "all":
        return jax.tree.map(lambda _: "train", params)
    if trainable == "post_training":
        flat = flax.traverse_util.flatten_dict(nn.unbox(params))
        labels = {p: ("train" if is_post_training_param(p) else "freeze") for p in flat}
        return flax.traverse_util.unflatten_dict(labels)
    raise UserError(f"config.train.trainable={trainable!r}: use 'all' or 'post_training'")


def make_optimizer(train_cfg, global_batch_size: int, params) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW; frozen parameters (post-training) get zero updates."""
    adamw = optax.chain(
        optax.clip_by_global_norm(train_cfg.grad_clip_norm),
        optax.adamw(
            learning_rate(train_cfg, global_batch_size),
            b1=train_cfg.b1,
            b2=train_cfg.b2,
            eps=train_cfg.eps,
            weight_decay=train_cfg.weight_decay,
        ),
    )
    if train_cfg.trainable == "all":
        return adamw
    # clipping sees only the trainable gradients, as torch's clip over requires_grad params does
    return optax.multi_transform(
        {"train": adamw, "freeze": optax.set_to_zero()},
        trainable_labels(nn.unbox(params), train_cfg.trainable),
    )


def init_state(model: FiT, tx_factory, key, boxed: bool = False) -> TrainState:
    """A fresh state. tx_factory(params) -> optimizer. boxed=True keeps logical-axis boxes."""
    params = init_params(model, key, boxed=True)
    tx = tx_factory(params)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=jax.tree.map(lambda p: p, params),
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.fold_in(key, 1)),
    )
    return state if boxed else nn.unbox(state)


def state_shardings(model: FiT, tx_factory, mesh):
    """(abstract unboxed state, NamedSharding tree) from the logical-axis rules; no allocation."""
    boxed = jax.eval_shape(
        lambda k: init_state(model, tx_factory, k, boxed=True), jax.random.key(0)
    )
    shardings = tree_shardings(boxed, mesh)
    return nn.unbox(boxed), shardings


def ema_update(ema, params, decay: float):
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
