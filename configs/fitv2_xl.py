r"""FiTv2-XL/2: 671.0M params, 36 blocks, D=1152, 16 heads, AdaLN-LoRA r=288, 256-token context.

Command (TPU v4-64 or v5p-64 pod slice, FSDP over all chips):
  bash launch/tpu_pod.sh configs/fitv2_xl.py /mnt/bucket/fitv2_xl
Hardware: paper trained 2000K steps at global batch 256 on A100s (bf16); a v5p-64 slice is the
  intended TPU target.
Reproduces: FID-50K 2.26 at 256x256 (cfg 1.5, dopri5, EMA weights), 5.50 at 160x320, 14.46 at 128x384;
  3.55 / 5.54 / 13.55 at 320x320 / 224x448 / 160x480 with VisionNTK + attention scale.
TPU defaults (remat full, XLA attention) from the README's TPU table
  (`python -m fitv2_jax.bench --suite tpu`, compiler estimates): v5p-64, global batch 256, XLA
  attention: remat full 83 ms and 1.2 GiB per chip vs none 124 ms and 9.2 GiB; splash attention
  85 ms (full remat), so at 256 tokens it gains nothing. Since FSDP shards the FFN kernels on their
  hidden axis: 75 ms (21.3% MFU) on v5p-64, 51 ms on v5e-256, 46 ms on v6e-64 (full remat).
"""

from fitv2_jax.config.defaults import base_config, fitv2_model


def get_config():
    config = base_config()
    config.model = fitv2_model(hidden_size=1152, depth=36, num_heads=16)
    config.model.dtype = "bfloat16"  # the paper's bf16 mixed precision (fp32 master weights)
    config.model.remat_policy = "full"  # TPU defaults: see the module docstring
    config.model.attention_backend = "xla"  # splash is no faster at 256 tokens (module docstring)
    return config
