#!/usr/bin/env bash
# The main job: set up .venv if needed, then run the whole DDM pipeline on digits locally
# (ingest, partition, 4 experts + router + an equal-FLOP monolith as Ray Train jobs, assemble,
# sample, evaluate; report in runs/digits/report/README.md). Running it again resumes/skips.
# Extra arguments are spec overrides, e.g. ./scripts/demo.sh store=runs/d8 partition.num_partitions=8
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec "$VENV/bin/ddm" run launch/digits.yaml "$@"
