r"""FiTv2-B/2: 128.1M params, 15 blocks, D=768, 12 heads, AdaLN-LoRA r=192, 256-token context.

Command (one TPU v4-8 host or 8 GPUs; on a pod slice add `:SLICE`, its preset below):
  python -m fitv2_jax.train --config configs/fitv2_b.py --workdir /tmp/fitv2_b
Hardware: a single 8-chip host; the paper's ablation model.
Reproduces: FID-50K 26.03 at 256x256 after 400K steps without CFG (FiT-B/2: 36.36); 16.52 at 2000K.
Settings by slice (`configs/fitv2_b.py:SLICE`, `config.slices`): the fastest found by the README's
TPU table (`python -m fitv2_jax.bench --suite tpu --presets`; compiler estimates on a CPU host,
not measurements; global batch 256):
  v5p-64   the defaults: all 15 blocks unrolled, no remat, attention auto (the "short" kernels,
           `models.short_attention`): 8.5 ms, 35.5% MFU, 1.14 of 95 GiB per chip (2026-12-06)
  v6e-64   the defaults: 7.1 ms, 10.6% MFU, 0.71 of 32 GiB (2026-12-06)
  v5e-256  one image per chip: blocks scanned, full remat: 5.7 ms, 15.4% MFU, 0.03 of 16 GiB
           (2026-12-05)
What else was compiled (scanned blocks, remat "dots", XLA attention, splash), and why these win:
README, TPU section.
"""

from fitv2_jax.config.defaults import base_config, fitv2_model
from fitv2_jax.config.slices import with_preset

# per-slice overrides of the settings below, which are for v5p-64 (module docstring)
PRESETS = {
    "v5p-64": {},
    "v6e-64": {},
    "v5e-256": {"model.remat_policy": "full", "model.scan_unroll": 1},
}


def get_config(preset=None):
    config = base_config()
    config.model = fitv2_model(hidden_size=768, depth=15, num_heads=12)
    config.model.dtype = "bfloat16"  # the paper's bf16 mixed precision (fp32 master weights)
    config.model.remat_policy = "none"  # TPU defaults: see the module docstring
    config.model.scan_unroll = 15  # every block unrolled: no scan loop (module docstring)
    config.model.attention_backend = "auto"  # on TPU: models.attention.resolve_backend
    config.train.total_steps = 400_000  # the paper's ablation length
    return with_preset(config, PRESETS, preset, default="v5p-64")
