#!/usr/bin/env bash
# The whole test suite, as `make test` runs it: the project's tests (in .venv) and the vLLM
# plugin's (integrations/vllm/tests, in its own venv: tools/make_vllm_env.sh), side by side. The
# project's suite spends most of its time starting `tune run` subprocesses on one core, so the
# plugin's ~3 minutes fit beside it on a 2-core machine. The plugin's output follows the
# project's; the exit code is non-zero when either failed.
#   bash tools/run_tests.sh [PYTEST_ARGS...]     (arguments go to the project's suite)
set -uo pipefail
cd "$(dirname "$0")/.."
BIN="${BIN:-.venv/bin}"
VLLM_ENV="${VLLM_ENV:-${HOME}/.cache/mas/vllm-env}"
# The plugin's venv is shared by the checkouts of this machine and points at one of them: take
# turns with another checkout's run (a lock beside the venv), and point it here.
exec 9> "$VLLM_ENV.lock"
flock 9 || { echo "cannot lock $VLLM_ENV.lock"; exit 1; }
bash tools/make_vllm_env.sh "$VLLM_ENV" > /dev/null || { echo "tools/make_vllm_env.sh failed: run it to see why"; exit 1; }
work="$(mktemp -d -t mas-tests-XXXXXX)"
# Niced: the project's suite, the longer one, keeps its pace; the plugin's fills the idle core.
(cd integrations/vllm && exec nice -n 10 "$VLLM_ENV/bin/python" -m pytest -q -p no:cacheprovider --basetemp "$work/tmp") > "$work/vllm.log" 2>&1 &
vllm_pid=$!
trap 'kill "$vllm_pid" 2>/dev/null; rm -rf "$work"' EXIT
trap 'exit 130' INT TERM
"$BIN/python" -m pytest -q -p no:cacheprovider "$@"
project_rc=$?
wait "$vllm_pid"
vllm_rc=$?
echo "=== vLLM plugin tests (integrations/vllm/tests, run beside the above in $VLLM_ENV): exit $vllm_rc"
cat "$work/vllm.log"
[ "$project_rc" = 0 ] && [ "$vllm_rc" = 0 ]
