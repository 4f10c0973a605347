r"""FiTv2-3B/2 high-resolution post-training: 1024-token context, online decoupled NTK-aware RoPE.

Starts from the 256-token FiTv2-3B/2; trains the x_embedder, biases, adaLN and final layer only.
Command (v5p-64; on v6e-64 or v5e-256 append its preset: configs/fitv2_hr_3b.py:v5e-256):
  bash launch/tpu_pod.sh configs/fitv2_hr_3b.py /mnt/bucket/fitv2_hr_3b \
      --config.train.init_from=/path/to/fitv2_3B.safetensors
Hardware: paper: 200K steps at batch 256, constant LR 1e-4.
Reproduces: FID-50K 2.41 at 512x512 (cfg 1.6), 4.54 at 320x640, 16.08 at 256x768.
TPU defaults (remat none, all 40 blocks unrolled; attention auto = the short kernels at 1024
  tokens on v5e/v5p/v6e, splash on v4)
  from the README's TPU table (compiler estimates, v5p-64, global batch 256 x 1024 tokens,
  2026-12-03, the splash kernels priced by their work): `train --dry_run --topology v5p-64`
  unrolled without remat 473.6 ms (61.9% MFU, 44.7 of 95 GiB per chip) vs the scanned blocks with
  full remat about 620 ms (a 4-block program extrapolated to 40, as parallel/cost.py does, before
  the kernels were priced; compiled since, with them priced: 634 ms, 15.3 GiB). v6e-64
  (2026-12-04): unrolled without remat 266 ms (24.1 of 32 GiB) vs scanned full remat 343 ms, so the
  defaults hold; with `--config.mesh.ici='(2,-1,1)'` (FSDP over 32 chips; the v6e-64 preset)
  259.4 ms, 24.6 GiB. With the attention kernels stored flat (2026-12-05, `bench --suite tpu
  --presets`): v5p-64 451 ms (65.0% MFU, 40.9 GiB); v6e-64 preset 230 ms (31.9%, 21.6 GiB) vs
  238 ms over all 64 chips (side by side); v5e-256 preset 357 ms (23.9%, 10.5 GiB).
  `--config.model.gather_attention_once=True` on v5p-64: 472.1 ms, 43.0 GiB (2026-12-04; the
  table's rows are without it).
  On v5e (16 GiB) the preset is `--config.model.remat_policy=full --config.model.scan_unroll=1`:
  v5e-256 433 ms, 10.5 of 16 GiB per chip (with "dots" 447 ms, 14.0 GiB; README, TPU table).
  Keep the Pallas kernels on v5e and v6e: with XLA attention and "dots" the step does not fit
  either chip (temporaries 15.77 of the 15.75 GiB libtpu can use on v5e, 34.92 of 31.25 on v6e),
  nor scanned without remat on v5e with either attention (2026-12-04).
  With the short kernels at 1024 tokens ("auto" since the end of 2026-12-05; `bench --suite tpu
  --presets`): v5p-64 422 ms (69.5% MFU, 39.5 GiB), v6e-64 preset 198 ms (37.0%, 20.9 GiB). On
  v5e-256 they lose: 421 ms against splash's 357 with the preset's full remat (side by side, the
  estimate's programs of 1 and 2 scanned blocks: a block 9.83 vs 8.17 ms; XLA converts whole
  gathered MLP kernel gradients to float32 in the blocks' backward with them, not with splash),
  so that preset names splash.
"""

from fitv2_jax.config.defaults import base_config, fitv2_model, post_training
from fitv2_jax.config.slices import with_preset

# per-slice overrides of the settings below, which are for v5p-64 (module docstring)
PRESETS = {
    "v5p-64": {},
    "v6e-64": {"mesh.ici": (2, -1, 1)},
    # splash, not "auto": with the short kernels XLA fuses the blocks' backward worse here
    "v5e-256": {
        "model.remat_policy": "full",
        "model.scan_unroll": 1,
        "model.attention_backend": "splash",
    },
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
