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
WANT="$(cat "$ROOT/pyproject.toml" "$ROOT/constraints.txt" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
  export PIP_DISABLE_PIP_VERSION_CHECK=1
  if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
    echo "[setup] installing ${DDM_TORCH:-torch==2.13.0} (first, so nothing pulls a different build)"
    # shellcheck disable=SC2086  # word splitting wanted: DDM_TORCH may carry an --index-url
    "$VENV/bin/pip" install -q ${DDM_TORCH:-torch==2.13.0}
  fi
  echo "[setup] installing ddm and its dependencies into .venv (about a minute the first time)"
  "$VENV/bin/pip" install -q -c "$ROOT/constraints.txt" -e "$ROOT[test]"
  # DeepSpeed compiles its CPU collectives op the first time a job starts (about a minute); build
  # it now, once per machine (cached in ~/.cache/torch_extensions), so no job waits for it.
  if "$VENV/bin/python" -c 'import sys, torch; sys.exit(torch.cuda.is_available())' 2>/dev/null; then  # no GPU
    echo "[setup] building DeepSpeed's CPU collectives op (once per machine)"
    DS_ACCELERATOR=cpu "$VENV/bin/python" -c 'from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; B().load(verbose=False)' >/dev/null 2>&1 \
      || echo "[setup] (it could not be built now; the first job builds it)"
  fi
  echo "$WANT" > "$STAMP"
fi
