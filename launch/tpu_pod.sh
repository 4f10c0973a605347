#!/usr/bin/env bash
# Train on every worker of a Cloud TPU VM slice (one process per host, jax.distributed).
#
#   export TPU_NAME=my-v5p-64 ZONE=us-east5-a          # (and PROJECT=... if not the default)
#   SETUP=1 bash launch/tpu_pod.sh                     # once: copy this repo to all workers, install
#   bash launch/tpu_pod.sh configs/fitv2_xl.py gs://bucket/fitv2_xl --config.data.path=/mnt/bucket/in1k_256
#   bash launch/tpu_pod.sh configs/fitv2_xl.py:v5e-256 gs://bucket/fitv2_xl ...   # another slice
#
# CONFIG may name a preset for the slice (configs/fitv2_xl.py:v5e-256; without one a pod config
# keeps its v5p-64 settings, and the run says so on another slice).
# WORKDIR is a gs:// URL (the gcs extra, installed below) or a path every worker sees (NFS, a
# gcsfuse mount): checkpoints, metrics.jsonl, tensorboard/, samples/ and eval/ go there. Rerunning the same command resumes from the latest
# checkpoint; a preempted slice gets SIGTERM, saves and exits 0, so just rerun after recreation.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU zone}"
GCLOUD=(gcloud compute tpus tpu-vm)
PROJECT_FLAG=()
[ -n "${PROJECT:-}" ] && PROJECT_FLAG=(--project "$PROJECT")
REMOTE_DIR="${REMOTE_DIR:-fitv2-jax}"
cd "$(dirname "$0")/.."

if [ "${SETUP:-0}" = 1 ]; then
  tar czf /tmp/fitv2-jax.tgz --exclude=.venv --exclude=.git --exclude=demo_out .
  "${GCLOUD[@]}" scp /tmp/fitv2-jax.tgz "$TPU_NAME":/tmp/ --zone "$ZONE" --worker=all "${PROJECT_FLAG[@]}"
  "${GCLOUD[@]}" ssh "$TPU_NAME" --zone "$ZONE" --worker=all "${PROJECT_FLAG[@]}" --command "
    mkdir -p $REMOTE_DIR && tar xzf /tmp/fitv2-jax.tgz -C $REMOTE_DIR && cd $REMOTE_DIR &&
    python3 -m venv .venv && .venv/bin/pip install -q -U pip &&
    .venv/bin/pip install -q -e '.[eval,tpu,gcs]'"
  echo "installed on every worker of $TPU_NAME in ~/$REMOTE_DIR"
  exit 0
fi

CONFIG="${1:?usage: bash launch/tpu_pod.sh CONFIG WORKDIR [--config.a.b=value ...]}"
WORKDIR="${2:?usage: bash launch/tpu_pod.sh CONFIG WORKDIR [--config.a.b=value ...]}"
shift 2
# each word quoted for the workers' shell: a mesh such as --config.mesh.ici='(2,-1,1)' reaches
# them as one word, not as a parenthesised subshell, and so does a path with a space
ARGS_Q="$(printf ' %q' --config "$CONFIG" --workdir "$WORKDIR" "$@")"
"${GCLOUD[@]}" ssh "$TPU_NAME" --zone "$ZONE" --worker=all "${PROJECT_FLAG[@]}" --command "
  cd $REMOTE_DIR && .venv/bin/python -m fitv2_jax.train$ARGS_Q \
    --distributed=on 2>&1 | tee -a /tmp/fitv2_train.log"
