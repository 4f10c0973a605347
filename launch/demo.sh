#!/usr/bin/env bash
# The README's first command: set up .venv and run the embedded default end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/_venv.sh
ensure_venv
echo "The end-to-end demo (train, sample, evaluate on offline real images) is not built yet."
echo "The package is installed in $VENV; see README.md for what works today."
