r"""FiTv2-3B/2: 2971.9M params, 40 blocks, D=2304, 24 heads, AdaLN-LoRA r=576, 256-token context.

Command (TPU v5p-64 or larger, or v5e-256; FSDP):
  bash launch/tpu_pod.sh configs/fitv2_3b.py /mnt/bucket/fitv2_3b
  bash launch/tpu_pod.sh configs/fitv2_3b.py:v5e-256 /mnt/bucket/fitv2_3b   # PRESETS below
  python -m fitv2_jax.train --config configs/fitv2_3b.py --dry_run --topology v5p-64  # memory, est.
Hardware: paper trained 1000K steps at batch 256; needs FSDP (params + Adam state ~48 GB in fp32).
Reproduces: FID-50K 2.15 at 256x256 (cfg 1.5), 6.72 at 160x320, 13.73 at 128x384; 3.22 / 4.87 / 12.15
  at 320x320 / 224x448 / 160x480.
Settings by slice (`configs/fitv2_3b.py:SLICE`, `config.slices`): the fastest found by the README's
TPU table (`python -m fitv2_jax.bench --suite tpu --presets`, `train --dry_run --topology T`;
compiler estimates on a CPU host, not measurements; global batch 256; 2026-12-06):
  v5p-64   the defaults: all 40 blocks unrolled, no remat, attention auto (the "short" kernels,
           `models.short_attention`): 122.9 ms, 56.6% MFU, 10.23 of 95 GiB per chip
  v6e-64   the defaults: 79.7 ms, 21.8% MFU, 5.86 of 32 GiB
  v5e-256  one image per chip: blocks scanned, full remat: 123.8 ms, 16.4% MFU, 0.60 of 16 GiB;
           the estimate leaves the interconnect out: each chip sends 22.27 GiB a step over ICI, at
           least 119.6 ms at v5e's bandwidth (v5p-64: 26.65 GiB, 47.7 ms; the dry run prints both)
The other settings compiled (scanned blocks, remat "dots", XLA attention, splash, other meshes)
and their figures: README, TPU section.
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
    config.model = fitv2_model(hidden_size=2304, depth=40, num_heads=24)
    config.model.dtype = "bfloat16"  # the paper's bf16 mixed precision (fp32 master weights)
    config.model.remat_policy = "none"  # TPU defaults: see the module docstring
    config.model.scan_unroll = 40  # every block unrolled: no scan loop (module docstring)
    config.model.attention_backend = "auto"  # on TPU: models.attention.resolve_backend
    config.train.total_steps = 1_000_000
    return with_preset(config, PRESETS, preset, default="v5p-64")
