#!/usr/bin/env bash
# Idempotent setup for a fresh machine: gcc and redis-server (apt, as root; waits for a dpkg
# lock held by another process), a virtual environment in .venv with the CPU build of PyTorch,
# the project in editable mode (its build generates the gRPC stubs and compiles the scan
# kernels) and the npm packages of the Node.js client. A second run only checks and returns
# quickly. Everything but apt is an ordinary `pip install -e ".[dev]"`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${FACEPQ_VENV:-.venv}"
PY="${PYTHON:-python3}"

# System packages first (apt, as root): the C compiler for the scan kernels (pip builds them),
# redis-server for the local cluster and iproute2 for the multi-host tests; apt-install.sh waits
# for a dpkg lock another process holds.
apt_packages=()
command -v gcc >/dev/null 2>&1 || apt_packages+=(gcc libc6-dev)
command -v redis-server >/dev/null 2>&1 || apt_packages+=(redis-server)
# iproute2's `ip netns` makes the virtual hosts of the multi-host tests (tests/multihost, as root)
command -v ip >/dev/null 2>&1 || apt_packages+=(iproute2)
# Debian's chromium: the web page's test drives it headless (tests/reliability/test_web_page.py)
[ -x /usr/bin/chromium ] || apt_packages+=(chromium)
if [ "${#apt_packages[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[install] ${apt_packages[*]} (apt)"
    PYTHON="$PY" bash scripts/apt-install.sh "${apt_packages[@]}"
  else
    echo "[install] not installed and not installable here (needs root and apt-get): ${apt_packages[*]}." >&2
    echo "[install]   without gcc 4-bit codes scan with the slower numba kernel; without redis-server the" >&2
    echo "[install]   local cluster uses a static node list and the Redis tests fail" >&2
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[install] creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
# The CPU build of torch for this environment; the project itself accepts any torch>=2.1.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "[install] torch==2.13.0 (CPU build)"
  $PIP install -q --upgrade pip 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  $PIP install -q "torch==2.13.0" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
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
# The package build generates the gRPC stubs (setup.py); this only refreshes them in the editable
# checkout when a .proto changed since.
"$VENV/bin/python" -m facepq_proto.build --quiet
"$VENV/bin/python" -c "from query_node import fastscan; print('[install] scan kernels: 4-bit', fastscan.status(), '| 8-bit', fastscan.status8())"
if [ -f clients/node/package.json ] && command -v npm >/dev/null 2>&1 && [ ! -d clients/node/node_modules ]; then
  echo "[install] npm packages for the Node.js client"
  (cd clients/node && npm install --silent --no-audit --no-fund >/dev/null)
fi
echo "[install] ready: $VENV/bin/facepq"
