r"""FiTv2-3B/2: 2971.9M params, 40 blocks, D=2304, 24 heads, AdaLN-LoRA r=576, 256-token context.

Command (TPU v5p-64 or larger, or v5e-256; FSDP):
  bash launch/tpu_pod.sh configs/fitv2_3b.py /mnt/bucket/fitv2_3b
  python -m fitv2_jax.train --config configs/fitv2_3b.py --dry_run --topology v5p-64  # memory, est.
  (v5e-256: add --config.model.remat_policy=full --config.model.scan_unroll=1, see below)
Hardware: paper trained 1000K steps at batch 256; needs FSDP (params + Adam state ~48 GB in fp32).
Reproduces: FID-50K 2.15 at 256x256 (cfg 1.5), 6.72 at 160x320, 13.73 at 128x384; 3.22 / 4.87 / 12.15
  at 320x320 / 224x448 / 160x480.
TPU defaults (remat none, all 40 blocks unrolled; attention auto = XLA attention at 256 tokens)
  from the README's TPU table (`python -m fitv2_jax.bench --suite tpu` and `train --dry_run`,
  compiler estimates, global batch 256, 2026-12-03): v5p-64 unrolled without remat 151.5 ms
  (45.9% MFU, 12.1 of 95 GiB per chip) vs the scanned blocks with full remat 204 ms (34.1%,
  3.6 GiB; splash 199 ms, its kernels priced by their work). v5e-256 (one image per chip) was
  measured scanned with full remat only:
  0.7 of 16 GiB per chip with either attention (XLA est. 202 ms, 10.0%; splash 185 ms), so it fits
  a v5e chip; there pass `--config.model.remat_policy=full --config.model.scan_unroll=1` (unrolling
  lost on v5e-256 for XL/2: 65 vs 48 ms; auto then picks splash, the blocks being recomputed).
  Unrolled on v5p-64 with splash instead of XLA attention: 152.0 ms, 11.7 GiB (even). Scanned without remat (before 2026-12-03): 18.8 GiB and
  269 ms on v5p-64.
  2026-12-04 (`bench --suite tpu`, splash): v6e-64 unrolled without remat 91 ms (6.1 of 32 GiB) vs
  scanned full remat 144 ms, so the defaults hold there; v5e-256 unrolled with remat "dots" 215 ms
  (8.4 of 16 GiB), still slower than scanned full remat (185 ms).
"""

from fitv2_jax.config.defaults import base_config, fitv2_model


def get_config():
    config = base_config()
    config.model = fitv2_model(hidden_size=2304, depth=40, num_heads=24)
    config.model.dtype = "bfloat16"  # the paper's bf16 mixed precision (fp32 master weights)
    config.model.remat_policy = "none"  # TPU defaults: see the module docstring
    config.model.scan_unroll = 40  # every block unrolled: no scan loop (module docstring)
    config.model.attention_backend = "auto"  # splash on TPU from 1024 tokens (256 with remat)
    config.train.total_steps = 1_000_000
    return config
