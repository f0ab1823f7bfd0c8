#!/usr/bin/env bash
# Every GPU check of the project in one go (at most 9 minutes on an H200; 13 where vLLM with the
# plugin is installed, for its step): the CUDA tests, then the
# benchmarks, which update their cuda sections of BENCHMARKS.md. Needs CUDA, the project
# importable, and torchtune installed. Each step runs under its own time limit and even if an
# earlier one failed; the exit code is the number of failed steps. Logs, the BENCHMARKS.md after
# each step, and the profiler summaries (*.md) and Chrome traces (*.trace.json.gz, open them in
# https://ui.perfetto.dev) go to LOG_DIR.
#   bash tools/run_gpu_checks.sh [LOG_DIR]
#   GPU_CHECKS_DRY_RUN=1 bash tools/run_gpu_checks.sh   # print the steps and their limits only
#   GPU_CHECKS_SCALE=2 ...                              # double every time limit (and the deadline)
#   GPU_CHECKS_ONLY="bench_training_1b bench_generation" ...   # run these steps only
# On a bare device image (PyTorch, Triton and CUDA, no network, no torchtune): make the wheels on a
# machine with the package registries and carry the folder (`.whl/` is git-ignored):
#   pip download --no-deps -d .whl torchtune==0.6.1 torchao==0.15.0 omegaconf==2.4.0 datasets dill multiprocess
# The script installs them into /tmp/site when torchtune is missing, and puts the project and its
# recipe modules on PYTHONPATH.
set -u
cd "$(dirname "$0")/.."
LOG_DIR=${1:-gpu_logs}
PY=${PYTHON:-python3}
if [ "${GPU_CHECKS_DRY_RUN:-0}" != 1 ] && ! "$PY" -c "import torchtune" 2>/dev/null; then
  if ls .whl/*.whl > /dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || echo "installing .whl/ failed: the steps below will fail on imports"
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "torchtune is not importable and there is no .whl/ folder (see the header): the steps will fail"
  fi
fi
export PYTHONPATH="$PWD:$PWD/recipes${PYTHONPATH:+:$PYTHONPATH}"
DRY=${GPU_CHECKS_DRY_RUN:-0}
ONLY=${GPU_CHECKS_ONLY:-}
scale=${GPU_CHECKS_SCALE:-1}
failed=0
total=0
began=$(date +%s)
# The whole run stops by this many seconds: each step gets the smaller of its own limit and what
# is left (a step with under 15 s left is skipped and counted as failed).
deadline=$(( ${GPU_CHECKS_DEADLINE:-540} * scale ))
mkdir -p "$LOG_DIR"
step() {  # step NAME SECONDS COMMAND...
  local name=$1 seconds=$(( $2 * scale )); shift 2
  if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
  total=$((total + seconds))
  echo "=== $name (limit ${seconds} s): $*"
  if [ "$DRY" = 1 ]; then return; fi
  local left=$(( deadline - ($(date +%s) - began) ))
  if [ "$left" -lt 15 ]; then echo "--- $name SKIPPED: ${left} s left of the ${deadline} s run"; failed=$((failed + 1)); return; fi
  [ "$left" -lt "$seconds" ] && seconds=$left
  local start=$(date +%s)
  if timeout "$seconds" "$@" > "$LOG_DIR/$name.log" 2>&1; then echo "--- $name ok ($(( $(date +%s) - start )) s)"; else
    echo "--- $name FAILED ($(( $(date +%s) - start )) s of ${seconds})"; tail -30 "$LOG_DIR/$name.log"; failed=$((failed + 1)); fi
  cp BENCHMARKS.md "$LOG_DIR/" 2>/dev/null || true
}
[ "$DRY" = 1 ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# The tiny base checkpoint of bench_training_tiny (200 pre-training steps on one CPU thread,
# ~15 s) is written in the background meanwhile; the step waits for it.
if [ "$DRY" != 1 ]; then
  "$PY" -c "from mas.models import tiny_hf_checkpointer as c; c('/tmp/mas_runs/tiny_llama3_2', '/tmp/mas_runs/tiny_base_out')" \
    > "$LOG_DIR/tiny_base.log" 2>&1 &
  tiny_base_pid=$!
fi
# Open targets first (issue 12: the 1B training step, batch-1 decode), then the regression checks.
# Limits in seconds add up to 540 (9 min). A step cut by its limit loses what it had not written:
# bench_training_1b and bench_generation write their timings before they profile.
step bench_training_1b 180 "$PY" tools/bench_training.py --device cuda --model llama3_2_1b --rounds 3 --steps 8 \
  --profile-dir "$LOG_DIR"
step bench_generation 130 "$PY" tools/bench_generation.py --device cuda --rounds 2 --profile-dir "$LOG_DIR"
# Only the folders that hold GPU tests: other test modules import the serving and ROUGE stacks,
# which a bare device image lacks (their collection errors would stop pytest).
step gpu_tests 95 "$PY" -m pytest -q -p no:cacheprovider -m gpu ${GPU_TEST_PATHS:-tests/gpu tests/unit/core}
[ -n "${tiny_base_pid:-}" ] && wait "$tiny_base_pid"
step bench_training_tiny 55 "$PY" tools/bench_training.py --device cuda --rounds 1 --steps 5 --packs 1024x1
step bench_distributed 45 "$PY" tools/bench_distributed.py --device cuda --steps 20
step bench_masks 35 "$PY" tools/bench_masks.py --device cuda
# MAS on vLLM (issue 21): only where a Python with vLLM and the plugin is at hand (VLLM_PYTHON, by
# default the vLLM venv of tools/make_vllm_env.sh); a bare device image has no vLLM, and its wheels
# cannot be carried there. Its limit is added to the deadline, so the steps above keep theirs.
VLLM_PY=${VLLM_PYTHON:-${HOME:+$HOME/.cache/mas/vllm-env/bin/python}}
if [ -z "$VLLM_PY" ] || ! (cd /tmp && "$VLLM_PY" -c "import vllm, mas_vllm") > /dev/null 2>&1; then
  echo "=== bench_vllm not run: no vLLM with mas-vllm at ${VLLM_PY:-\$HOME/.cache/mas/vllm-env} (set VLLM_PYTHON; tools/make_vllm_env.sh builds one)"
else
  deadline=$(( deadline + 240 * scale ))
  step bench_vllm 240 "$VLLM_PY" tools/bench_vllm.py --device cuda
fi
echo "=== $failed failed step(s); limits add up to ${total} s; logs and profiles in $LOG_DIR"
exit $failed
