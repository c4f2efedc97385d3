#!/usr/bin/env bash
# The README's test command: install (idempotent), then the whole suite (what CI runs).
# Two worker processes (pytest-xdist), each given whole test files as it frees up (--dist loadfile: a file's
# module fixtures are built once), files with slow tests first (tests/conftest.py orders them; xdist's own
# reordering by size is off). Most tests wait on servers, Ray and subprocesses, so one process keeps about one
# core busy: two fill the 2-core CI machine.
# Arguments go to pytest: `bash scripts/test.sh -m "not slow"` is the fast lane for the inner loop, `-n 0` runs
# in one process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder "$@"
