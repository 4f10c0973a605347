r"""FiTv2-3B/2: 2971.9M params, 40 blocks, D=2304, 24 heads, AdaLN-LoRA r=576, 256-token context.

Command (TPU v5p-64 or larger, or v5e-256; FSDP):
  bash launch/tpu_pod.sh configs/fitv2_3b.py /mnt/bucket/fitv2_3b
  python -m fitv2_jax.train --config configs/fitv2_3b.py --dry_run --topology v5e-256  # memory check
Hardware: paper trained 1000K steps at batch 256; needs FSDP (params + Adam state ~48 GB in fp32).
Reproduces: FID-50K 2.15 at 256x256 (cfg 1.5), 6.72 at 160x320, 13.73 at 128x384; 3.22 / 4.87 / 12.15
  at 320x320 / 224x448 / 160x480.
TPU defaults (remat full; attention auto = XLA attention at 256 tokens) from the README's TPU
  table (`python -m fitv2_jax.bench --suite tpu`, compiler estimates, global batch 256):
  v5p-64 remat full: XLA attention 204 ms (34.1% MFU) vs splash 212 ms, 3.6 of 95 GiB per chip
  (2026-12-03); v5e-256 remat full: 0.7 of 16 GiB per chip with either attention (auto/XLA est.
  202 ms, 10.0%; splash 194 ms), so it fits a v5e chip. Remat none (before 2026-12-03): 18.8 GiB and
  269 ms on v5p-64 vs 222 ms with full, hence remat full.
"""

from fitv2_jax.config.defaults import base_config, fitv2_model


def get_config():
    config = base_config()
    config.model = fitv2_model(hidden_size=2304, depth=40, num_heads=24)
    config.model.dtype = "bfloat16"  # the paper's bf16 mixed precision (fp32 master weights)
    config.model.remat_policy = "full"  # TPU defaults: see the module docstring
    config.model.attention_backend = "auto"  # splash on TPU from 1024 tokens, else XLA
    config.train.total_steps = 1_000_000
    return config
