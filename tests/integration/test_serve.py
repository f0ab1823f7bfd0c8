"""`tune run mas_serve`: the real server process on 127.0.0.1, called with the official `openai`
client and `httpx`. Greedy tokens equal `mas.generate` (alone, batched, with a prefix-cache hit,
turn by turn, MAS and causal adapters), and so do seeded sampled tokens (``mas.generate`` with
batch size 1, the same seed), alone or batched; bad requests get OpenAI-style 4xx bodies naming the field;
a disconnecting client frees its slot; a burst completes with nothing lost or leaked; over
capacity is a 429; SIGTERM finishes or cancels in-flight requests cleanly; ``compile_decode=True``
serves the same tokens compiled.

One server process per adapter, shared by the tests of this module (module-scoped fixtures).
"""

from __future__ import annotations

import concurrent.futures
import json
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import httpx
import pytest

from support.runs import tune_command

pytestmark = pytest.mark.slow

SYSTEM = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
USERS = [
    "Is the sky blue?",
    "### Instruction:\nPlease answer the following question with true or false, question: is ice cold?\n\n### Response:\n",
    "Name a colour.",
    "### Instruction:\nPlease choose the correct answer to fill in the blank to complete the given sentence: the cat sat on the _.\n\n"
    "Option1: mat Option2: moon\n\nAnswer format: option1/option2\n\n### Response:\n",
]
MAX_TOKENS = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path
    overrides: List[str]

    @property
    def model(self) -> str:
        return httpx.get(f"{self.url}/v1/models").json()["data"][0]["id"]

    def health(self) -> Dict:
        return httpx.get(f"{self.url}/health").json()

    def metric(self, name: str) -> float:
        for line in httpx.get(f"{self.url}/metrics").text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"metric {name} not found")

    def stop(self) -> int:
        """SIGTERM, then the exit status (uvicorn re-raises the signal after a graceful shutdown,
        so a clean exit is -SIGTERM with "Finished server process" logged)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def _start(tmp: Path, base_dir: Path, run_dir: Path, **extra) -> Server:
    port = _free_port()
    values = {
        "port": port,
        "host": "127.0.0.1",
        "checkpointer.checkpoint_dir": base_dir,
        "checkpointer.pretrain_steps": 30,
        "adapter_checkpoint": run_dir,
        "output_dir": tmp / "out",
        **extra,
    }
    overrides = [f"{k}={v}" for k, v in values.items()]
    log = tmp / "server.log"
    with open(log, "w") as f:
        process = subprocess.Popen([*tune_command(), "run", "mas_serve", "--config", "tiny_serve", *overrides], cwd=tmp, stdout=f, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", process, log, overrides)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"mas_serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{server.url}/health", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    server.stop()
    raise AssertionError(f"mas_serve did not come up:\n{log.read_text()[-3000:]}")


def _train_adapter(out: Path, base_dir: Path, config: str) -> Path:
    """A few steps of `tune run mas_lora_finetune` (the adapter only has to exist and record how
    it was trained)."""
    overrides = {
        "output_dir": out,
        "checkpointer.checkpoint_dir": base_dir,
        "checkpointer.pretrain_steps": 30,
        "epochs": 1,
        "max_steps_per_epoch": 4,
        "batch_size": 4,
        "val_every_n_steps": "None",
        "progress_bar": False,
    }
    cmd = [*tune_command(), "run", "mas_lora_finetune", "--config", config, *[f"{k}={v}" for k, v in overrides.items()]]
    result = subprocess.run(cmd, cwd=out.parent, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def tiny_mas_run(tmp_path_factory, tiny_base_dir) -> Path:
    return _train_adapter(tmp_path_factory.mktemp("serve_runs") / "tiny_mas_adapter", tiny_base_dir, "tiny_mas")


@pytest.fixture(scope="module")
def tiny_causal_run(tmp_path_factory, tiny_base_dir) -> Path:
    return _train_adapter(tmp_path_factory.mktemp("serve_runs") / "tiny_causal_adapter", tiny_base_dir, "tiny_causal")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_base_dir, tiny_mas_run):
    s = _start(tmp_path_factory.mktemp("serve_mas"), tiny_base_dir, tiny_mas_run, max_num_seqs=4)
    yield s
    assert s.stop() in (0, -signal.SIGTERM), s.log.read_text()[-3000:]
    assert "Finished server process" in s.log.read_text()


@pytest.fixture(scope="module")
def reference(tiny_base_dir, tiny_mas_run, tmp_path_factory):
    """`mas.generate` on the same weights, one prompt at a time: the slow twin."""
    return _Reference(tiny_base_dir, tiny_mas_run, tmp_path_factory.mktemp("ref"))


class _Reference:
    def __init__(self, base_dir: Path, run_dir: Path, tmp: Path) -> None:
        import torch

        from mas.config import instantiate, load_config, to_options
        from mas.generation.loading import load_inference_model
        from mas.serving import ServeOptions

        cfg = load_config("tiny_serve", [f"checkpointer.checkpoint_dir={base_dir}", "checkpointer.pretrain_steps=30", f"adapter_checkpoint={run_dir}", f"output_dir={tmp}"])
        opts = to_options(cfg, ServeOptions, "mas_serve")
        self.tokenizer = instantiate(opts.tokenizer)
        loaded = load_inference_model(opts.model, opts.checkpointer, adapter_checkpoint=opts.adapter_checkpoint, device=torch.device("cpu"), dtype=torch.float32)
        self.model = loaded.model
        self.attention = loaded.trained_attention
        self._memo: Dict[str, List[int]] = {}

    def tokens(self, prompt, max_new_tokens: int = MAX_TOKENS, **sampling) -> List[int]:
        """``mas.generate`` for ``prompt`` alone; ``sampling``: temperature, top_k, top_p, seed."""
        import mas

        key = json.dumps([prompt, max_new_tokens, sampling], sort_keys=True)
        if key not in self._memo:
            out = mas.generate(self.model, self.tokenizer, [prompt], attention=self.attention, max_new_tokens=max_new_tokens, batch_size=1, **sampling)
            self._memo[key] = out.tokens[0]
        return self._memo[key]


def _chat_messages(system, user):
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


def _chat(server: Server, messages, **extra) -> Dict:
    body = {"model": server.model, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0, "return_token_ids": True, **extra}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_openai_client_chat_completions_stream_and_models(server, reference, tiny_mas_run):
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-needed")
    # The served name defaults to the adapter's run folder.
    assert [m.id for m in client.models.list().data] == [tiny_mas_run.name]
    messages = _chat_messages(SYSTEM, USERS[1])
    reply = client.chat.completions.create(model=server.model, messages=messages, max_tokens=MAX_TOKENS, temperature=0, extra_body={"return_token_ids": True})
    expected = reference.tokens({"messages": messages})
    assert reply.model_extra["mas"]["token_ids"] == [expected]
    assert reply.choices[0].message.content == reference.tokenizer.decode(expected)
    assert reply.usage.completion_tokens == len(expected)
    pieces, reasons = [], []
    for chunk in client.chat.completions.create(model=server.model, messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True):
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            reasons.append(choice.finish_reason)
    assert "".join(pieces) == reply.choices[0].message.content
    assert reasons[-1] in ("stop", "length")
    completion = client.completions.create(model=server.model, prompt=USERS[0], max_tokens=MAX_TOKENS, temperature=0, extra_body={"return_token_ids": True})
    assert completion.model_extra["mas"]["token_ids"] == [reference.tokens(USERS[0])]
    # The usual streaming loop, to the end: every chunk has a choice unless usage was asked for.
    streamed = "".join(c.choices[0].text for c in client.completions.create(model=server.model, prompt=USERS[0], max_tokens=MAX_TOKENS, temperature=0, stream=True))
    assert streamed == completion.choices[0].text
    chat_stream = client.chat.completions.create(model=server.model, messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chat_stream) == reply.choices[0].message.content


def _twin_logprobs(reference, tokens, segment_ids):
    """Every position's log-softmax from one forward of the whole sequence (no cache, dense mask)."""
    from mas.testing.reference_decoding import reference_logprobs

    return reference_logprobs(reference.model, tokens, segment_ids, reference.attention)


def test_logprobs_equal_a_full_forward_streamed_or_not(server, reference):
    import openai

    from mas import CAUSAL

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-needed")
    messages = _chat_messages(SYSTEM, USERS[1])
    reply = client.chat.completions.create(model=server.model, messages=messages, max_tokens=MAX_TOKENS, temperature=0, logprobs=True, top_logprobs=3, extra_body={"return_token_ids": True})
    (ids,) = reply.model_extra["mas"]["token_ids"]
    prompt = httpx.post(f"{server.url}/tokenize", json={"messages": messages}, timeout=30).json()
    twin = _twin_logprobs(reference, prompt["tokens"] + ids, prompt["segment_ids"] + [CAUSAL] * len(ids))[len(prompt["tokens"]) - 1 :]
    content = reply.choices[0].logprobs.content
    assert len(content) == len(ids) > 0
    for entry, row, token in zip(content, twin, ids):
        assert entry.token == reference.tokenizer.decode([token]) and entry.bytes == list(entry.token.encode())
        assert entry.logprob == pytest.approx(row[token].item(), abs=1e-4)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(row.topk(3).values.tolist(), abs=1e-4)
    stream = client.chat.completions.create(model=server.model, messages=messages, max_tokens=MAX_TOKENS, temperature=0, logprobs=True, top_logprobs=3, stream=True)
    streamed = [e for c in stream for ch in c.choices if ch.logprobs for e in ch.logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in content]
    # Completions: OpenAI's layout, `logprobs` alternatives per token.
    completion = client.completions.create(model=server.model, prompt=USERS[0], max_tokens=MAX_TOKENS, temperature=0, logprobs=2, extra_body={"return_token_ids": True})
    (ids,) = completion.model_extra["mas"]["token_ids"]
    layout = completion.choices[0].logprobs
    assert len(layout.tokens) == len(layout.token_logprobs) == len(layout.top_logprobs) == len(ids)
    assert all(len(top) <= 2 and max(top.values()) >= lp - 1e-6 for top, lp in zip(layout.top_logprobs, layout.token_logprobs))
    assert layout.text_offset == sorted(layout.text_offset)
    chunks = list(client.completions.create(model=server.model, prompt=USERS[0], max_tokens=MAX_TOKENS, temperature=0, logprobs=2, stream=True))
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert [t for lp in streamed for t in lp.tokens] == layout.tokens
    assert [o for lp in streamed for o in lp.text_offset] == layout.text_offset  # offsets continue across chunks
    # Echo under MAS would score tokens that their predicting position has seen: refused, named.
    refused = httpx.post(f"{server.url}/v1/completions", json={"model": server.model, "prompt": USERS[0], "echo": True, "logprobs": 1, "max_tokens": 0}, timeout=30)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "echo", refused.text
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=server.model, messages=messages, max_tokens=2, top_logprobs=2)  # needs logprobs=True


def test_prompt_logprobs_of_an_answer_equal_mas_eval_loglik(server, reference):
    """A candidate answer as the final assistant message, nothing generated: its tokens' prompt
    log-probabilities sum to mas_eval's loglik score; tokens inside a MAS segment are null."""
    import mas
    from mas.evaluation.loglik import answer_logprobs
    from mas.segments import SegmentBuilder

    messages = _chat_messages(SYSTEM, USERS[1]) + [{"role": "assistant", "content": "true"}]
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"model": server.model, "messages": messages, "max_tokens": 0, "prompt_logprobs": 1}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 0
    candidate = SegmentBuilder(reference.tokenizer)(mas.generation.prompt_messages({"messages": messages}), for_generation=True)
    scores = body["prompt_logprobs"]
    assert len(scores) == len(candidate) and scores[0] is None
    answer = [i for i, s in enumerate(candidate.segment_ids) if s < 0]
    assert answer and all(scores[i] is not None for i in answer)
    summed = sum(scores[i][str(candidate.tokens[i])]["logprob"] for i in answer)
    (expected,) = answer_logprobs(reference.model, [candidate], attention=reference.attention)
    assert summed == pytest.approx(expected, abs=1e-4)
    inside = [i for i in range(1, len(candidate)) if candidate.segment_ids[i] >= 0 and candidate.segment_ids[i] == candidate.segment_ids[i - 1]]
    assert reference.attention == "mas" and inside and all(scores[i] is None for i in inside)
    bad = httpx.post(f"{server.url}/v1/chat/completions", json={"model": server.model, "messages": messages, "max_tokens": 0}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens", bad.text


def _check_lm_eval_style_scoring(server: Server, reference) -> None:
    """What lm-evaluation-harness's local-completions does for a log-likelihood request, on a
    causal server: raw ids from /tokenize, a token-id prompt with echo, logprobs=1, max_tokens=1;
    the continuation's summed log-probabilities equal mas_eval's loglik score."""
    from mas import CAUSAL
    from mas.evaluation.loglik import answer_logprobs
    from mas.segments import SegmentedSequence

    info = httpx.get(f"{server.url}/tokenizer_info", timeout=30).json()
    assert info["eos_token"] and info["model_max_length"] > 0
    eos = httpx.post(f"{server.url}/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False}, timeout=30).json()["tokens"]
    assert eos == [reference.tokenizer.eos_id]
    raw = lambda text: httpx.post(f"{server.url}/tokenize", json={"prompt": text, "add_special_tokens": False}, timeout=30).json()["tokens"]  # noqa: E731
    context, continuation = raw("Question: is ice cold?\nAnswer:"), raw(" yes")
    body = {"model": server.model, "prompt": [context + continuation], "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0}
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    layout = choice["logprobs"]
    assert layout["token_logprobs"][0] is None and len(layout["tokens"]) == len(context) + len(continuation) + 1
    assert choice["text"].startswith(reference.tokenizer.decode(context + continuation))
    score = sum(layout["token_logprobs"][len(context) : -1])
    tokens = context + continuation
    sequence = SegmentedSequence(tokens, [-100] * len(context) + continuation, [0] * len(context) + [CAUSAL] * len(continuation))
    (expected,) = answer_logprobs(reference.model, [sequence], attention="causal")
    assert score == pytest.approx(expected, abs=1e-4)
    zero = httpx.post(f"{server.url}/v1/completions", json={**body, "max_tokens": 0, "prompt": "Is ice cold?"}, timeout=60).json()
    assert zero["choices"][0]["text"] == "Is ice cold?" and zero["usage"]["completion_tokens"] == 0


def test_usage_counts_each_prompt_once_and_streams_it_only_when_asked(server):
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-needed")
    messages = _chat_messages(SYSTEM, USERS[0])
    one = client.chat.completions.create(model=server.model, messages=messages, max_tokens=4, temperature=0)
    three = client.chat.completions.create(model=server.model, messages=messages, max_tokens=4, temperature=0, n=3)
    assert three.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt once, not once per choice
    assert one.usage.completion_tokens <= 4 and three.usage.completion_tokens <= 3 * 4
    chunks = list(client.chat.completions.create(model=server.model, messages=messages, max_tokens=4, temperature=0, n=2, stream=True, stream_options={"include_usage": True}))
    assert [c.choices for c in chunks[-1:]] == [[]] and chunks[-1].usage.prompt_tokens == one.usage.prompt_tokens
    assert all(c.choices for c in chunks[:-1]) and all(c.usage is None for c in chunks[:-1])


def test_harmless_defaults_are_accepted_and_unsupported_values_named(server):
    base = {"model": server.model, "messages": _chat_messages(None, USERS[0]), "max_tokens": 2}
    defaults = {"response_format": {"type": "text"}, "logit_bias": {}, "tools": [], "presence_penalty": 0, "frequency_penalty": 0.0, "logprobs": False}
    r = httpx.post(f"{server.url}/v1/chat/completions", json={**base, **defaults}, timeout=60)
    assert r.status_code == 200, r.text
    for key, value in {"logit_bias": {"1": 5}, "response_format": {"type": "json_object"}, "echo": True, "tools": [{"type": "function"}]}.items():
        r = httpx.post(f"{server.url}/v1/chat/completions", json={**base, key: value}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == key, (key, r.text)
        assert "not supported" in r.json()["error"]["message"]
    for key, value in {"frequency_penalty": "x", "presence_penalty": 3, "repetition_penalty": 0}.items():
        r = httpx.post(f"{server.url}/v1/chat/completions", json={**base, key: value}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == key, (key, r.text)


def test_penalties_change_what_is_generated(server):
    messages = _chat_messages(None, USERS[0])
    plain = _chat(server, messages, max_tokens=16, ignore_eos=True)["mas"]["token_ids"][0]
    penalized = _chat(server, messages, max_tokens=16, ignore_eos=True, frequency_penalty=2, repetition_penalty=3.0)["mas"]["token_ids"][0]
    assert penalized != plain and len(set(penalized)) >= len(set(plain))


def test_only_json_bodies_run_a_generation(server):
    body = json.dumps({"model": server.model, "messages": _chat_messages(None, USERS[0]), "max_tokens": 2})
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"content-type": content_type} if content_type else {}
        r = httpx.post(f"{server.url}/v1/chat/completions", content=body, headers=headers, timeout=30)
        assert r.status_code == 415 and "application/json" in r.json()["error"]["message"], (content_type, r.text)
    r = httpx.post(f"{server.url}/v1/chat/completions", content=body, headers={"content-type": "application/json; charset=utf-8"}, timeout=60)
    assert r.status_code == 200, r.text


def test_batched_requests_and_prefix_cache_hits_equal_generate(server, reference):
    prompts = [_chat_messages(SYSTEM if i % 2 == 0 else None, u) for i, u in enumerate(USERS)] * 2
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        replies = list(pool.map(lambda m: _chat(server, m), prompts))
    for messages, reply in zip(prompts, replies):
        assert reply["mas"]["token_ids"] == [reference.tokens({"messages": messages})], messages
    hits_before = server.metric("mas_serve_prefix_cache_hits_total")
    # The system prompt is cached now: a new user turn reuses it, and is still exact.
    reply = _chat(server, _chat_messages(SYSTEM, "Is water wet?"))
    system_len = len(reference.tokenizer.encode(SYSTEM, add_bos=True, add_eos=False))
    assert reply["usage"]["prompt_tokens_details"]["cached_tokens"] >= system_len
    assert reply["mas"]["token_ids"] == [reference.tokens({"messages": _chat_messages(SYSTEM, "Is water wet?")})]
    assert server.metric("mas_serve_prefix_cache_hits_total") > hits_before
    assert server.metric("mas_serve_prefill_tokens_saved_total") >= system_len


def test_chat_served_turn_by_turn_equals_the_whole_conversation(server, reference):
    first = _chat_messages(SYSTEM, USERS[3])
    turn1 = _chat(server, first)
    conversation = first + [{"role": "assistant", "content": turn1["choices"][0]["message"]["content"]}, {"role": "user", "content": "Why?"}]
    turn2 = _chat(server, conversation)
    assert turn2["mas"]["token_ids"] == [reference.tokens({"messages": conversation})]
    # Only the new turn was prefilled: the whole first prompt came from the cache.
    assert turn2["usage"]["prompt_tokens_details"]["cached_tokens"] >= turn1["usage"]["prompt_tokens"]


def test_seeded_sampling_equals_generate_alone_and_batched(server, reference):
    """A seeded request with temperature > 0 draws what ``mas.generate(seed=..., batch_size=1)``
    draws for that prompt, whatever else the server decodes; choice ``j`` of ``n`` uses ``seed + j``."""
    cases = [
        (_chat_messages(SYSTEM, USERS[0]), dict(temperature=1.0, seed=11)),
        (_chat_messages(None, USERS[2]), dict(temperature=0.8, top_k=40, seed=5)),
        (_chat_messages(SYSTEM, USERS[3]), dict(temperature=1.2, top_p=0.9, seed=0)),
    ]
    extra = {"max_tokens": 12, "ignore_eos": True}
    alone = [_chat(server, m, **extra, **s)["mas"]["token_ids"][0] for m, s in cases]
    # Concurrent: the seeded requests again, among unseeded ones.
    noise = [(_chat_messages(None, u), dict(temperature=1.0)) for u in USERS]
    jobs = cases + noise
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        replies = list(pool.map(lambda job: _chat(server, job[0], **extra, **job[1]), jobs))
    batched = [r["mas"]["token_ids"][0] for r in replies[: len(cases)]]
    expected = [reference.tokens({"messages": m}, 12, stop_tokens=[], **s) for m, s in cases]
    assert alone == expected
    assert batched == expected
    # The check can fail: sampling chose other tokens than greedy decoding would.
    assert expected[0] != reference.tokens({"messages": cases[0][0]}, 12, stop_tokens=[])
    assert all(len(r["mas"]["token_ids"][0]) == 12 for r in replies[len(cases):])  # unseeded ones ran too
    messages, sampling = cases[0]
    two = _chat(server, messages, n=2, **extra, **sampling)["mas"]["token_ids"]
    assert two == [expected[0], reference.tokens({"messages": messages}, 12, stop_tokens=[], **{**sampling, "seed": 12})]


LONG = "word " * 600


@pytest.mark.parametrize(
    "body, status, param",
    [
        ("{not json", 400, None),
        ({"model": "M"}, 400, "messages"),
        ({"model": "M", "messages": []}, 400, "messages"),
        ({"model": "M", "messages": "hello"}, 400, "messages"),
        ({"model": "M", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
        ({"model": "M", "messages": [{"role": "user", "content": "  "}]}, 400, "messages[0].content"),
        ({"model": "M", "messages": [{"role": "user"}]}, 400, "messages[0].content"),
        ({"model": "M", "messages": [{"role": "user", "content": LONG}]}, 400, "messages"),
        ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 600}, 400, "max_tokens"),
        ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"}, 400, "max_tokens"),
        ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
        ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400, "stream"),
        ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "n": 0}, 400, "n"),
        ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "stop": 5}, 400, "stop"),
        ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
        ({"model": "M", "messages": [{"role": {"x": 1}, "content": "hi"}]}, 400, "messages[0].role"),
        ({"model": "M", "messages": ["hi"]}, 400, "messages[0]"),
        ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "seed": 2**64}, 400, "seed"),
        ("[" * 100_000 + "]" * 100_000, 400, None),
    ],
)
def test_bad_requests_get_openai_errors_naming_the_field(server, body, status, param):
    if isinstance(body, dict) and body.get("model") == "M":
        body = {**body, "model": server.model}
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(f"{server.url}/v1/chat/completions", content=content, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"], error
    if param is not None:
        assert error["message"].startswith(param)


def test_tokenize_shows_the_segments_a_chat_is_prefilled_with(server, reference):
    import mas
    from mas.segments import SegmentBuilder

    messages = _chat_messages(SYSTEM, USERS[1])
    r = httpx.post(f"{server.url}/tokenize", json={"messages": messages}, timeout=30)
    assert r.status_code == 200, r.text
    got = r.json()
    expected = SegmentBuilder(reference.tokenizer)(mas.generation.prompt_messages({"messages": messages}), for_generation=True)
    assert (got["tokens"], got["segment_ids"], got["count"]) == (expected.tokens, expected.segment_ids, len(expected))
    assert set(got["segment_ids"]) >= {0, 1}  # the system prompt and the user turn, each a segment
    back = httpx.post(f"{server.url}/detokenize", json={"tokens": got["tokens"]}, timeout=30).json()["prompt"]
    assert back == reference.tokenizer.decode(expected.tokens)
    two = httpx.post(f"{server.url}/tokenize", json={"prompt": [USERS[0], USERS[2]]}, timeout=30).json()
    assert len(two["prompts"]) == 2 and "tokens" not in two
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": [-1]}, timeout=30).json()["error"]["param"] == "tokens"
    assert httpx.post(f"{server.url}/tokenize", json={"model": "nope", "prompt": "hi"}, timeout=30).status_code == 404


def test_stop_token_ids_and_min_tokens(server, reference):
    plain = _chat(server, _chat_messages(None, USERS[0]), ignore_eos=True)["mas"]["token_ids"][0]
    stopped = _chat(server, _chat_messages(None, USERS[0]), stop_token_ids=[plain[2]], ignore_eos=True)
    assert stopped["mas"]["token_ids"][0] == plain[: plain.index(plain[2])] and stopped["choices"][0]["finish_reason"] == "stop"
    late = _chat(server, _chat_messages(None, USERS[0]), stop_token_ids=[plain[2]], min_tokens=4, ignore_eos=True)["mas"]["token_ids"][0]
    assert len(late) >= 4 and plain[2] not in late[:4]
    base = {"model": server.model, "messages": _chat_messages(None, USERS[0]), "max_tokens": 3}
    for extra, param in (({"min_tokens": 5}, "min_tokens"), ({"stop_token_ids": [10**9]}, "stop_token_ids"), ({"stop_token_ids": ["x"]}, "stop_token_ids[0]")):
        r = httpx.post(f"{server.url}/v1/chat/completions", json={**base, **extra}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_random_malformed_bodies_never_get_a_500(server):
    """A bounded fuzz pass: each field of a valid body replaced by a random JSON value (and
    random extra fields); every answer is a 2xx or 4xx, and the server stays healthy."""
    import random

    rng = random.Random(0)
    values = [None, True, -1, 0, 2**70, 1e308, -0.5, "", "x", [], {}, [[[]]], {"a": {"b": [1]}}, ["hi"], [{"role": "user"}], "\u0000"]
    valid = {"model": server.model, "messages": _chat_messages(None, USERS[0]), "max_tokens": 2, "temperature": 0}
    fields = list(valid) + ["n", "stop", "seed", "top_p", "top_k", "stream", "stream_options", "logit_bias", "presence_penalty", "tools", "user"]
    statuses = []
    for _ in range(120):
        body = dict(valid)
        for key in rng.sample(fields, rng.randint(1, 3)):
            body[key] = rng.choice(values)
        body["stream"] = False if body.get("stream") is True else body.get("stream", False)
        r = httpx.post(f"{server.url}/v1/chat/completions", content=json.dumps(body), headers={"content-type": "application/json"}, timeout=60)
        statuses.append(r.status_code)
        assert r.status_code < 500, (body, r.text)
    assert 400 in statuses and server.health()["status"] == "ok"


def test_completions_prompt_errors_and_unknown_route(server):
    r = httpx.post(f"{server.url}/v1/completions", json={"model": server.model, "prompt": ""})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.get(f"{server.url}/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()


def test_disconnected_stream_frees_its_slot(server):
    cancelled = server.metric("mas_serve_cancelled_sequences_total")
    body = {"model": server.model, "prompt": USERS[0], "max_tokens": 480, "stream": True, "ignore_eos": True, "temperature": 0}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(l for l in lines if l.startswith("data: "))
        assert server.health()["active_slots"] == 1
    # The client is gone: its slot is freed long before 480 tokens.
    deadline = time.monotonic() + 20
    while server.health()["active_slots"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.health()["active_slots"] == 0
    assert server.metric("mas_serve_cancelled_sequences_total") == cancelled + 1


def test_burst_of_64_requests_from_16_clients(server, reference):
    jobs = [(i, _chat_messages(SYSTEM if i % 3 else None, USERS[i % len(USERS)])) for i in range(64)]
    expected = {i: reference.tokens({"messages": m}) for i, m in jobs[:12]}  # the 12 distinct prompts

    def call(job):
        i, messages = job
        return i, _chat(server, messages)["mas"]["token_ids"][0]

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = dict(pool.map(call, jobs))
    assert sorted(results) == list(range(64))
    for i, tokens in results.items():
        twin = next(j for j in expected if jobs[j][1] == jobs[i][1])
        assert tokens == expected[twin], i
    health = server.health()
    assert health["active_slots"] == 0 and health["queue_depth"] == 0
    assert "mas_serve_requests_total" in httpx.get(f"{server.url}/metrics").text


def test_compiled_decode_server_equals_generate(tmp_path, tiny_base_dir, tiny_mas_run, reference):
    """`compile_decode=True` is accepted by the recipe and reaches the engine: the server decodes
    compiled (its start-up line says so) and its greedy and seeded tokens, batched, equal `mas.generate`."""
    compiled = _start(tmp_path, tiny_base_dir, tiny_mas_run, max_num_seqs=2, compile_decode=True)
    try:
        jobs = [(_chat_messages(SYSTEM, USERS[1]), dict(temperature=0)), (_chat_messages(None, USERS[0]), dict(temperature=1.0, seed=3, ignore_eos=True))]
        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
            replies = list(pool.map(lambda job: _chat(compiled, job[0], **job[1]), jobs))
        assert replies[0]["mas"]["token_ids"] == [reference.tokens({"messages": jobs[0][0]})]
        assert replies[1]["mas"]["token_ids"] == [reference.tokens({"messages": jobs[1][0]}, stop_tokens=[], temperature=1.0, seed=3)]
        assert "decode compiled (default" in compiled.log.read_text()
    finally:
        returncode = compiled.stop()
    assert returncode in (0, -signal.SIGTERM) and "Traceback" not in compiled.log.read_text()


def test_api_key_hosts_body_limit_and_a_taken_port(tmp_path, tiny_base_dir, tiny_causal_run, monkeypatch):
    """A keyed server refuses /v1 without the key (health stays open); a foreign Host header is
    refused; a body over max_request_bytes is a 413; a taken port fails before the model loads."""
    monkeypatch.setenv("MAS_SERVE_API_KEY", "sekret")
    keyed = _start(tmp_path, tiny_base_dir, tiny_causal_run, max_num_seqs=1, max_request_bytes=4096)
    try:
        body = {"model": keyed.health()["model"], "messages": _chat_messages(None, USERS[0]), "max_tokens": 2}
        assert httpx.post(f"{keyed.url}/v1/chat/completions", json=body, timeout=30).status_code == 401
        wrong = httpx.post(f"{keyed.url}/v1/chat/completions", json=body, headers={"authorization": "Bearer nope"}, timeout=30)
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        auth = {"authorization": "Bearer sekret"}
        assert httpx.post(f"{keyed.url}/v1/chat/completions", json=body, headers=auth, timeout=60).status_code == 200
        assert httpx.get(f"{keyed.url}/health", timeout=30).status_code == 200
        assert httpx.get(f"{keyed.url}/v1/models", headers={**auth, "host": "attacker.example"}, timeout=30).status_code == 400
        big = {**body, "messages": _chat_messages(None, "word " * 2000)}
        r = httpx.post(f"{keyed.url}/v1/chat/completions", json=big, headers=auth, timeout=30)
        assert r.status_code == 413 and "max_request_bytes" in r.json()["error"]["message"]
        # The same port again: refused in one line before any weights load.
        port = keyed.url.rsplit(":", 1)[1]
        cmd = [*tune_command(), "run", "mas_serve", "--config", "tiny_serve", f"port={port}", f"checkpointer.checkpoint_dir={tiny_base_dir}"]
        result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert result.returncode != 0 and f"cannot listen on 127.0.0.1:{port}" in result.stderr, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
    finally:
        keyed.stop()


def test_shutdown_ends_a_long_stream_with_an_error_event_and_done(tmp_path, tiny_base_dir, tiny_causal_run):
    """Past shutdown_timeout_s a stream still running is not cut mid-body: its last lines are an
    error event and [DONE], and the process exits cleanly."""
    small = _start(tmp_path, tiny_base_dir, tiny_causal_run, max_num_seqs=1, shutdown_timeout_s=1, max_cache_len=1000)
    try:
        body = {"model": small.model, "prompt": USERS[0], "max_tokens": 900, "stream": True, "ignore_eos": True, "temperature": 0}
        with httpx.stream("POST", f"{small.url}/v1/completions", json=body, timeout=120) as r:
            lines = r.iter_lines()
            assert next(l for l in lines if l.startswith("data: "))
            small.process.send_signal(signal.SIGTERM)
            rest = [l for l in lines if l.startswith("data: ")]
        assert rest[-1] == "data: [DONE]", rest[-3:]
        assert "error" in json.loads(rest[-2][6:]), rest[-2]
        assert small.process.wait(timeout=60) in (0, -signal.SIGTERM)
        assert "Traceback" not in small.log.read_text()
    finally:
        small.stop()


def test_two_adapters_by_name_in_one_server(tmp_path, tiny_base_dir, tiny_mas_run, tiny_causal_run, reference):
    """adapters={mas: ..., causal: ...}: /v1/models lists both with their recorded mode; each
    request's `model` picks one, prompted as it was trained; tokens equal mas.generate with that
    adapter alone; the prefix cache keeps their prompts apart; an unknown name is a 404 naming both."""
    import openai

    both = _start(tmp_path, tiny_base_dir, "null", **{"adapters": f"{{mas: {tiny_mas_run}, causal: {tiny_causal_run}}}", "max_num_seqs": 2})
    try:
        client = openai.OpenAI(base_url=f"{both.url}/v1", api_key="not-needed")
        cards = {m.id: m.model_extra["attention"] for m in client.models.list().data}
        assert cards == {"mas": "mas", "causal": "causal"}
        causal_reference = _Reference(tiny_base_dir, tiny_causal_run, tmp_path / "ref")
        messages = _chat_messages(SYSTEM, USERS[1])
        for _ in range(2):  # the second round hits the prefix cache of each adapter
            for name, ref in (("mas", reference), ("causal", causal_reference)):
                reply = client.chat.completions.create(model=name, messages=messages, max_tokens=MAX_TOKENS, temperature=0, extra_body={"return_token_ids": True})
                assert reply.model == name and reply.model_extra["mas"]["attention"] == ref.attention
                assert reply.model_extra["mas"]["token_ids"] == [ref.tokens({"messages": messages})], name
        assert both.health()["prefix_cache"]["hits"] >= 2
        with pytest.raises(openai.NotFoundError) as e:
            client.chat.completions.create(model="other", messages=messages, max_tokens=2)
        assert "`mas`" in str(e.value) and "`causal`" in str(e.value)
        tokenized = httpx.post(f"{both.url}/tokenize", json={"model": "causal", "messages": messages}, timeout=30).json()
        assert tokenized["attention"] == "causal"
    finally:
        assert both.stop() in (0, -signal.SIGTERM), both.log.read_text()[-3000:]


def test_causal_adapter_capacity_and_graceful_shutdown(tmp_path, tiny_base_dir, tiny_causal_run):
    """A causal adapter is served causally (exactly); a full server answers 429; SIGTERM lets an
    in-flight stream end cleanly and the process exit 0."""
    small = _start(tmp_path, tiny_base_dir, tiny_causal_run, max_num_seqs=1, max_queue=0, shutdown_timeout_s=30)
    try:
        reference = _Reference(tiny_base_dir, tiny_causal_run, tmp_path / "ref")
        assert reference.attention == "causal" and small.health()["attention"] == "causal"
        _check_lm_eval_style_scoring(small, reference)
        messages = _chat_messages(SYSTEM, USERS[1])
        reply = _chat(small, messages, attention="mas")
        assert reply["mas"]["token_ids"] == [reference.tokens({"messages": messages})]
        assert any("served with attention=causal" in w for w in reply["mas"]["warnings"])

        body = {"model": small.model, "prompt": USERS[0], "max_tokens": 80, "stream": True, "ignore_eos": True, "temperature": 0}
        with httpx.stream("POST", f"{small.url}/v1/completions", json=body, timeout=120) as r:
            lines = r.iter_lines()
            assert next(l for l in lines if l.startswith("data: "))
            busy = httpx.post(f"{small.url}/v1/completions", json={**body, "stream": False, "max_tokens": 2})
            assert busy.status_code == 429 and busy.json()["error"]["code"] == "rate_limit_exceeded", busy.text
            # Two choices never fit one row and no queue: a client error, not "retry later".
            never = httpx.post(f"{small.url}/v1/completions", json={**body, "stream": False, "max_tokens": 2, "n": 2})
            assert never.status_code == 400 and never.json()["error"]["param"] == "n", never.text
            small.process.send_signal(signal.SIGTERM)
            rest = [l for l in lines if l.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        finished = [json.loads(l[6:]) for l in rest[:-1]]
        assert any(c["choices"] and c["choices"][0]["finish_reason"] == "length" for c in finished)
        assert small.process.wait(timeout=60) in (0, -signal.SIGTERM)
        log = small.log.read_text()
        assert "Application shutdown complete" in log and "Traceback" not in log, log[-3000:]
    finally:
        small.stop()
