r"""FiTv2-XL/2: 671.0M params, 36 blocks, D=1152, 16 heads, AdaLN-LoRA r=288, 256-token context.

Command (TPU v4-64 or v5p-64 pod slice, FSDP over all chips):
  bash launch/tpu_pod.sh configs/fitv2_xl.py /mnt/bucket/fitv2_xl
Hardware: paper trained 2000K steps at global batch 256 on A100s (bf16); a v5p-64 slice is the
  intended TPU target.
Reproduces: FID-50K 2.26 at 256x256 (cfg 1.5, dopri5, EMA weights), 5.50 at 160x320, 14.46 at 128x384;
  3.55 / 5.54 / 13.55 at 320x320 / 224x448 / 160x480 with VisionNTK + attention scale.
TPU defaults (remat none, all 36 blocks unrolled, attention auto = XLA attention at 256 tokens)
  from the README's TPU table (`python -m fitv2_jax.bench --suite tpu` and `train --dry_run`,
  compiler estimates, v5p-64, global batch 256, 2026-12-03): unrolled without remat 53.2 ms
  (29.9% MFU, 5.6 GiB per chip) vs the scanned blocks with full remat 66.7 ms (23.9%, 1.2 GiB);
  splash (kernels priced by their work) 52.8 ms unrolled, 61.5 ms scanned with full remat;
  unrolled with remat "dots" 56.3 ms (XLA attention), 54.7 ms (splash).
  Scanned, no remat loses (stacking every block's residuals in the loop costs more than
  recomputing them). The price of unrolling: `--dry_run` compiles for about
  5 minutes per program on a 2-core host (two programs: the step and the estimate's).
  Other slices (same command, `--topology`): v6e-64 unrolled 45 ms (3.8 of 32 GiB) vs scanned full
  remat 51 ms, and 37.6 ms (2.8 GiB) with `--config.mesh.ici='(2,-1,1)'` (2026-12-04): FSDP over
  32 chips, not 64, where libtpu gathers the weights by all-reduces of zero-padded buffers (README,
  TPU table); but v5e-256, one image per chip, unrolled 65 ms (5.3 of 16 GiB) vs scanned full remat
  48 ms: there pass `--config.model.remat_policy=full --config.model.scan_unroll=1` (auto then
  picks splash, the blocks being recomputed: 46.8 ms, 4.4 GiB; with remat "dots" and splash 60 ms
  scanned, 63 unrolled, 2026-12-04; unlike 3B/2, for which "dots" wins there).
  `--config.model.gather_attention_once=True` (FSDP gathers each block's attention kernels once
  and keeps them for the backward, 0.36 GiB per chip): v5p-64 52.1 ms (30.6% MFU, 5.65 GiB) vs
  53.2, with splash 52.2 vs 52.8 (2026-12-04; the table's rows are without it); not on v6e-64
  with data 2 x FSDP 32: 38.6 vs 37.6 ms.
  Since the XLA softmax's static shift (commit 6ffdeba, `models.softmax_attention`): v5p-64
  52.7 ms (30.2% MFU, 5.6 GiB) with this config as it is, 51.5 ms (30.9%, 5.6 GiB) with
  `gather_attention_once`; since RoPE's one-pass backward on TPU too (`models.rope`), 51.9 ms
  (30.7%) as it is and 50.3 ms (31.7%, 5.64 GiB) with `gather_attention_once` (2026-12-04;
  the other figures here are from before them); since RoPE's permutation matmul on TPU
  (`models.rope`), 51.8 ms (30.7%, 5.55 GiB) as it is; since XLA attention keeps its
  probabilities for the backward on TPU (`models.attention.saves_probs`), 49.9 ms (31.9%,
  5.00 GiB) as it is, 49.1 ms (32.5%) with `gather_attention_once` (2026-12-05); as it is on
  v6e-64 42.6 ms (3.5 GiB; the data 2 x FSDP 32 figure above predates it) and on v5e-256 62.4 ms
  (4.9 GiB), still behind the scanned blocks with full remat there (46.8 ms, which predates it
  but is not affected: it recomputes its blocks); since the attention kernels are stored flat
  (`models.layers.DenseND`), 48.1 ms on v5p-64 as it is (33.1% MFU, 5.46 GiB; 2026-12-05),
  where `gather_attention_once` no longer helps (4 blocks 5.54 vs 5.46 ms).
MFU ceiling (`python -m fitv2_jax.bench --suite tpu_matmuls`, 2026-12-04): at 8 images per v5p chip
  the compiler prices the linear layers alone at 55% of the bf16 peak, so no step passes 57%;
  the whole step's matmuls, attention's included, give 49.1% (`--dry_run`'s "only the matmuls'
  cycles" line, 2026-12-05; 47.7% with the flat attention kernels). Larger batches per chip (`--global_batch` of the TPU bench suite,
  v5p-64, 2026-12-05): 512 84.2 ms (37.9%), 1024 131 ms (48.6%, 17.9 GiB).
"""

from fitv2_jax.config.defaults import base_config, fitv2_model


def get_config():
    config = base_config()
    config.model = fitv2_model(hidden_size=1152, depth=36, num_heads=16)
    config.model.dtype = "bfloat16"  # the paper's bf16 mixed precision (fp32 master weights)
    config.model.remat_policy = "none"  # TPU defaults: see the module docstring
    config.model.scan_unroll = 36  # every block unrolled: no scan loop (module docstring)
    config.model.attention_backend = "auto"  # splash on TPU from 1024 tokens (256 with remat)
    return config
