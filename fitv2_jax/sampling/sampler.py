"""Batch-by-batch image generation on a device mesh: the loop shared by sample, evaluate and
training's sample grids.

    sampler = Sampler(config.model, params, mesh, vae=vae, batch_size=32)
    images, nfe = sampler.plan_images(plan, ids, labels, key, SolverOptions("euler", 32))

Params are placed once on the mesh (replicated on a data-only mesh, FSDP-sharded on the training
mesh); each batch of global sample indices is padded to the fixed batch size, split over the
mesh's data x fsdp devices, generated, gathered and decoded.
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from fitv2_jax.models.build import abstract_params
from fitv2_jax.parallel.rules import batch_sharding, tree_shardings
from fitv2_jax.sampling.generate import SolverOptions, generate, initial_noise
from fitv2_jax.sampling.images import to_uint8, tokens_to_images
from fitv2_jax.sampling.rules import model_for_size, resolve_rule
from fitv2_jax.sampling.sizes import SizePlan
from fitv2_jax.utils.errors import UserError


def param_shardings(model_cfg, mesh):
    """NamedShardings of the params on `mesh` from their logical axis names (FSDP / tensor rules
    of the training mesh; replicated on a data-only mesh)."""
    return tree_shardings(abstract_params(model_cfg, boxed=True), mesh)


def _to_global(x, sharding):
    """A host array (the same on every host) placed as one global array with `sharding`."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def batch_devices(mesh) -> int:
    """How many ways the batch is split: the mesh's data x fsdp axes."""
    return int(mesh.shape["data"] * mesh.shape["fsdp"])


def device_memory_bytes(device) -> int:
    """What one device can hold: the accelerator's limit, or this host's RAM for a CPU."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def attention_bytes(model_cfg, tokens: int, rows: int) -> int:
    """float32 attention scores of one block for `rows` sequences of `tokens` tokens: XLA
    attention materialises them (the largest buffer of a sampling step at large sizes)."""
    return rows * int(model_cfg["num_heads"]) * tokens * tokens * 4


def check_fits(model_cfg, h: int, w: int, rows_per_device: int, device) -> None:
    """Refuses, before any compile, a size whose attention scores cannot fit on a device."""
    if model_cfg.get("attention_backend", "xla") not in ("xla", "einsum"):
        return  # flash / splash kernels never hold the scores
    need, have = attention_bytes(model_cfg, h * w, rows_per_device), device_memory_bytes(device)
    if need > have:
        side = math.isqrt(math.isqrt(have // (rows_per_device * int(model_cfg["num_heads"]) * 4)))
        raise UserError(
            f"a {h}x{w}-patch image ({h * w} tokens) needs {need / 2**30:.3g} GiB of attention "
            f"scores per device ({rows_per_device} sequences incl. CFG), but a device holds "
            f"{have / 2**30:.3g} GiB; lower --batch_size or use sizes up to ~{side}x{side} "
            "patches"
        )


def class_labels(num: int, num_classes: int, seed: int, given=None) -> np.ndarray:
    """(num,) labels: `given` (a list of ints) repeated to num, or uniform from the seed."""
    if given is None or len(given) == 0:
        return np.random.default_rng(seed).integers(0, num_classes, num)
    labels = np.asarray(given, np.int64)
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if len(bad):
        raise UserError(f"--labels {bad.tolist()}: labels must be in [0, {num_classes - 1}] "
                        f"(config.model.num_classes={num_classes})")  # fmt: skip
    return np.resize(labels, num)


class Sampler:
    """Generates uint8 images batch by batch on a mesh.

    h, w in patches; ids (B,) global sample indices (they pick each sample's noise), labels
    (B,). The batch is padded up to `batch_size` (a multiple of the data x fsdp device count,
    so one compile serves every batch) with the next indices, then cut back. Returns uint8
    images (B, H, W, 3) numpy and the number of velocity evaluations of the batch.
    """

    def __init__(self, model_cfg, params, mesh, *, vae=None, latent: bool = True, batch_size=16):
        self.model_cfg, self.mesh, self.vae, self.latent = model_cfg, mesh, vae, latent
        if latent and vae is None:
            raise UserError("a latent-space config needs a VAE to decode samples (--vae PATH)")
        if int(batch_size) < 1:
            raise UserError(f"--batch_size {batch_size}: give at least 1")
        k = batch_devices(mesh)
        self.batch_size = -(-int(batch_size) // k) * k
        self.params = jax.tree.map(_to_global, params, param_shardings(model_cfg, mesh))

    def tokens(self, h, w, ids, labels, key, *, rule="auto", **opts):
        """(B, h*w, p*p*C) tokens and nfe; opts go to `generate`."""
        ids, labels = np.asarray(ids, np.int64), np.asarray(labels, np.int64)
        n = len(ids)
        if n > self.batch_size:
            raise ValueError(f"{n} samples exceed the batch size {self.batch_size}")
        pad = self.batch_size - n
        ids = np.concatenate([ids, ids.max(initial=-1) + 1 + np.arange(pad)])
        labels = np.concatenate([labels, np.resize(labels, pad)])
        self.check_fits(h, w)
        model = model_for_size(self.model_cfg, h, w, resolve_rule(rule, self.model_cfg, h, w))
        p, c = model.patch_size, model.in_channels
        noise_key, sde_key = jax.random.split(key)
        x0 = _to_global(initial_noise(noise_key, ids, h * w, p * p * c),
                        batch_sharding(self.mesh, 3))  # fmt: skip
        y = _to_global(labels.astype(np.int32), batch_sharding(self.mesh, 1))
        sde_key = jax.random.fold_in(sde_key, int(ids[0]))  # SDE noise per batch
        tokens, nfe = generate(model, self.params, sde_key, y, h, w, x0=x0, **opts)
        if not tokens.is_fully_addressable:  # several hosts: every host gets the whole batch
            tokens = multihost_utils.process_allgather(tokens, tiled=True)
        return tokens[:n], int(nfe)

    def check_fits(self, h: int, w: int) -> None:
        """A UserError, before any work, when an h x w-patch batch cannot fit on a device."""
        rows = 2 * self.batch_size // batch_devices(self.mesh)  # CFG doubles the batch
        local = [d for d in self.mesh.devices.flat if d.process_index == jax.process_index()]
        check_fits(self.model_cfg, h, w, rows, local[0])  # memory stats: own devices only

    def images(self, h, w, ids, labels, key, **kw):
        tokens, nfe = self.tokens(h, w, ids, labels, key, **kw)
        x = tokens_to_images(tokens, h, w, int(self.model_cfg["patch_size"]))
        if self.latent:
            x = self.vae.decode(x)
        return to_uint8(x), nfe

    def plan_images(self, plan: SizePlan, ids, labels, key, options: SolverOptions):
        """`images` for one size of a plan (its rule and CFG scale) with the given solver."""
        return self.images(plan.h, plan.w, ids, labels, key, rule=plan.rule,
                           cfg_scale=plan.cfg_scale, **options.kwargs())  # fmt: skip
