"""The real ``vllm serve`` with the plugin, queried with the ``openai`` client.

- Through the CPU test oracle (``MAS_VLLM_TEST_CPU_FLEX=1``: FlexAttention in every process the
  server spawns), one server with tensor parallelism over two processes (one per core) holds a
  base and three adapters of one weights file, recorded as ``mas`` (chat), ``causal`` (chat) and
  ``mas`` with the text format. Each served chat and completion, streamed or not, equals
  ``mas.generate`` under the mode of the adapter it names; the adapter with another prompt
  format is refused with a 400 naming it, and so is a token-id prompt (no segments) for a MAS
  adapter.
- On vLLM's own CPU backend, which ignores prefix-LM ranges, the server refuses to start.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest
from cpu_oracle import ORACLE_ENV
from helpers import CHATS, COMPLETION, LORA, llm_kwargs, mas_reference, write_adapter, write_model

pytestmark = pytest.mark.slow

CLI = str(Path(__file__).with_name("vllm_cli.py"))
MAX_TOKENS = 8


#: Tensor-parallel ranks of the served test: one per core, each bound to its core (vLLM's CPU
#: workers bind their threads to NUMA nodes unless told which cores to use; this machine has one).
TP = 2 if (os.cpu_count() or 1) >= 2 else 1
TP_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "|".join(str(core) for core in range(TP))}


def _serve_args(model, adapters: Dict[str, Path], port: int) -> List[str]:
    kw = llm_kwargs(model, mas_entry=str(adapters["mas"]), lora=True)
    args = [
        "serve", kw["model"], "--host", "127.0.0.1", "--port", str(port), "--tokenizer-mode", "mas",
        "--served-model-name", "tiny", "--hf-overrides", json.dumps(kw["hf_overrides"]), "--dtype", "float32",
        "--enforce-eager", "--max-model-len", str(kw["max_model_len"]), "--block-size", str(kw["block_size"]),
        "--kv-cache-memory-bytes", str(kw["kv_cache_memory_bytes"]), "--max-num-seqs", "4",
        "--enable-lora", "--max-lora-rank", str(LORA["lora_rank"]), "--max-loras", str(len(adapters)),
        "--lora-modules", *(f"{name}={path}" for name, path in adapters.items()),
    ]
    return args


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(server: subprocess.Popen, port: int, log: Path, timeout: float = 420.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"vllm serve exited ({server.returncode}):\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(2)
    pytest.fail(f"vllm serve not ready after {timeout:.0f} s:\n{log.read_text()[-4000:]}")


def test_served_chat_follows_each_adapters_recorded_mode(models_dir, tmp_path):
    from openai import BadRequestError, OpenAI

    model = write_model("llama", models_dir / "served_modes", adapter_attention="mas")
    adapters = {
        "mas": model.adapter,
        "causal": write_adapter(model, models_dir / "served_modes" / "causal_run", "causal"),
        "mas_text": write_adapter(model, models_dir / "served_modes" / "text_run", "mas", prompt_format="text"),
    }
    prompts = [{"messages": chat} for chat in CHATS] + [COMPLETION]
    # Same weights in every adapter: only the recorded mode can tell the answers apart.
    reference = {
        "mas": mas_reference(model, prompts, attention="mas", adapter=True, max_new_tokens=MAX_TOKENS),
        "causal": mas_reference(model, prompts, attention="causal", adapter=True, max_new_tokens=MAX_TOKENS),
        "tiny": mas_reference(model, prompts, attention="mas", adapter=False, max_new_tokens=MAX_TOKENS),
    }
    assert reference["mas"].tokens != reference["causal"].tokens

    port = _free_port()
    log = tmp_path / "vllm_serve.log"
    env = {**os.environ, ORACLE_ENV: "1", **TP_ENV}
    args = [*_serve_args(model, adapters, port), "--tensor-parallel-size", str(TP)]
    with log.open("w") as out:
        server = subprocess.Popen([sys.executable, CLI, *args], stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_ready(server, port, log)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
        assert {m.id for m in client.models.list().data} == {"tiny", *adapters}
        greedy = dict(temperature=0.0, max_tokens=MAX_TOKENS, extra_body={"ignore_eos": True, "return_token_ids": True})
        for name, ref in reference.items():
            for chat, want in zip(CHATS, ref.tokens):
                answer = client.chat.completions.create(model=name, messages=chat, **greedy)
                assert answer.choices[0].model_extra["token_ids"] == want, (name, chat)
            done = client.completions.create(model=name, prompt=COMPLETION, **greedy)
            assert done.choices[0].model_extra["token_ids"] == ref.tokens[-1], name
        # Streamed, the same text as the whole answer (the tokens decode to it).
        pieces = client.chat.completions.create(model="mas", messages=CHATS[3], stream=True, **greedy)
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in pieces if chunk.choices)
        assert streamed == client.chat.completions.create(model="mas", messages=CHATS[3], **greedy).choices[0].message.content

        with pytest.raises(BadRequestError, match="'mas_text' was trained with prompt_format=text"):
            client.chat.completions.create(model="mas_text", messages=CHATS[0], **greedy)
        ids = list(reference["mas"].prompts[0].tokens)
        with pytest.raises(BadRequestError, match="carries no segments"):
            client.completions.create(model="mas", prompt=ids, **greedy)
        # Causal needs no segments: token ids are served as they are (as mas.generate would).
        causal = client.completions.create(model="causal", prompt=ids, **greedy)
        assert causal.choices[0].model_extra["token_ids"] == reference["causal"].tokens[0]
    except Exception:
        print(f"vllm serve's log (last 4000 characters):\n{log.read_text()[-4000:]}")
        raise
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()


def test_vllm_serve_refuses_the_cpu_backend(models_dir):
    model = write_model("llama", models_dir / "served", adapter_attention="mas")
    args = _serve_args(model, {"mas": model.adapter}, _free_port())
    env = {k: v for k, v in os.environ.items() if k != ORACLE_ENV}
    done = subprocess.run([sys.executable, CLI, *args], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode != 0
    assert "attention backend CPU_ATTN ignores prefix-LM ranges" in done.stdout + done.stderr
