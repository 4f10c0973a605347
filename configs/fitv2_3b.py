r"""FiTv2-3B/2: 2971.9M params, 40 blocks, D=2304, 24 heads, AdaLN-LoRA r=576, 256-token context.

Command (TPU v5p-64 or larger, or v5e-256; FSDP):
  bash launch/tpu_pod.sh configs/fitv2_3b.py /mnt/bucket/fitv2_3b
  python -m fitv2_jax.train --config configs/fitv2_3b.py --dry_run --topology v5p-64  # memory, est.
  bash launch/tpu_pod.sh configs/fitv2_3b.py:v5e-256 /mnt/bucket/fitv2_3b   # PRESETS, see below
Hardware: paper trained 1000K steps at batch 256; needs FSDP (params + Adam state ~48 GB in fp32).
Reproduces: FID-50K 2.15 at 256x256 (cfg 1.5), 6.72 at 160x320, 13.73 at 128x384; 3.22 / 4.87 / 12.15
  at 320x320 / 224x448 / 160x480.
TPU defaults (remat none, all 40 blocks unrolled; attention auto = the "short" kernels at 256
  tokens, `models.short_attention`, 2026-12-05, with the q/k norms and RoPE inside them since
  later that day: v5p-64 130.2 ms, 53.4% MFU, 10.17 of 95 GiB per chip (with the norms and RoPE
  in XLA 135.6 ms, 51.3%, 11.25 GiB), against 139 ms, 50.0% with XLA attention; v6e-64 78.5 ms,
  22.1% MFU, 5.79 of 32 GiB (88.2 ms with them in XLA); v5e-256 scanned with full remat, its
  preset (auto takes the short kernels with full remat too): 152.8 ms, 13.2% MFU, 0.59 of
  16 GiB (150.9 ms with the norms and RoPE in XLA, compiled side by side: the one slice where moving
  them in did not help; README, TPU section), against 164 ms with "dots" and splash, its preset until then; the rows below are from
  before them). Since the kernels also take the q/k/v projection's output and bias (2026-12-06):
  v5p-64 122.9 ms, 56.6% MFU, 10.23 GiB; v5e-256 preset 123.8 ms, 16.4%, 0.60 GiB; v6e-64
  79.7 ms, 21.8%, 5.86 GiB, the one slice slower than before (78.5 ms).
  and the presets for other slices (`--config configs/fitv2_3b.py:SLICE`, `config.slices`)
  from the README's TPU table (`python -m fitv2_jax.bench --suite tpu` and `train --dry_run`,
  compiler estimates, global batch 256, FSDP over every chip, 2026-12-03/04):
  v5p-64  unrolled without remat 151.5 ms (45.9% MFU, 12.1 of 95 GiB per chip; splash 152.0 ms,
          even) vs scanned with full remat 204 ms (splash 199) or `dots` 209 (splash 204);
          since XLA attention keeps its probabilities for the backward on TPU (2026-12-05),
          unrolled without remat 147 ms (47.1%, 11.2 GiB); since the attention kernels are
          stored flat (`models.layers.DenseND`, 2026-12-05), 139 ms (50.0%, 11.8 GiB).
  v6e-64  preset: the defaults (the "short" kernels, 2026-12-05: 88.2 ms, 19.7% MFU, 6.2 of
          32 GiB, against 88.7 with splash, its preset until then, compiled earlier that day;
          the estimate is deterministic for the same code and libtpu). Before them:
          splash (`--config.model.attention_backend=splash`), unrolled without remat
          91 ms (6.1 of 32 GiB) vs scanned: 129 ms with `dots` and splash, 144 with full
          remat, 150 without remat; data 2 x FSDP 32, which helps XL/2 there, gives 91.9 ms.
          With the attention kernels stored flat (side by side, 2026-12-05): 88.7 ms (19.6%,
          6.8 GiB) vs 91.9 with XLA attention.
  v5e-256 one image per chip: scanned blocks with remat "dots" win, 161 ms with splash (12.6%,
          1.0 of 16 GiB) vs 167 with XLA attention, 185 with full remat, 187 scanned without
          remat, 215 unrolled with `dots`: its preset was `--config.model.remat_policy=dots
          --config.model.scan_unroll=1` (auto then picks splash), until the short kernels.
          With the attention kernels stored flat (2026-12-05): 164 ms (12.3%, 1.2 GiB).
  `--config.model.gather_attention_once=True` (FSDP gathers each block's attention kernels once
  and keeps them for the backward): v5p-64 148.1 ms (46.9%, 13.1 GiB) vs 151.5 (2026-12-04; the
  table's rows are without it).
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
