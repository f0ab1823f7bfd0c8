"""A served chat: the real ``vllm serve`` process on 127.0.0.1, the ``openai`` client, the same
tokens and text as ``mas.generate`` for the same messages (a MAS adapter, through vLLM's LoRA)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import CHATS, COMPLETION, llm_kwargs, mas_reference, write_model

pytestmark = pytest.mark.slow
MAX_TOKENS = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_args(model, port: int) -> list:
    kw = llm_kwargs(model, mas_entry=str(model.adapter), lora=False)
    return [
        "serve", kw["model"], "--host", "127.0.0.1", "--port", str(port), "--tokenizer-mode", "mas",
        "--hf-overrides", json.dumps(kw["hf_overrides"]), "--dtype", "float32", "--enforce-eager",
        "--max-model-len", str(kw["max_model_len"]), "--max-num-seqs", str(kw["max_num_seqs"]),
        "--block-size", str(kw["block_size"]), "--max-num-batched-tokens", str(kw["max_num_batched_tokens"]),
        "--kv-cache-memory-bytes", str(kw["kv_cache_memory_bytes"]), "--enable-prefix-caching",
        "--enable-lora", "--max-lora-rank", "8", "--lora-modules", f"mas={model.adapter}", "--served-model-name", "base",
    ]


def test_served_chat_equals_mas_generate(models_dir):
    import httpx
    from openai import OpenAI

    model = write_model("llama", models_dir / "served", adapter_attention="mas")
    ref = mas_reference(model, [{"messages": CHATS[0]}, COMPLETION], attention="mas", adapter=True, max_new_tokens=MAX_TOKENS)
    port = _free_port()
    log = open(models_dir / "served.log", "w")
    env = {**os.environ, "VLLM_WORKER_MULTIPROC_METHOD": "fork"}
    server = subprocess.Popen([sys.executable, str(Path(__file__).with_name("serve_oracle.py")), *_serve_args(model, port)], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.time() + 240
        while True:
            assert server.poll() is None, f"vllm serve exited: see {models_dir / 'served.log'}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "vllm serve did not start in 240 s"
            time.sleep(2)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        extra = {"ignore_eos": True, "return_token_ids": True}
        chat = client.chat.completions.create(model="mas", messages=CHATS[0], max_tokens=MAX_TOKENS, temperature=0, extra_body=extra)
        completion = client.completions.create(model="mas", prompt=COMPLETION, max_tokens=MAX_TOKENS, temperature=0, extra_body=extra)
        assert chat.choices[0].model_extra["token_ids"] == ref.tokens[0]
        assert chat.choices[0].message.content == ref.texts[0]
        assert completion.choices[0].model_extra["token_ids"] == ref.tokens[1]
        assert completion.choices[0].text == ref.texts[1]
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
