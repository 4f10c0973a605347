r"""FiTv2-B/2: 128.1M params, 15 blocks, D=768, 12 heads, AdaLN-LoRA r=192, 256-token context.

Command (one TPU v4-8 host or 8 GPUs):
  python -m fitv2_jax.train --config configs/fitv2_b.py --workdir /tmp/fitv2_b
Hardware: a single 8-chip host; the paper's ablation model.
Reproduces: FID-50K 26.03 at 256x256 after 400K steps without CFG (FiT-B/2: 36.36); 16.52 at 2000K.
TPU defaults (remat none; attention auto = XLA attention at 256 tokens) from the README's TPU
  table (`python -m fitv2_jax.bench --suite tpu`, compiler estimates, 2026-12-03):
  v5p-64, global batch 256, no remat: XLA attention 24.1 ms (12.5% MFU) vs splash 24.3 ms (its
  kernels priced by their work).
"""

from fitv2_jax.config.defaults import base_config, fitv2_model


def get_config():
    config = base_config()
    config.model = fitv2_model(hidden_size=768, depth=15, num_heads=12)
    config.model.dtype = "bfloat16"  # the paper's bf16 mixed precision (fp32 master weights)
    config.model.remat_policy = "none"  # TPU defaults: see the module docstring
    config.model.attention_backend = "auto"  # splash on TPU from 1024 tokens, else XLA
    config.train.total_steps = 400_000  # the paper's ablation length
    return config
