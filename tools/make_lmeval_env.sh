#!/usr/bin/env bash
# A separate venv for lm-evaluation-harness, the client that scores mas_serve (docs/serving.md).
# lm-eval brings Hugging Face datasets/evaluate: it never goes into the project's own .venv.
#   bash tools/make_lmeval_env.sh [VENV]        default: $HOME/.cache/mas/lmeval-env
# Reused when it already holds the pinned version; prints the lm_eval path at the end.
set -euo pipefail
LMEVAL_VERSION="${LMEVAL_VERSION:-0.4.13}"
VENV="${1:-${HOME}/.cache/mas/lmeval-env}"
PYTHON="${PYTHON:-python3}"
if [ -x "$VENV/bin/lm_eval" ] && "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('lm_eval') != '$LMEVAL_VERSION')" 2>/dev/null; then
    echo "lm-eval $LMEVAL_VERSION already in $VENV"
else
    start=$(date +%s)
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    # [api]: the OpenAI-compatible clients (local-completions, local-chat-completions); no torch.
    "$VENV/bin/python" -m pip install --quiet "lm_eval[api]==$LMEVAL_VERSION"
    echo "installed lm-eval $LMEVAL_VERSION into $VENV in $(( $(date +%s) - start )) s"
fi
echo "$VENV/bin/lm_eval"
