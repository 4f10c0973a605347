r"""FiT-XL/2 (v1): 823.6M params, 28 blocks, D=1152, full-rank adaLN, SwiGLU 4D, no QK-norm, learn_sigma.

FiT v1 is a DDPM (epsilon + learned sigma over 1000 linear-beta steps; improved-diffusion), so
sampling uses the DDPM sampler over 250 respaced steps (`--solver auto`) and training the
official MSE + variational-bound loss.
Command (the official checkpoint, FiTv1_xl/model_ema.bin, read without torch):
  python -m fitv2_jax.sample --config configs/fit_xl.py --checkpoint FiTv1_xl/model_ema.bin \
      --vae /weights/sd-vae-ft-ema --sizes 256x256 --cfg_scale 1.5
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
        clamp_time=False,
    )
    config.diffusion.kind = "ddpm"
    config.train.warmup_steps = 500  # the official configs/fit/config_fit_xl.yaml
    return config
