#!/usr/bin/env bash
# One command for a machine with a GPU (issue 26), within ~8 minutes: the CUDA tests, then
# benchmarks/gpu_check.py (augmentation views/s eager / compiled / CUDA graph at batch 512 and 2048
# and its share of a step; SimCLR ResNet-18 epochs at batch 512 with optim.compile off and on, the
# compile time, kNN cost, MFU), then benchmarks/race_cifar10.py with whatever time is left. Prints
# where it is and exits 0 on a machine without CUDA.
#
#   bash benchmarks/gpu_check.sh [DATA]            # everything, ~8 minutes (GPU_CHECK_SECONDS)
#   bash benchmarks/gpu_check.sh --race-only [DATA] # the race alone, its full 9-minute budget
#
# DATA: an ingested CIFAR-10 folder (default data/cifar10; ingested from ../shared/datasets/cifar10
# when it has no manifest). PYTHON picks the interpreter (default: .venv/bin/python, else python3);
# GPU_CHECK_OUT the results folder (default benchmarks/results/gpu_check); GPU_CHECK_SECONDS the
# whole run's budget (default 480); results are also copied into $OUT when it is set (the device
# tool's output folder). Needs PyTorch (with Triton for torch.compile), torchvision, numpy, pyarrow,
# PyYAML, Pillow and pytest; not Ray, MLflow or numba (the GPU path does not use them).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
RACE_ONLY=0
if [ "${1:-}" = "--race-only" ]; then RACE_ONLY=1; shift; fi
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False for $PYTHON); nothing to check"
  exit 0
fi
DATA=${1:-data/cifar10}
OUT_DIR=${GPU_CHECK_OUT:-benchmarks/results/gpu_check}
BUDGET=${GPU_CHECK_SECONDS:-480}
mkdir -p "$OUT_DIR"
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
copy_out() {
  if [ -n "${OUT:-}" ]; then mkdir -p "$OUT" && cp -f "$OUT_DIR"/*.json "$OUT_DIR"/*.md "$OUT_DIR"/*.log "$OUT" 2>/dev/null; fi
  return 0
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$PYTHON" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' \
  || echo "gpu_check: no Triton: torch.compile cannot make GPU kernels; the compiled rows will say so"
if [ ! -f "$DATA/manifest.json" ]; then
  "$PYTHON" -c "import sys; from pipelines.ingest import ingest; ingest(sys.argv[1], sys.argv[2])" \
    ../shared/datasets/cifar10 "$DATA" || exit 1
fi
echo "== setup done after $(( $(date +%s) - START )) s"

if [ "$RACE_ONLY" -eq 1 ]; then
  "$PYTHON" benchmarks/race_cifar10.py --data "$DATA" --budget 540 --out "$OUT_DIR" 2>&1 | tee "$OUT_DIR/race.log"
  race=${PIPESTATUS[0]}
  copy_out
  exit "$race"
fi

echo "== CUDA tests"
timeout 180 "$PYTHON" -m pytest -p no:cacheprovider -q -rs -k cuda tests/methods/test_cuda.py tests/pipelines/test_augment.py \
  2>&1 | tee "$OUT_DIR/cuda_tests.log"
tests=${PIPESTATUS[0]}
echo "== CUDA tests exit $tests after $(( $(date +%s) - START )) s"

echo "== benchmarks/gpu_check.py"
timeout 300 "$PYTHON" benchmarks/gpu_check.py --data "$DATA" --out "$OUT_DIR" 2>&1 | tee "$OUT_DIR/gpu_check.log"
bench=${PIPESTATUS[0]}
copy_out
echo "== gpu_check.py exit $bench after $(( $(date +%s) - START )) s"

# The race gets what is left (at least a minute, at most its 9 minutes); compiled only if the
# compiled epochs above ran.
COMPILE=$("$PYTHON" -c "import json,sys; d=json.load(open(sys.argv[1])); print('auto' if d.get('compile_ok') else 'false')" \
  "$OUT_DIR/gpu_check.json" 2>/dev/null || echo false)
RACE_BUDGET=$(left)
if [ "$RACE_BUDGET" -gt 540 ]; then RACE_BUDGET=540; fi
race=0
if [ "$RACE_BUDGET" -ge 60 ]; then
  echo "== benchmarks/race_cifar10.py (budget $RACE_BUDGET s, compile $COMPILE)"
  timeout $(( RACE_BUDGET + 30 )) "$PYTHON" benchmarks/race_cifar10.py --data "$DATA" --budget "$RACE_BUDGET" \
    --compile "$COMPILE" --out "$OUT_DIR" 2>&1 | tee "$OUT_DIR/race.log"
  race=${PIPESTATUS[0]}
else
  echo "== race skipped: $RACE_BUDGET s left (run: bash benchmarks/gpu_check.sh --race-only)"
fi
copy_out
echo "gpu_check: tests exit $tests, benchmark exit $bench, race exit $race, $(( $(date +%s) - START )) s in all"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ] && [ "$race" -eq 0 ]
