#!/usr/bin/env bash
# The GPU acceptance in one command, on a bare GPU machine with a CUDA build of PyTorch: the GPU
# test tier (tests/test_gpu.py) and the GPU benchmarks, each with a time limit, all within about
# 8 minutes; one JSON line per benchmark at the end (also in $OUT/gpu-check.jsonl when $OUT is set).
#
# ddm needs no install here (it runs from this checkout). What a bare machine lacks is listed in
# scripts/gpu-wheels.txt (tests/test_gpu_wheels.py keeps the list complete: it records what a job
# imports) and is installed from .whl/ when that folder exists; build it beforehand on a machine
# with the package index:
#   ../shared/gpu/prepare-wheels.sh $(grep -v '^#' scripts/gpu-wheels.txt | awk '{print $1}')
# Ray, s3fs and scikit-learn are not needed: the jobs run through the train function that Ray
# workers call (python -m ddm.train), on a local store.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
OUT="${OUT:-$ROOT/gpu-check}"
mkdir -p "$OUT"
# What jobs and the check import beyond the bare machine (the "train" and "check" rows of scripts/gpu-wheels.txt).
TRAIN_MODULES="$(grep -v '^#' scripts/gpu-wheels.txt | awk '$3 != "encoders" {print $2}' | paste -sd, -)"
if ! "$PY" -c "import $TRAIN_MODULES" 2>/dev/null; then
  if [ -d .whl ]; then
    SITE="$(mktemp -d)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl
    export PYTHONPATH="$SITE:${PYTHONPATH:-}"
  else
    "$PY" -m pip install -q $(grep -v '^#' scripts/gpu-wheels.txt | awk '$3 != "encoders" {print $1}')
  fi
  "$PY" -c "import $TRAIN_MODULES" || { echo "[gpu-check] missing after the install (see scripts/gpu-wheels.txt)"; exit 2; }
fi
export PYTHONPATH="$ROOT:${PYTHONPATH:-}"
"$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA GPU"; print("[gpu-check]", torch.cuda.get_device_name(), "torch", torch.__version__)' || exit 2

# A fresh torch-extensions cache: any DeepSpeed op that a GPU job compiles at run time lands here
# (there must be none: issue "fast start"); checked at the end.
export TORCH_EXTENSIONS_DIR="$(mktemp -d)"
status=0
run() {  # run <name> <seconds> <command...>: the command's last line (its JSON) goes to the results
  local name="$1" limit="$2"; shift 2
  echo "[gpu-check] $name (limit ${limit}s)"
  if timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; then
    tail -n 1 "$OUT/$name.log" >> "$OUT/gpu-check.jsonl"
  else
    echo "[gpu-check] $name FAILED (exit $?); last lines:"; tail -n 30 "$OUT/$name.log"; status=1
  fi
}
: > "$OUT/gpu-check.jsonl"
echo "[gpu-check] tests/test_gpu.py (limit 240s)"
timeout 240 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 | tee "$OUT/tests.log" | tail -n 15
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
run mfu-dit-b2 100 "$PY" bench/gpu_mfu.py --arch DiT-B/2 --batch 256 --steps 60 --warmup 20
run mfu-dit-xl2 150 "$PY" bench/gpu_mfu.py --arch DiT-XL/2 --batch 128 --steps 40 --warmup 15
run sampling-top1 60 "$PY" bench/gpu_sampling.py --batch 256 --steps 20
if "$PY" -c 'import diffusers, transformers' 2>/dev/null; then
  run encoders 120 "$PY" bench/gpu_encoders.py --batch 64 --images 1024
else
  echo "[gpu-check] encoders: diffusers/transformers are not installed here (see the wheel list above); not measured"
  status=1
fi
compiled="$(ls "$TORCH_EXTENSIONS_DIR"/*/ 2>/dev/null | tr '\n' ' ')"
echo "{\"deepspeed_ops_compiled_at_run_time\": \"${compiled}\"}" >> "$OUT/gpu-check.jsonl"
[ -z "$compiled" ] || { echo "[gpu-check] DeepSpeed compiled ops at run time: $compiled"; status=1; }
echo "[gpu-check] results:"
cat "$OUT/gpu-check.jsonl"
exit $status
