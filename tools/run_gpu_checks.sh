#!/usr/bin/env bash
# Every GPU check of the project in one go: the CUDA tests, then the benchmarks (which update
# BENCHMARKS.md). Needs CUDA, the project importable, and torchtune installed. Each step runs even
# if an earlier one failed; the exit code is the number of failed steps.
#   bash tools/run_gpu_checks.sh [LOG_DIR]
set -u
cd "$(dirname "$0")/.."
LOG_DIR=${1:-gpu_logs}
mkdir -p "$LOG_DIR"
PY=${PYTHON:-python3}
failed=0
step() {  # step NAME SECONDS COMMAND...
  local name=$1 seconds=$2; shift 2
  echo "=== $name: $*"
  local start=$(date +%s)
  if timeout "$seconds" "$@" > "$LOG_DIR/$name.log" 2>&1; then echo "--- $name ok ($(( $(date +%s) - start )) s)"; else
    echo "--- $name FAILED ($(( $(date +%s) - start )) s)"; tail -30 "$LOG_DIR/$name.log"; failed=$((failed + 1)); fi
  cp BENCHMARKS.md "$LOG_DIR/" 2>/dev/null || true
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# Seconds per step (the whole run fits a 10-minute slot); scale with GPU_CHECKS_SCALE.
scale=${GPU_CHECKS_SCALE:-1}
step gpu_tests $((130 * scale)) "$PY" -m pytest -q -p no:cacheprovider -m gpu ${GPU_TEST_PATHS:-tests}
step bench_training $((140 * scale)) "$PY" tools/bench_training.py --device cuda --steps 6
step bench_generation $((140 * scale)) "$PY" tools/bench_generation.py --device cuda --rounds 2
step bench_masks $((90 * scale)) "$PY" tools/bench_masks.py --device cuda
step bench_distributed $((80 * scale)) "$PY" tools/bench_distributed.py --device cuda --steps 30
exit $failed
