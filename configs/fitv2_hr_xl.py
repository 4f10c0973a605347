r"""FiTv2-XL/2 high-resolution post-training: 1024-token context, online decoupled NTK-aware RoPE.

Starts from the 256-token FiTv2-XL/2 and trains only the x_embedder, every bias, all adaLN weights
and the final layer (95.0M of 671.0M), re-initialising that subset as the official code does; the
other kernels get no weight gradients (`training.step.without_frozen_gradients`).
Command (v5p-64 and v6e-64; on v5e-256 append its preset: configs/fitv2_hr_xl.py:v5e-256):
  bash launch/tpu_pod.sh configs/fitv2_hr_xl.py /mnt/bucket/fitv2_hr_xl \
      --config.train.init_from=/path/to/fitv2_xl.safetensors
Hardware: paper: 400K steps at batch 256, constant LR 1e-4, no warmup.
Reproduces: FID-50K 2.90 at 512x512 (cfg 1.65), 4.87 at 320x640, 18.55 at 256x768 (VisionNTK).
Settings by slice (`configs/fitv2_hr_xl.py:SLICE`, `config.slices`): the fastest found by the
README's TPU table (`python -m fitv2_jax.bench --suite tpu --presets`; compiler estimates on a CPU
host, not measurements; global batch 256 x 1024 tokens; 2026-12-06, MFU over the post-training's
FLOPs, `models.summary.train_step_flops`):
  v5p-64   the defaults: all 36 blocks unrolled, no remat, attention auto (the "short" kernels,
           `models.short_attention`; splash on v4): 75.4 ms, 66.4% MFU, 14.3 of 95 GiB per chip
  v6e-64   the defaults: 51 ms, 24.5% MFU, 5.7 of 32 GiB
  v5e-256  one image per chip: all blocks unrolled, full remat: 66 ms, 22.1% MFU, 3.1 of 16 GiB
           (scanned: 77.5 ms, 2.3 GiB; scanned with remat "dots" 77.9 ms, 3.1 GiB). FSDP over
           256 chips cannot shard the attention kernels (a warning says so); they are frozen
           here, so that costs no optimizer state.
The other settings compiled and their figures: README, TPU section.
"""

from fitv2_jax.config.defaults import base_config, fitv2_model, post_training
from fitv2_jax.config.slices import with_preset

# per-slice overrides of the settings below, which are for v5p-64 (module docstring)
PRESETS = {
    "v5p-64": {},
    "v6e-64": {},
    "v5e-256": {"model.remat_policy": "full"},
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
