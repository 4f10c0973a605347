"""Model throughput: forward and forward+backward tokens/s, FLOP/s and the fraction of matmul peak.

    python -m fitv2_jax.bench --suite model --config configs/fitv2_b.py --batch 8 --tokens 256

FLOPs per image = 2 x (linear multiply-accumulates + attention-map multiply-accumulates) for the
forward, 3x that for forward+backward. The peak is a large jnp.dot timed in the same process.
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fitv2_jax.benchmarks.timing import matmul_peak_flops, median_seconds
from fitv2_jax.config_file import load_config
from fitv2_jax.models.fit import FiT
from fitv2_jax.models.summary import summarize


def square_inputs(model: FiT, batch: int, tokens: int):
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


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m fitv2_jax.bench --suite model")
    parser.add_argument("--config", default="configs/fitv2_b.py")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    cfg = load_config(args.config).model
    model = FiT(**dict(cfg, dtype=args.dtype))
    inp = square_inputs(model, args.batch, args.tokens)
    n = inp["x"].shape[1]
    params = jax.jit(lambda k: nn.unbox(model.init(k, **inp)["params"]))(jax.random.key(0))

    fwd = jax.jit(lambda p, inp: model.apply({"params": p}, **inp))
    loss = lambda p, inp: jnp.mean(model.apply({"params": p}, **inp) ** 2)
    fwd_bwd = jax.jit(jax.value_and_grad(loss))

    s = summarize(cfg, tokens=n)
    flops_fwd = 2 * (s["total_gmacs"] + s["attention_map_gmacs"]) * 1e9 * args.batch
    peak = matmul_peak_flops()
    t_fwd = median_seconds(fwd, params, inp, repeats=args.repeats)
    t_bwd = median_seconds(fwd_bwd, params, inp, repeats=args.repeats)
    print(
        f"config={args.config} batch={args.batch} tokens={n} dtype={args.dtype} params={s['total_params'] / 1e6:.1f}M"
    )
    print(f"matmul peak (2048^2 {args.dtype} jnp.dot): {peak / 1e9:.1f} GFLOP/s")
    for name, t, flops in (
        ("forward", t_fwd, flops_fwd),
        ("forward+backward", t_bwd, 3 * flops_fwd),
    ):
        print(
            f"{name:<17} median {t * 1e3:8.1f} ms  {args.batch * n / t:10.0f} tokens/s  "
            f"{flops / t / 1e9:8.1f} GFLOP/s  {flops / t / peak:6.1%} of matmul peak"
        )
