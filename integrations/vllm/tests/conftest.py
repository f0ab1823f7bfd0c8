"""The plugin's tests run only in the vLLM environment (``make test-vllm``), never in the
project's own (which keeps Hugging Face transformers out)."""

from __future__ import annotations

import os

import pytest

# The engine in this process, so the CPU test oracle's patches reach it (tests/cpu_oracle.py).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
pytest.importorskip("vllm", reason="the plugin's tests run in the vLLM environment: make test-vllm")


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("mas_vllm_models")
