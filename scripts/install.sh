#!/usr/bin/env bash
# Idempotent setup for a fresh machine: a virtual environment in .venv with the
# CPU build of PyTorch, the project in editable mode, redis-server and the npm
# packages of the Node.js client. A second run only checks and returns quickly.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${FACEPQ_VENV:-.venv}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[install] creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
# The CPU build of torch for this environment; the project itself accepts any torch>=2.1.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "[install] torch==2.13.0 (CPU build)"
  $PIP install -q --upgrade pip
  $PIP install -q "torch==2.13.0" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
fi
# Installing facepq compiles the scan kernels' extension module (query_node._fastscan), so
# the C compiler comes first; without one 4-bit codes scan with the slower numba kernel
# (same results).
if ! command -v gcc >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "[install] gcc (apt) for the native scan kernels"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc libc6-dev >/dev/null
fi
# Reinstall when the metadata or the kernels' C sources change: an editable install
# rebuilds the extension in place only then.
stamp="$VENV/.facepq-installed"
needs_install() {
  [ -f "$stamp" ] || return 0
  for f in pyproject.toml setup.py query_node/*.c query_node/*.h; do
    [ "$f" -nt "$stamp" ] && return 0
  done
  return 1
}
if needs_install; then
  echo "[install] facepq and its dependencies"
  $PIP install -q -e ".[dev]" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  touch "$stamp"
fi
# gRPC stubs are generated from proto/ (never committed); regenerate when the .proto changes.
"$VENV/bin/python" -m facepq_proto.build --quiet

if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[install] redis-server (apt)"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  else
    echo "[install] redis-server not found and cannot be installed here; Redis tests will fail" >&2
  fi
fi
# The multi-host tests (tests/multihost) make virtual hosts with iproute2's `ip netns` (as root).
if ! command -v ip >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "[install] iproute2 (apt) for the multi-host tests"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 >/dev/null
fi
"$VENV/bin/python" -c "from query_node import fastscan; print('[install] 4-bit scan kernel:', fastscan.status())"
if [ -f clients/node/package.json ] && command -v npm >/dev/null 2>&1 && [ ! -d clients/node/node_modules ]; then
  echo "[install] npm packages for the Node.js client"
  (cd clients/node && npm install --silent --no-audit --no-fund >/dev/null)
fi
echo "[install] ready: $VENV/bin/facepq"
