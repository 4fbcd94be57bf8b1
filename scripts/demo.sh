#!/usr/bin/env bash
# The main job: set up .venv if needed, then run the DDM pipeline locally.
# Extra arguments are config overrides, e.g. ./scripts/demo.sh num_partitions=8
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec "$VENV/bin/ddm" demo -c launch/demo.yaml "$@"
