r"""FiT-XL/2 (v1): 823.6M params, 28 blocks, D=1152, full-rank adaLN, SwiGLU 4D, no QK-norm, learn_sigma.

The v1 model was trained with DDPM (epsilon + learned sigma, 1000 steps); this config loads and
samples the official v1 weights (the velocity objective here does not reproduce its training).
Command:
  python -m fitv2_jax.models.convert --config configs/fit_xl.py --input fit_xl.safetensors --output /tmp/fit_xl
Reproduces: FID-50K 4.21 at 256x256 (cfg 1.5), 5.48 at 160x320, 16.59 at 128x384.
"""

from fitv2_jax.config.defaults import base_config, fitv2_model


def get_config():
    config = base_config()
    config.model = fitv2_model(
        hidden_size=1152,
        depth=28,
        num_heads=16,
        learn_sigma=True,
        use_sit=False,
        use_swiglu_large=True,
        q_norm=None,
        k_norm=None,
        adaln_type="normal",
        adaln_lora_dim=None,
    )
    return config
