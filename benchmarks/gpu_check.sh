#!/usr/bin/env bash
# One command for a machine with a GPU: the CUDA tests, then benchmarks/gpu_check.py (augmentation
# throughput on the GPU; SimCLR ResNet-18 epochs on CIFAR-10 at batch 512). Prints where it is and
# exits 0 on a machine without CUDA.
#
#   bash benchmarks/gpu_check.sh [DATA]
#
# DATA: an ingested CIFAR-10 folder (default data/cifar10; ingested from ../shared/datasets/cifar10
# when it has no manifest). PYTHON picks the interpreter (default: .venv/bin/python, else python3);
# GPU_CHECK_OUT the results folder (default benchmarks/results/gpu_check). Needs PyTorch, pyarrow,
# numpy, numba, PyYAML and Pillow; not Ray or MLflow.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False for $PYTHON); nothing to check"
  exit 0
fi
DATA=${1:-data/cifar10}
OUT_DIR=${GPU_CHECK_OUT:-benchmarks/results/gpu_check}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
if [ ! -f "$DATA/manifest.json" ]; then
  "$PYTHON" -c "import sys; from pipelines.ingest import ingest; ingest(sys.argv[1], sys.argv[2])" \
    ../shared/datasets/cifar10 "$DATA" || exit 1
fi

echo "== CUDA tests"
"$PYTHON" -m pytest -p no:cacheprovider -q -rs -k cuda tests/methods/test_cuda.py tests/pipelines/test_augment.py
tests=$?

echo "== benchmarks/gpu_check.py"
"$PYTHON" benchmarks/gpu_check.py --data "$DATA" --out "$OUT_DIR"
bench=$?
echo "gpu_check: tests exit $tests, benchmark exit $bench"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
