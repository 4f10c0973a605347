"""VAE throughput: `python -m fitv2_jax.bench --suite vae [--size 256 --batch_size 2 --repeats 3]`.

Times `VAE.encode` (posterior mean) and `VAE.decode` of the real kl-f8 architecture (random
weights: speed does not depend on their values) on this machine's default JAX backend, and
reports the median images/s over repeats (compilation excluded). `--memory` adds XLA's compiled
temporary-buffer size for one call at the sizes the project relies on (1024x1024 decode, a
batch chunk at 256x256), without running them.
"""

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from tqdm import tqdm

from fitv2_jax.cli import flags as cli
from fitv2_jax.models import vae as vae_lib
from fitv2_jax.utils.errors import UserError
from fitv2_jax.utils.files import write_json_atomic

FLAGS = flags.FLAGS


def define_flags(module_name: str) -> None:
    m = module_name
    flags.DEFINE_integer("size", 256, "square image side, multiple of 8", module_name=m)
    flags.DEFINE_integer("batch_size", 2, "images per call", module_name=m)
    flags.DEFINE_integer("repeats", 3, "timed calls per measurement", module_name=m)
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype",
                      module_name=m)  # fmt: skip
    flags.DEFINE_bool("memory", False, "also report compiled memory", module_name=m)
    flags.DEFINE_bool("torch", False, "also time diffusers' PyTorch AutoencoderKL in this "
                      "process (needs torch and diffusers)", module_name=m)  # fmt: skip
    flags.DEFINE_string("out", None, "also write the results to this JSON file", module_name=m)
    for old, new in (("batch", "batch_size"), ("json", "out")):
        cli.define_renamed(old, new)


def _median_rate(fn, x, batch: int, repeats: int, desc: str) -> tuple[float, list[float]]:
    jax.block_until_ready(fn(x))  # compile + warm up (torch tensors pass through untouched)
    times = []
    for _ in tqdm(range(repeats), desc=desc, leave=False):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(x))
        times.append(time.perf_counter() - t0)
    return batch / statistics.median(times), times


def _compiled_temp_gib(fn, module, params, shape) -> float:
    compiled = fn.lower(module, params, jax.ShapeDtypeStruct(shape, jnp.float32)).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2**30


def _torch_rates(images: np.ndarray, latents: np.ndarray, repeats: int) -> tuple[float, float, int]:
    """images/s of diffusers' AutoencoderKL (SD config, float32, CPU) on the same inputs, and
    torch's thread count."""
    try:
        import diffusers
        import torch
    except ImportError as e:
        raise UserError(f"--torch needs torch and diffusers installed ({e})") from e
    n = 4
    model = diffusers.AutoencoderKL(
        block_out_channels=vae_lib.KL_F8["block_out_channels"],
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        layers_per_block=vae_lib.KL_F8["layers_per_block"],
        norm_num_groups=vae_lib.KL_F8["norm_num_groups"],
        latent_channels=4,
    ).eval()
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    z = torch.from_numpy(latents.transpose(0, 3, 1, 2).copy())
    batch = images.shape[0]
    with torch.no_grad():
        enc, _ = _median_rate(
            lambda a: model.encode(a).latent_dist.mean, x, batch, repeats, "torch encode"
        )
        dec, _ = _median_rate(lambda a: model.decode(a).sample, z, batch, repeats, "torch decode")
    return enc, dec, torch.get_num_threads()


def _memory(vae) -> dict[str, float]:
    """XLA's compiled temporary memory (GiB) of one call at the sizes the project relies on."""
    m, p = vae.module, vae.params
    chunk = vae_lib.DEFAULT_MAX_PIXELS // 256**2
    mem = {
        "decode 1x1024x1024": _compiled_temp_gib(vae_lib._decode, m, p, (1, 128, 128, 4)),
        f"decode {chunk}x256x256 (one chunk)": _compiled_temp_gib(
            vae_lib._decode, m, p, (chunk, 32, 32, 4)
        ),
        "encode 1x1024x1024": _compiled_temp_gib(vae_lib._moments, m, p, (1, 1024, 1024, 3)),
        f"encode {chunk}x256x256 (one chunk)": _compiled_temp_gib(
            vae_lib._moments, m, p, (chunk, 256, 256, 3)
        ),
    }
    for k, v in mem.items():
        print(f"  compiled temp memory, {k}: {v:.2f} GiB")
    return mem


def main() -> None:
    size, batch, repeats, dtype = FLAGS.size, FLAGS.batch_size, FLAGS.repeats, FLAGS.dtype
    if size % 8 or size <= 0:
        raise UserError(f"--size must be a positive multiple of 8, got {size}")
    if batch < 1 or repeats < 1:
        raise UserError("--batch_size and --repeats must be >= 1")

    vae = vae_lib.random_vae(jax.random.key(0), **vae_lib.KL_F8, dtype=jnp.dtype(dtype))
    # Whole batch in one call, no tiling: the timing is of the network, not of the chunk loop.
    vae = vae.with_options(max_pixels=batch * size**2, tile=None)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.uniform(-1, 1, (batch, size, size, 3)), jnp.float32)
    latents = jnp.asarray(rng.standard_normal((batch, size // 8, size // 8, 4)), jnp.float32)

    res = {"size": size, "batch": batch, "repeats": repeats, "dtype": dtype}
    enc, enc_t = _median_rate(vae.encode, images, batch, repeats, "encode")
    dec, dec_t = _median_rate(vae.decode, latents, batch, repeats, "decode")
    res.update(encode_images_per_s=enc, decode_images_per_s=dec, encode_s=enc_t, decode_s=dec_t)
    print(
        f"vae kl-f8 {dtype} {size}x{size} batch {batch}, median of {repeats}: "
        f"encode {enc:.3f} img/s, decode {dec:.3f} img/s "
        f"(decode/encode time ratio {enc / dec:.2f})"
    )
    if FLAGS.torch:
        t_enc, t_dec, threads = _torch_rates(np.asarray(images), np.asarray(latents), repeats)
        res.update(torch_encode_images_per_s=t_enc, torch_decode_images_per_s=t_dec)
        print(
            f"diffusers torch {threads} threads: encode {t_enc:.3f} img/s, decode "
            f"{t_dec:.3f} img/s; jax/torch: encode {enc / t_enc:.2f}x, decode {dec / t_dec:.2f}x"
        )
    if FLAGS.memory:
        res["compiled_temp_gib"] = _memory(vae)
    if FLAGS.out:
        write_json_atomic(FLAGS.out, res, indent=1)
        print(f"results written to {FLAGS.out}")
    else:
        print("results: printed above (add --out PATH to save them)")
