r"""FiTv2-3B/2 high-resolution post-training: 1024-token context, online decoupled NTK-aware RoPE.

Starts from the 256-token FiTv2-3B/2; trains the x_embedder, biases, adaLN and final layer only
(the other kernels get no weight gradients: `training.step.without_frozen_gradients`).
Command (v5p-64; on v6e-64 or v5e-256 append its preset: configs/fitv2_hr_3b.py:v5e-256):
  bash launch/tpu_pod.sh configs/fitv2_hr_3b.py /mnt/bucket/fitv2_hr_3b \
      --config.train.init_from=/path/to/fitv2_3B.safetensors
Hardware: paper: 200K steps at batch 256, constant LR 1e-4.
Reproduces: FID-50K 2.41 at 512x512 (cfg 1.6), 4.54 at 320x640, 16.08 at 256x768.
Settings by slice (`configs/fitv2_hr_3b.py:SLICE`, `config.slices`): the fastest found by the
README's TPU table (`python -m fitv2_jax.bench --suite tpu --presets`; compiler estimates on a CPU
host, not measurements; global batch 256 x 1024 tokens; 2026-12-06, MFU over the post-training's
FLOPs, `models.summary.train_step_flops`):
  v5p-64   the defaults: all 40 blocks unrolled, no remat, attention auto (the "short" kernels,
           `models.short_attention`; splash on v4): 270 ms, 75.0% MFU, 30.8 of 95 GiB per chip
  v6e-64   data 2 x FSDP 32 (`mesh.ici=(2, -1, 1)`): 98.6 ms, 51.3% MFU, 12.2 of 32 GiB
  v5e-256  blocks scanned, full remat: 218 ms, 27.0% MFU, 0.5 of 16 GiB (splash: 259 ms)
The other settings compiled and their figures: README, TPU section.
"""

from fitv2_jax.config.defaults import base_config, fitv2_model, post_training
from fitv2_jax.config.slices import with_preset

# per-slice overrides of the settings below, which are for v5p-64 (module docstring)
PRESETS = {
    "v5p-64": {},
    "v6e-64": {"mesh.ici": (2, -1, 1)},
    "v5e-256": {"model.remat_policy": "full", "model.scan_unroll": 1},
}


def get_config(preset=None):
    config = base_config()
    config.model = fitv2_model(hidden_size=2304, depth=40, num_heads=24)
    config.model.dtype = "bfloat16"  # the paper's bf16 mixed precision (fp32 master weights)
    config.model.remat_policy = "none"  # TPU defaults: see the module docstring
    config.model.scan_unroll = 40  # every block unrolled: no scan loop (module docstring)
    config.model.attention_backend = "auto"  # on TPU: models.attention.resolve_backend
    return with_preset(
        post_training(config, total_steps=200_000), PRESETS, preset, default="v5p-64"
    )
