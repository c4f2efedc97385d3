#!/usr/bin/env bash
# The README's main-job command: install (idempotent), then the end-to-end demo on
# generated faces: train, ingest with Ray, serve with gRPC nodes + coordinator, search.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
exec .venv/bin/facepq demo "$@"
