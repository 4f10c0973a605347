#!/usr/bin/env bash
# The multi-process tests (tests/test_multihost.py): the real commands on 2 and 4 processes
# joined by jax.distributed on localhost. Kept out of launch/test.sh to hold that under 15
# minutes on 2 cores; CI (.ci/run) runs both.
#   bash launch/test_multihost.sh            # after (or instead of) bash launch/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
exec bash launch/test.sh --multihost -n 0 tests/test_multihost.py "$@"
