#!/usr/bin/env bash
# Create the virtual environment .venv in the repo root and install ddm (with test extras) into it.
# Idempotent: a re-run does nothing unless pyproject.toml changed. Sourced by demo.sh and test.sh.
#   DDM_TORCH  pip arguments for torch when none is installed yet (default: torch==2.13.0, the CPU
#              build our CPU machines install fast); on a GPU machine the CUDA build, e.g.
#              DDM_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 10), "ddm needs Python >= 3.10"' 
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
STAMP="$VENV/.ddm-installed"
WANT="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
  export PIP_DISABLE_PIP_VERSION_CHECK=1
  if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
    echo "[setup] installing ${DDM_TORCH:-torch==2.13.0} (first, so nothing pulls a different build)"
    # shellcheck disable=SC2086  # word splitting wanted: DDM_TORCH may carry an --index-url
    "$VENV/bin/pip" install -q ${DDM_TORCH:-torch==2.13.0}
  fi
  echo "[setup] installing ddm and its dependencies into .venv (about a minute the first time)"
  "$VENV/bin/pip" install -q -e "$ROOT[test]"
  echo "$WANT" > "$STAMP"
fi
