#!/usr/bin/env bash
# The README's test command: creates (or reuses) .venv, installs the project with its test
# extras, lints, and runs the test suite on 8 fake CPU devices.
#   bash launch/test.sh              # everything
#   bash launch/test.sh tests/test_rope.py -k ntk   # extra args go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/_venv.sh
ensure_venv test

echo "== ruff"
"$VENV/bin/ruff" check fitv2_jax configs tests
"$VENV/bin/ruff" format --check fitv2_jax configs tests

echo "== pytest"
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=8"
exec "$VENV/bin/python" -m pytest -q -x -n 2 --dist loadfile --durations=15 "$@"
