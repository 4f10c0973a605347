"""One training step: rectified-flow loss, gradient (optionally accumulated), AdamW, EMA.

    step_fn = make_train_step(model, config, tx)
    state, metrics = step_fn(state, batch)      # batch: x, grid, mask, y, size (global arrays)

The loss is the official one: velocity MSE over valid tokens per sample, then the batch mean
(FiT v1 configs, diffusion.kind = "ddpm": the DDPM epsilon MSE + variational bound).
Labels are dropped to the null class with probability class_dropout_prob here (the model's
force_drop), with every random draw made per sample (see per_sample_draws).
With grad_accum_steps = A the batch is split into A microbatches whose gradients are averaged,
which equals the full-batch gradient (each microbatch holds B/A whole samples).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fitv2_jax.flow.ddpm import DDPMSchedule, ddpm_loss, make_schedule, q_sample
from fitv2_jax.flow.transport import interpolate, masked_loss, sample_timesteps, velocity_target
from fitv2_jax.models.fit import FiT
from fitv2_jax.training.state import TrainState, ema_update, trainable_labels
from fitv2_jax.utils.errors import UserError

BATCH_KEYS = ("x", "grid", "mask", "y", "size", "segment_ids")


def per_sample_draws(key, index, shape, model: FiT, train_cfg, segments: int = 0,
                     ddpm_steps: int = 0):  # fmt: skip
    """Time, noise and label-drop draws for each row from fold_in(key, global row index).

    Drawing per row makes the step's randomness independent of how the batch is split into
    microbatches or sharded, so gradient accumulation reproduces the full-batch step. Packed rows
    (segments > 0) draw one t and one label drop per image: (B, S). ddpm_steps > 0: t is a DDPM
    step index, uniform over [0, ddpm_steps) (FiT v1).
    """
    t_shape = (segments,) if segments else ()

    def one(i):
        k_t, k_noise, k_drop = jax.random.split(jax.random.fold_in(key, i), 3)
        if ddpm_steps:
            t = jax.random.randint(k_t, t_shape, 0, ddpm_steps)
        else:
            t = sample_timesteps(
                k_t, t_shape, train_cfg.time_sampler, train_cfg.time_mean, train_cfg.time_std
            )
        x0 = jax.random.normal(k_noise, shape, jnp.float32)
        drop = jax.random.uniform(k_drop, t_shape) < model.class_dropout_prob
        return t, x0, drop

    return jax.vmap(one)(index)


def segment_losses(pred, target, segment_ids, segments: int):
    """Packed rows: the official masked loss per image. pred, target: (B, N, C); segment_ids (B, N)
    with 1..S per image, 0 padding. Returns (losses (B, S), present (B, S) bool)."""
    onehot = (segment_ids[..., None] == jnp.arange(1, segments + 1)).astype(
        jnp.float32
    )  # (B, N, S)
    sq = jnp.sum(
        jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)), axis=-1
    )  # (B, N)
    count = jnp.sum(onehot, axis=1)
    losses = jnp.einsum("bn,bns->bs", sq, onehot) / (jnp.maximum(count, 1.0) * pred.shape[-1])
    return losses, count > 0


def ddpm_loss_fn(model: FiT, params, batch: dict, key, train_cfg, schedule: DDPMSchedule):
    """FiT v1's loss (`flow.ddpm.ddpm_loss`: epsilon MSE + variational bound), mean over rows."""
    x1 = batch["x"]
    t, noise, drop = per_sample_draws(key, batch["index"], x1.shape[1:], model, train_cfg,
                                      ddpm_steps=schedule.num_steps)  # fmt: skip
    x_t = q_sample(x1, noise, t, schedule)
    out = model.apply({"params": params}, x_t, t.astype(jnp.float32), batch["y"], batch["grid"],
                      batch["mask"], batch.get("size"), force_drop=drop)  # fmt: skip
    per_sample = ddpm_loss(out, x1, x_t, noise, t, batch["mask"], schedule)
    return jnp.mean(per_sample), per_sample


def loss_fn(model: FiT, params, batch: dict, key, train_cfg):
    """Scalar loss (the official masked velocity MSE, mean over images) and per-row losses.

    Packed batches (with "segment_ids", y (B, S)) average the per-image losses over all images.
    """
    x1 = batch["x"]
    packed = "segment_ids" in batch
    segments = batch["y"].shape[1] if packed else 0
    t, x0, drop = per_sample_draws(key, batch["index"], x1.shape[1:], model, train_cfg, segments)
    ids = batch["segment_ids"] if packed else batch["mask"]
    if packed:
        seg_index = jnp.clip(ids - 1, 0, segments - 1)
        t_tok = jnp.take_along_axis(t, seg_index, axis=1)[..., None]  # (B, N, 1)
        x_t = t_tok * x1 + (1.0 - t_tok) * x0
    else:
        x_t = interpolate(x0, x1, t)
    out = model.apply(
        {"params": params},
        x_t,
        t,
        batch["y"],
        batch["grid"],
        ids,
        batch.get("size"),
        force_drop=drop,
    )
    pred = out[..., : x1.shape[-1]]  # learn_sigma models: the velocity is the first p*p*C channels
    if packed:
        losses, present = segment_losses(pred, velocity_target(x0, x1), ids, segments)
        per_row = jnp.sum(losses * present, axis=1) / jnp.maximum(jnp.sum(present, axis=1), 1)
        return jnp.sum(losses * present) / jnp.maximum(jnp.sum(present), 1), per_row
    per_sample = masked_loss(pred, velocity_target(x0, x1), batch["mask"])
    return jnp.mean(per_sample), per_sample


def without_frozen_gradients(objective, labels):
    """objective(params, ...) differentiated only in the parameters labelled "train" (labels: a
    tree like params of "train" / "freeze", `state.trainable_labels`). The frozen ones enter
    through stop_gradient, so their weight-gradient matmuls are never built and their gradients
    are zeros, as with torch's requires_grad=False; the input gradients through them, which the
    trainable layers below need, stay."""

    def wrapped(params, *args):
        params = jax.tree.map(
            lambda p, label: p if label == "train" else jax.lax.stop_gradient(p), params, labels
        )
        return objective(params, *args)

    return wrapped


def make_train_step(model: FiT, config, tx: optax.GradientTransformation):
    train_cfg = config.train
    trainable = train_cfg.get("trainable", "all")
    accum = int(train_cfg.grad_accum_steps)
    diffusion = config.get("diffusion", {})
    if diffusion.get("kind", "rectified_flow") == "ddpm":
        if config.data.packing:
            raise UserError("FiT v1 (diffusion.kind=ddpm) trains on bucketed rows, not packed "
                            "ones: set --config.data.packing=False")  # fmt: skip
        schedule = make_schedule(int(diffusion.num_train_steps))
        objective = lambda p, b, k: ddpm_loss_fn(model, p, b, k, train_cfg, schedule)[0]
    else:
        objective = lambda p, b, k: loss_fn(model, p, b, k, train_cfg)[0]

    def step_fn(state: TrainState, batch: dict):
        batch = {k: batch[k] for k in BATCH_KEYS if k in batch}
        batch["index"] = jnp.arange(batch["x"].shape[0])
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        if trainable == "all":
            grad_fn = jax.value_and_grad(objective)
        else:  # post-training: no weight gradients for the frozen kernels
            labels = trainable_labels(state.params, trainable)
            grad_fn = jax.value_and_grad(without_frozen_gradients(objective, labels))

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
