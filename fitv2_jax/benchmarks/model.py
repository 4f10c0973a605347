"""Model throughput: forward and forward+backward tokens/s, FLOP/s and the fraction of matmul peak.

    python -m fitv2_jax.bench --suite model --config configs/fitv2_b.py --batch_size 8 \
        --tokens 256

FLOPs per image = 2 x (linear multiply-accumulates + attention-map multiply-accumulates) for the
forward, 3x that for forward+backward. The peak is a large jnp.dot timed in the same process.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from fitv2_jax.cli import flags as cli
from fitv2_jax.config.files import load_config
from fitv2_jax.models.build import build_model, init_params
from fitv2_jax.models.fit import FiT
from fitv2_jax.models.summary import summarize, train_step_flops
from fitv2_jax.utils.errors import UserError
from fitv2_jax.utils.timing import matmul_peak_flops, median_seconds

FLAGS = flags.FLAGS
DTYPES = ["float32", "bfloat16"]


def define_flags(module_name: str) -> None:
    m = module_name
    flags.DEFINE_string("config", "configs/fitv2_b.py", "config file", module_name=m)
    flags.DEFINE_integer("batch_size", 8, "images per call", module_name=m)
    flags.DEFINE_integer("tokens", 256, "tokens per image (a near-square patch grid)",
                         module_name=m)  # fmt: skip
    flags.DEFINE_enum("dtype", "float32", DTYPES, "compute dtype", module_name=m)
    flags.DEFINE_integer("repeats", 5, "timed calls, median reported", module_name=m)
    cli.define_renamed("batch", "batch_size")


def square_inputs(model: FiT, batch: int, tokens: int) -> dict:
    """Random model inputs of `batch` full-length images on a near-square grid of `tokens`."""
    side = int(round(tokens**0.5))
    h, w = side, tokens // side
    n = h * w
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, n, model.patch_size**2 * model.in_channels)).astype(np.float32)
    grid = np.broadcast_to(
        np.stack([np.tile(np.arange(w), h), np.repeat(np.arange(h), w)]), (batch, 2, n)
    )
    return dict(
        x=jnp.asarray(x),
        t=jnp.asarray(rng.uniform(size=batch), jnp.float32),
        y=jnp.asarray(rng.integers(0, model.num_classes, batch), jnp.int32),
        grid=jnp.asarray(grid, jnp.int32),
        mask=jnp.ones((batch, n), jnp.float32),
        size=jnp.asarray(np.tile([h, w], (batch, 1)), jnp.int32),
    )


def main() -> None:
    if min(FLAGS.batch_size, FLAGS.tokens, FLAGS.repeats) < 1:
        raise UserError("--batch_size, --tokens and --repeats must be >= 1")
    cfg = load_config(FLAGS.config).model
    model = build_model(dict(cfg, dtype=FLAGS.dtype))
    inp = square_inputs(model, FLAGS.batch_size, FLAGS.tokens)
    b, n = inp["x"].shape[:2]
    params = jax.jit(lambda k: init_params(model, k))(jax.random.key(0))

    fwd = jax.jit(lambda p, inp: model.apply({"params": p}, **inp))
    loss = lambda p, inp: jnp.mean(model.apply({"params": p}, **inp) ** 2)
    fwd_bwd = jax.jit(jax.value_and_grad(loss))

    flops_fwd_bwd = train_step_flops(cfg, b, n)
    peak = matmul_peak_flops()
    t_fwd = median_seconds(fwd, params, inp, repeats=FLAGS.repeats)
    t_bwd = median_seconds(fwd_bwd, params, inp, repeats=FLAGS.repeats)
    n_params = summarize(cfg, tokens=n)["total_params"]
    print(f"config={FLAGS.config} batch={b} tokens={n} dtype={FLAGS.dtype} "
          f"params={n_params / 1e6:.1f}M")  # fmt: skip
    print(f"matmul peak (2048^2 float32 jnp.dot): {peak / 1e9:.1f} GFLOP/s")
    for name, t, flops in (
        ("forward", t_fwd, flops_fwd_bwd / 3),
        ("forward+backward", t_bwd, flops_fwd_bwd),
    ):
        print(
            f"{name:<17} median {t * 1e3:8.1f} ms  {b * n / t:10.0f} tokens/s  "
            f"{flops / t / 1e9:8.1f} GFLOP/s  {flops / t / peak:6.1%} of matmul peak"
        )
