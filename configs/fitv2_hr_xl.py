r"""FiTv2-XL/2 high-resolution post-training: 1024-token context, online decoupled NTK-aware RoPE.

Starts from the 256-token FiTv2-XL/2 and trains only the x_embedder, every bias, all adaLN weights
and the final layer (95.0M of 671.0M), re-initialising that subset as the official code does.
Command (v5p-64 and v6e-64; on v5e-256 append its preset: configs/fitv2_hr_xl.py:v5e-256):
  bash launch/tpu_pod.sh configs/fitv2_hr_xl.py /mnt/bucket/fitv2_hr_xl \
      --config.train.init_from=/path/to/fitv2_xl.safetensors
Hardware: paper: 400K steps at batch 256, constant LR 1e-4, no warmup.
Reproduces: FID-50K 2.90 at 512x512 (cfg 1.65), 4.87 at 320x640, 18.55 at 256x768 (VisionNTK).
TPU defaults (remat none, all 36 blocks unrolled; attention auto = the short kernels at 1024
  tokens on v5e/v5p/v6e, splash on v4; the splash figures below are from before them)
  from the README's TPU table (`python -m fitv2_jax.bench --suite tpu` and `train --dry_run`,
  compiler estimates, v5p-64, global batch 256 x 1024 tokens, 2026-12-03, the splash kernels
  priced by their work): unrolled without remat 149.1 ms (47.3% MFU, 20.2 GiB per chip), and
  142 ms (49.8%, 18.4 GiB) with the attention kernels stored flat (2026-12-05); a
  4-block program of it 17.9 ms with splash vs 20.9 ms with XLA attention; scanned with full
  remat: see the README table. `--dry_run` compiles for about 5 minutes per program on a 2-core
  host. v6e-64 (2026-12-04): unrolled without remat 108 ms (9.1 of 32 GiB) vs scanned full remat
  133 ms, so the defaults hold there too; with `--config.mesh.ici='(2,-1,1)'` (FSDP over 32
  chips, 2026-12-04) 104.9 ms, 10.9 GiB. With the attention kernels stored flat (side by side,
  2026-12-05, `bench --suite tpu --presets` and its rows) FSDP over all 64 chips wins: 95.3 ms
  (18.5% MFU, 9.5 GiB) vs 107 ms with data 2 x FSDP 32, so the v6e-64 preset is the defaults.
  `--config.model.gather_attention_once=True` (each block's attention kernels gathered once,
  kept for the backward) on v5p-64: 147.9 ms, 18.6 GiB
  (2026-12-04; the table's rows are without it). On v5e-256 (one image per chip) its preset was
  `--config.model.remat_policy=dots --config.model.scan_unroll=1` (full remat since 2026-12-06,
  below): scanned with "dots" and splash
  84.2 ms (6.7 of 16 GiB), with full remat 85.4 ms (4.4 GiB; both with the attention kernels
  stored flat, 2026-12-05; before them full 103, "dots" 107, without remat 197 ms). FSDP over 256
  chips cannot shard the attention kernels there and says so in a warning; here that is cheap,
  the kernels being frozen (no Adam moments, their gradient unused): data 2 x FSDP 128, which shards
  them, is slower (`--config.mesh.ici='(2,-1,1)'`: 99.6 ms with "dots", 102 full; README, TPU table).
  With the short kernels at 1024 tokens ("auto" since the end of 2026-12-05): v5p-64 120.7 ms
  (58.4% MFU, 15.4 GiB; `train --dry_run --topology v5p-64`, 10 minutes) against 142 with
  splash; v6e-64 85.9 ms (20.5%, 7.6 GiB) against 95.3; v5e-256 preset 73.6 ms (27.9%, 6.1 GiB)
  against 84.2 (`bench --suite tpu --presets`), where full remat gives 77.3 ms (4.4 GiB), so
  "dots" stays its preset. A 4-block program on v5p-64: 13.97 ms against splash's 16.78.
  Since the short kernels also take the q/k/v projection's output and bias (2026-12-06): v5p-64
  114.3 ms (61.7% MFU, 14.85 GiB); v6e-64 87 ms (20.3%, 9.2 GiB); on v5e-256 scanned with
  "dots" 78.3 ms (26.2%, 6.1 GiB; the code before that change gives 73.6 ms compiled side by
  side, README, TPU) and with full remat 73.6 ms (27.9%, 4.4 GiB; `bench --suite tpu --configs
  configs/fitv2_hr_xl.py --topologies v5e-256 --remat full --attention short --scan_unroll 1`),
  so full remat is its preset since.
"""

from fitv2_jax.config.defaults import base_config, fitv2_model, post_training
from fitv2_jax.config.slices import with_preset

# per-slice overrides of the settings below, which are for v5p-64 (module docstring)
PRESETS = {
    "v5p-64": {},
    "v6e-64": {},
    "v5e-256": {"model.remat_policy": "full", "model.scan_unroll": 1},
}


def get_config(preset=None):
    config = base_config()
    config.model = fitv2_model(hidden_size=1152, depth=36, num_heads=16)
    config.model.dtype = "bfloat16"  # the paper's bf16 mixed precision (fp32 master weights)
    config.model.remat_policy = "none"  # TPU defaults: see the module docstring
    config.model.scan_unroll = 36  # every block unrolled: no scan loop (module docstring)
    config.model.attention_backend = "auto"  # on TPU: models.attention.resolve_backend
    config.sampling.official_cfg_scale = 1.65  # the official README's 512x512 and 320x640 runs
    return with_preset(
        post_training(config, total_steps=400_000), PRESETS, preset, default="v5p-64"
    )
