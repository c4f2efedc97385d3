#!/usr/bin/env bash
# The README's test command: install (idempotent), then the whole suite (what CI runs).
# Arguments go to pytest: `bash scripts/test.sh -m "not slow"` is the fast lane for the inner loop.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
exec .venv/bin/python -m pytest -q "$@"
