"""One training step: rectified-flow loss, gradient (optionally accumulated), AdamW, EMA.

    step_fn = make_train_step(model, config, tx)
    state, metrics = step_fn(state, batch)      # batch: x, grid, mask, y, size (global arrays)

The loss is the official one: velocity MSE over valid tokens per sample, then the batch mean.
Labels are dropped to the null class with probability class_dropout_prob here (the model's
force_drop), with every random draw made per sample (see per_sample_draws).
With grad_accum_steps = A the batch is split into A microbatches whose gradients are averaged,
which equals the full-batch gradient (each microbatch holds B/A whole samples).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fitv2_jax.flow.transport import interpolate, masked_loss, sample_timesteps, velocity_target
from fitv2_jax.models.fit import FiT
from fitv2_jax.training.state import TrainState, ema_update

BATCH_KEYS = ("x", "grid", "mask", "y", "size")


def per_sample_draws(key, index, shape, model: FiT, train_cfg):
    """Time, noise and label-drop draws for each sample from fold_in(key, global sample index).

    Drawing per sample makes the step's randomness independent of how the batch is split into
    microbatches or sharded, so gradient accumulation reproduces the full-batch step.
    """

    def one(i):
        k_t, k_noise, k_drop = jax.random.split(jax.random.fold_in(key, i), 3)
        t = sample_timesteps(
            k_t, (), train_cfg.time_sampler, train_cfg.time_mean, train_cfg.time_std
        )
        x0 = jax.random.normal(k_noise, shape, jnp.float32)
        drop = jax.random.uniform(k_drop, ()) < model.class_dropout_prob
        return t, x0, drop

    return jax.vmap(one)(index)


def loss_fn(model: FiT, params, batch: dict, key, train_cfg):
    """Scalar loss (the official masked velocity MSE, mean over samples) and per-sample losses."""
    x1, mask = batch["x"], batch["mask"]
    t, x0, drop = per_sample_draws(key, batch["index"], x1.shape[1:], model, train_cfg)
    x_t = interpolate(x0, x1, t)
    out = model.apply(
        {"params": params},
        x_t,
        t,
        batch["y"],
        batch["grid"],
        mask,
        batch.get("size"),
        force_drop=drop,
    )
    pred = out[..., : x1.shape[-1]]  # learn_sigma models: the velocity is the first p*p*C channels
    per_sample = masked_loss(pred, velocity_target(x0, x1), mask)
    return jnp.mean(per_sample), per_sample


def make_train_step(model: FiT, config, tx: optax.GradientTransformation):
    train_cfg = config.train
    accum = int(train_cfg.grad_accum_steps)

    def step_fn(state: TrainState, batch: dict):
        batch = {k: batch[k] for k in BATCH_KEYS if k in batch}
        batch["index"] = jnp.arange(batch["x"].shape[0])
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

            def body(carry, mb):
                loss, grads = grad_fn(state.params, mb, key)  # draws depend on mb["index"]
                return jax.tree.map(jnp.add, carry, (loss, grads)), None

            zeros = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, state.params))
            (loss, grads), _ = jax.lax.scan(body, zeros, micro)
            loss, grads = jax.tree.map(lambda a: a / accum, (loss, grads))

        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = ema_update(state.ema_params, params, train_cfg.ema_decay)
        metrics = {
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "param_norm": optax.tree.norm(params),
            "valid_tokens": jnp.sum(batch["mask"] != 0),
        }
        new_state = state.replace(
            step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state
        )
        return new_state, metrics

    return step_fn
