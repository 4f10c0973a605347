r"""FiTv2-B/2: 128.1M params, 15 blocks, D=768, 12 heads, AdaLN-LoRA r=192, 256-token context.

Command (one TPU v4-8 host or 8 GPUs):
  python -m fitv2_jax.train --config configs/fitv2_b.py --workdir /tmp/fitv2_b
Hardware: a single 8-chip host; the paper's ablation model.
Reproduces: FID-50K 26.03 at 256x256 after 400K steps without CFG (FiT-B/2: 36.36); 16.52 at 2000K.
TPU defaults (remat none, all 15 blocks unrolled; attention auto = the "short" kernels at 256
  tokens, `models.short_attention`, with the q/k norms and RoPE inside them (later on
  2026-12-05): on v5p-64 9.0 ms, 33.3% MFU, 1.16 of 95 GiB per chip (8.5 ms, 35.5%, 1.14 GiB
  since they also take the q/k/v projection's output and bias, 2026-12-06); v6e-64 7.3 ms, 10.3% MFU,
  0.70 of 32 GiB (7.1 ms, 10.6%, 0.71 GiB since; remat "dots" 8.2); v5e-256, scanned with full remat (its preset): 5.7 ms,
  15.4% MFU, 0.03 of 16 GiB. With the norms and RoPE still in XLA (earlier that day): v5p-64
  10.5 ms, 28.5% MFU, 1.3 GiB, against 11.7 ms with XLA attention; v6e-64 8.1 ms, 9.3% MFU, 0.8
  of 32 GiB, ahead of its earlier preset, remat "dots" with splash, 8.4 ms (with "dots" the
  short kernels gave 9.0), so the defaults are now its v6e-64 preset too; v5e-256, scanned
  with full remat (its preset since): 6.0 ms, 14.6% MFU, against 6.56 ms with "dots" and
  splash, its preset until then) and, from before those kernels, from the README's TPU table
  (`python -m fitv2_jax.bench --suite tpu` and `train --dry_run`, compiler estimates, v5p-64,
  global batch 256, 2026-12-03): unrolled without remat 13.4 ms (22.4% MFU, 1.6 of 95 GiB per
  chip) vs 24.1 ms with the blocks scanned (the earlier default, which stacks every block's
  residuals in the loop); unrolled with remat "dots" 13.8 ms (XLA
  attention) or 13.1 ms (splash, its kernels priced at their roofline: even within that price).
  Other slices (same command, `--topology`), their presets (`--config configs/fitv2_b.py:SLICE`,
  `config.slices`): v6e-64, before the short kernels, `--config.model.remat_policy=dots` (auto
  then picks splash): 8.7 ms vs 10.7 with the defaults (full remat 9.6 ms); on v5e-256 (one
  image per chip) the defaults give 11.9 ms, 0.5 of 16 GiB; its preset was, until the short
  kernels,
  `--config.model.remat_policy=dots --config.model.scan_unroll=1` (auto then picks splash):
  6.92 ms, 56 MiB per chip (full remat 7.94 ms, with XLA attention 8.3 ms; 2026-12-04,
  `bench --suite tpu --scan_unroll 1`).
  Since XLA attention keeps its probabilities for the backward on TPU (`models.attention.
  saves_probs`, 2026-12-05): v5p-64 unrolled without remat 11.9 ms (25.3% MFU, 1.5 GiB), ahead
  of "dots" with splash (13.1 ms, the earlier row); the v6e-64 and v5e-256 rows above predate it.
  Since the attention kernels are stored flat (`models.layers.DenseND`, 2026-12-05): v5p-64
  unrolled without remat 11.7 ms (25.6% MFU, 1.4 GiB); v5e-256 scanned with "dots" and
  splash 6.56 ms (13.3%); v6e-64 with "dots" and splash 8.4 ms (8.9%, 0.7 GiB) vs the
  defaults' 9.11 ms (side by side, `bench --suite tpu --presets` and its rows).
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
