#!/usr/bin/env bash
# The tests: set up .venv if needed, then run pytest. Extra arguments go to pytest,
# e.g. ./scripts/test.sh -m slow (opt-in slow tests), ./scripts/test.sh -m gpu (needs CUDA).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec "$VENV/bin/python" -m pytest "$@"
