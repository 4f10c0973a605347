#!/usr/bin/env bash
# Train on a SLURM GPU cluster: one process per node, all its GPUs, jax.distributed over nodes.
#
#   sbatch --nodes=4 launch/gpu_slurm.sh configs/fitv2_xl.py /shared/runs/fitv2_xl \
#       --config.data.path=/shared/in1k_latents_256
#
# Install once on the shared filesystem: python3 -m venv .venv && .venv/bin/pip install -e '.[eval]' 'jax[cuda12]'
# WORKDIR must be on a filesystem all nodes share, or a gs:// URL (the gcs extra). Rerunning
# resumes from the latest checkpoint; SLURM's SIGTERM before the time limit (use
# --signal=TERM@120) saves and exits 0.
#SBATCH --job-name=fitv2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --signal=TERM@120
#SBATCH --output=fitv2-%j.out
set -euo pipefail
CONFIG="${1:?usage: sbatch launch/gpu_slurm.sh CONFIG WORKDIR [--config.a.b=value ...]}"
WORKDIR="${2:?usage: sbatch launch/gpu_slurm.sh CONFIG WORKDIR [--config.a.b=value ...]}"
shift 2
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
# jax.distributed.initialize() reads the coordinator, process count and id from SLURM's env.
srun --kill-on-bad-exit=1 .venv/bin/python -m fitv2_jax.train --config "$CONFIG" --workdir "$WORKDIR" \
  --distributed=on "$@"
