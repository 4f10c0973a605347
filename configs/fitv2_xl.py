r"""FiTv2-XL/2: 671.0M params, 36 blocks, D=1152, 16 heads, AdaLN-LoRA r=288, 256-token context.

Command (TPU v4-64 or v5p-64 pod slice, FSDP over all chips; v6e-64 and v5e-256: their presets):
  bash launch/tpu_pod.sh configs/fitv2_xl.py /mnt/bucket/fitv2_xl
  bash launch/tpu_pod.sh configs/fitv2_xl.py:v5e-256 /mnt/bucket/fitv2_xl   # PRESETS below
Hardware: paper trained 2000K steps at global batch 256 on A100s (bf16); a v5p-64 slice is the
  intended TPU target.
Reproduces: FID-50K 2.26 at 256x256 (cfg 1.5, dopri5, EMA weights), 5.50 at 160x320, 14.46 at 128x384;
  3.55 / 5.54 / 13.55 at 320x320 / 224x448 / 160x480 with VisionNTK + attention scale.
TPU settings by slice, the presets (`--config configs/fitv2_xl.py:SLICE`, `config.slices`), from
  the README's TPU table (`python -m fitv2_jax.bench --suite tpu [--presets]`, `train --dry_run
  --topology T`; compiler estimates, not measurements; global batch 256; the attention kernels
  stored flat, 2026-12-05):
  v5p-64   the defaults: all 36 blocks unrolled, no remat, attention auto (the "short" kernels
           at 256 tokens, `models.short_attention`, 2026-12-05, with the q/k norms and RoPE
           inside them since later that day): 41.0 ms, 38.9% MFU, 4.56 of 95 GiB per chip;
           37.0 ms, 43.0% MFU, 4.36 GiB since the kernels also take the q/k/v projection's
           output and bias (2026-12-06);
           with the norms and RoPE in XLA 44.6 ms, 35.7% MFU, 5.05 GiB; against 48.1 ms
           (33.1%, 5.46 GiB) with XLA attention keeping its
           probabilities, the default until then, and 52.8 with splash (the table's row);
           with XLA attention, data 2 x FSDP 16 (`--config.mesh.ici='(2,-1,1)'`) is even, 48.2 ms.
           Before the flat kernels (2026-12-03/04, 53.2 ms for the defaults then): splash 52.8 ms
           unrolled; scanned with full remat 66.7 ms (splash 61.5, 1.2 GiB); unrolled with remat
           "dots" 56.3 ms (splash 54.7). `--config.model.gather_attention_once=True` no longer
           helps (4 blocks 5.54 vs 5.46 ms).
  v6e-64   preset: `--config.mesh.ici='(2,-1,1)'` (data 2 x FSDP 32), blocks unrolled without
           remat: 27.5 ms, 14.5% MFU, 2.27 of 32 GiB since the "short" kernels take the q/k/v
           projection's output and bias (2026-12-06); 28.6 ms, 13.9% MFU, 2.25 GiB with the norms and
           RoPE inside (2026-12-05; with them in XLA 30.5 ms; 33.6 ms, 2.7 GiB with XLA
           attention), vs 39.8 ms with FSDP over all 64 chips (XLA attention),
           where libtpu gathers the weights by all-reduces of zero-padded buffers (README, TPU
           table).
  v5e-256  (one image per chip) preset: `--config.mesh.ici='(2,-1,1)'
           --config.model.remat_policy=full --config.model.scan_unroll=1` (auto picks the
           "short" kernels): 30.2 ms, 15.4% MFU, 0.13 of 16 GiB since they take the q/k/v
           projection's output and bias (2026-12-06); 31.1 ms, 14.9% with the norms and RoPE
           inside them (2026-12-05; 33.2 ms with them in XLA), against 35.2 ms (13.2%, 0.4 GiB)
           with remat "dots" and splash, its preset until then; with "dots" the short kernels
           give 32.7 (35.9 with the norms and RoPE in XLA); full remat with splash 36.9, with
           XLA attention 35.6.
           FSDP over all 256 chips divides neither attention kernel (1152 x 3456, 1152 x 1152),
           so the default mesh replicates them (a warning says so): scanned with full remat and
           splash 84.9 ms, unrolled without remat 69 ms.
  Unrolling's price: `--dry_run` compiles for about 5 minutes per program on a 2-core host (two
  programs: the step and the estimate's). Scanned without remat loses (stacking every block's
  residuals in the loop costs more than recomputing them).
MFU ceiling (`python -m fitv2_jax.bench --suite tpu_matmuls`, 2026-12-04): at 8 images per v5p chip
  the compiler prices the linear layers alone at 55% of the bf16 peak, so no step passes 57%; with
  XLA attention the whole step's matmuls, its own included, give 47.7% (`--dry_run`'s "only the
  matmuls' cycles" line, 2026-12-05). Larger batches per chip (`--global_batch` of the TPU bench
  suite, v5p-64, 2026-12-05, XLA attention): 512 84.2 ms (37.9%, before the flat kernels), 1024
  131 ms (48.8%, 18.2 GiB); with the "short" kernels 1024 gives 124.5 ms, 51.2%, 16.6 GiB
  (`train --dry_run --topology v5p-64 --dry_run_batch 1024`), and with the q/k norms and RoPE
  inside them 112.6 ms, 56.6%, 14.7 GiB. At global batch 256 the whole step without the blocks'
  LayerNorms, modulation, gates and adaLN-LoRA (`bench --suite tpu_blocks --blocks 36 --ablate
  norms,modulation,gates,adaln`, 2026-12-06) would still be 34.0 ms, 46.8% (README, TPU).
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
