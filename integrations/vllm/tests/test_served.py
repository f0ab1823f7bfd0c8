"""The real ``vllm serve`` on vLLM's CPU backend: refused at start-up, naming the reason.

vLLM's CPU attention backend ignores prefix-LM ranges, so it would serve every MAS prompt
causally and say nothing; the plugin's model refuses it in the server's worker process, and the
server exits. (Comparing a served chat with ``mas.generate`` needs the FlexAttention test oracle
inside vLLM's worker processes, which the in-process oracle of test_exact.py does not reach.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import llm_kwargs, write_model

pytestmark = pytest.mark.slow


def test_vllm_serve_refuses_the_cpu_backend(models_dir):
    model = write_model("llama", models_dir / "served", adapter_attention="mas")
    kw = llm_kwargs(model, mas_entry=str(model.adapter), lora=True)
    args = [
        "serve", kw["model"], "--host", "127.0.0.1", "--port", "0", "--tokenizer-mode", "mas",
        "--hf-overrides", json.dumps(kw["hf_overrides"]), "--dtype", "float32", "--enforce-eager",
        "--max-model-len", str(kw["max_model_len"]), "--block-size", str(kw["block_size"]),
        "--kv-cache-memory-bytes", str(kw["kv_cache_memory_bytes"]),
        "--enable-lora", "--max-lora-rank", "8", "--lora-modules", f"mas={model.adapter}",
    ]
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("vllm_cli.py")), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "attention backend CPU_ATTN ignores prefix-LM ranges" in done.stdout + done.stderr
