#!/usr/bin/env bash
# The README's first command: set up .venv and run the embedded default end to end, offline:
# prepare real photos -> train FiTv2 (~9 min on 2 cores) -> sample at 4 sizes -> FID early vs final.
#   bash launch/demo.sh                 # writes demo_out/report.md; rerun to resume
#   bash launch/demo.sh --steps 400     # extra flags go to `python -m fitv2_jax.demo`
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/_venv.sh
ensure_venv demo
exec "$VENV/bin/python" -m fitv2_jax.demo "$@"
