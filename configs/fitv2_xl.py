r"""FiTv2-XL/2: 671.0M params, 36 blocks, D=1152, 16 heads, AdaLN-LoRA r=288, 256-token context.

Command (TPU v4-64 or v5p-64 pod slice, FSDP over all chips; v6e-64 and v5e-256: their presets):
  bash launch/tpu_pod.sh configs/fitv2_xl.py /mnt/bucket/fitv2_xl
  bash launch/tpu_pod.sh configs/fitv2_xl.py:v5e-256 /mnt/bucket/fitv2_xl   # PRESETS below
  python -m fitv2_jax.train --config configs/fitv2_xl.py --dry_run --topology v5p-64  # memory, est.
Hardware: paper trained 2000K steps at global batch 256 on A100s (bf16); a v5p-64 slice is the
  intended TPU target.
Reproduces: FID-50K 2.26 at 256x256 (cfg 1.5, dopri5, EMA weights), 5.50 at 160x320, 14.46 at 128x384;
  3.55 / 5.54 / 13.55 at 320x320 / 224x448 / 160x480 with VisionNTK + attention scale.
Settings by slice (`configs/fitv2_xl.py:SLICE`, `config.slices`): the fastest found by the README's
TPU table (`python -m fitv2_jax.bench --suite tpu --presets`, `train --dry_run --topology T`;
compiler estimates on a CPU host, not measurements; global batch 256; 2026-12-06):
  v5p-64   the defaults: all 36 blocks unrolled, no remat, attention auto (the "short" kernels,
           `models.short_attention`): 37.0 ms, 43.0% MFU, 4.36 of 95 GiB per chip
  v6e-64   data 2 x FSDP 32 (`mesh.ici=(2, -1, 1)`): 27.5 ms, 14.5% MFU, 2.27 of 32 GiB; over all
           64 chips libtpu gathers the weights by all-reduces of zero-padded buffers
  v5e-256  data 2 x FSDP 128, blocks scanned, full remat: 30.2 ms, 15.4% MFU, 0.13 of 16 GiB;
           FSDP over all 256 chips divides neither attention kernel (1152 x 3456, 1152 x 1152),
           which then stay replicated (a warning says so). The estimate leaves the interconnect
           out: each chip sends 5.67 GiB a step over ICI, at least 30.5 ms at v5e's bandwidth, as
           long as the estimate itself (v5p-64: 6.27 GiB, 11.2 ms; the dry run prints both)
MFU at global batch 256: at 8 images per v5p chip the compiler prices the linear layers alone at
  55% of the bf16 peak (`python -m fitv2_jax.bench --suite tpu_matmuls`), and the step without
  the blocks' norms, modulation, gates and adaLN-LoRA would still be 34.0 ms, 46.8% (`bench
  --suite tpu_blocks --blocks 36 --ablate norms,modulation,gates,adaln`); a larger batch per chip
  is what raises it (global batch 1024: 112.6 ms, 56.6%, 14.7 GiB, 2026-12-05). The other
  settings compiled and their figures: README, TPU section.
"""

from fitv2_jax.config.defaults import base_config, fitv2_model
from fitv2_jax.config.slices import with_preset

# per-slice overrides of the settings below, which are for v5p-64 (module docstring)
PRESETS = {
    "v5p-64": {},
    "v6e-64": {"mesh.ici": (2, -1, 1)},
    "v5e-256": {"mesh.ici": (2, -1, 1), "model.remat_policy": "full", "model.scan_unroll": 1},
}


def get_config(preset=None):
    config = base_config()
    config.model = fitv2_model(hidden_size=1152, depth=36, num_heads=16)
    config.model.dtype = "bfloat16"  # the paper's bf16 mixed precision (fp32 master weights)
    config.model.remat_policy = "none"  # TPU defaults: see the module docstring
    config.model.scan_unroll = 36  # every block unrolled: no scan loop (module docstring)
    config.model.attention_backend = "auto"  # on TPU: models.attention.resolve_backend
    return with_preset(config, PRESETS, preset, default="v5p-64")
