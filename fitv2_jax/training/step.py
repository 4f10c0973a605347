"""One training step: rectified-flow loss, gradient (optionally accumulated), AdamW, EMA.

    step_fn = make_train_step(model, config, tx)
    state, metrics = step_fn(state, batch)      # batch: x, grid, mask, y, size (global arrays)

The loss is the official one: velocity MSE over valid tokens per sample, then the batch mean;
labels are dropped to the null class with probability class_dropout_prob inside the model.
With grad_accum_steps = A the batch is split into A microbatches whose gradients are averaged,
which equals the full-batch gradient (each microbatch holds B/A whole samples).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fitv2_jax.flow.transport import flow_matching_loss
from fitv2_jax.models.fit import FiT
from fitv2_jax.training.state import TrainState, ema_update

BATCH_KEYS = ("x", "grid", "mask", "y", "size")


def loss_fn(model: FiT, params, batch: dict, key, train_cfg):
    """Scalar loss and aux for one (micro)batch."""
    key_drop, key_flow = jax.random.split(key)
    channels = batch["x"].shape[-1]

    def velocity(x_t, t):
        out = model.apply(
            {"params": params},
            x_t,
            t,
            batch["y"],
            batch["grid"],
            batch["mask"],
            batch.get("size"),
            train=True,
            rngs={"dropout": key_drop},
        )
        return out[..., :channels]  # learn_sigma models: the velocity is the first p*p*C channels

    return flow_matching_loss(
        key_flow,
        velocity,
        batch["x"],
        batch["mask"],
        time_kind=train_cfg.time_sampler,
        time_mean=train_cfg.time_mean,
        time_std=train_cfg.time_std,
    )


def make_train_step(model: FiT, config, tx: optax.GradientTransformation):
    train_cfg = config.train
    accum = int(train_cfg.grad_accum_steps)

    def step_fn(state: TrainState, batch: dict):
        batch = {k: batch[k] for k in BATCH_KEYS if k in batch}
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        grad_fn = jax.value_and_grad(lambda p, b, k: loss_fn(model, p, b, k, train_cfg)[0])

        if accum == 1:
            loss, grads = grad_fn(state.params, batch, key)
        else:
            b = batch["x"].shape[0]
            if b % accum:
                raise ValueError(f"batch {b} is not divisible by train.grad_accum_steps={accum}")
            # strided split: microbatch i takes samples i, i + A, ... so every device keeps
            # working on its own rows of a batch-sharded array
            micro = jax.tree.map(
                lambda a: a.reshape(b // accum, accum, *a.shape[1:]).swapaxes(0, 1), batch
            )
            keys = jax.random.split(key, accum)

            def body(carry, xs):
                mb, k = xs
                loss, grads = grad_fn(state.params, mb, k)
                return jax.tree.map(jnp.add, carry, (loss, grads)), None

            zeros = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, state.params))
            (loss, grads), _ = jax.lax.scan(body, zeros, (micro, keys))
            loss, grads = jax.tree.map(lambda a: a / accum, (loss, grads))

        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = ema_update(state.ema_params, params, train_cfg.ema_decay)
        metrics = {
            "loss": loss,
            "grad_norm": optax.global_norm(grads),
            "param_norm": optax.global_norm(params),
            "valid_tokens": jnp.sum(batch["mask"] != 0),
        }
        new_state = state.replace(
            step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state
        )
        return new_state, metrics

    return step_fn
