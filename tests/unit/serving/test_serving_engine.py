"""The server's driver of the inference engine against its slow twin, ``mas.generate``: same
greedy tokens alone, batched, joining mid-decode, with and without a prefix-cache hit, turn by
turn, for MAS and causal; faults stay with their request; cancelled and finished sequences free
their rows; a compiled decode gives the eager tokens, and a failing compiler falls back once."""

from __future__ import annotations

import copy
import threading
import time
from typing import List

import pytest
import torch
from torchtune.data import Message

import mas
from mas.generation import GenerationSettings, PrefixCache
from mas.segments import SegmentBuilder
from mas.serving import Engine, QueueFullError, SamplingParams, SequenceHandle

SYSTEM = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
USERS = [
    "Is the sky blue?",
    "### Instruction:\nPlease answer the following question with true or false, question: is ice cold?\n\n### Response:\n",
    "Name a colour that rhymes with bread, and then explain why it does in a sentence or two.",
    "Hi",
]


class Collector:
    """Collects one sequence's events; ``wait`` blocks until it finished or failed."""

    def __init__(self) -> None:
        self.events = []
        self.done = threading.Event()

    def __call__(self, event) -> None:
        self.events.append(event)
        if event.kind in ("finish", "error"):
            self.done.set()

    def wait(self, timeout: float = 60) -> "Collector":
        assert self.done.wait(timeout), "sequence did not finish"
        return self

    @property
    def tokens(self) -> List[int]:
        return [e.token for e in self.events if e.kind == "token"]

    @property
    def error(self):
        return next((e for e in self.events if e.kind == "error"), None)


def _messages(system, user):
    return ([Message("system", system, masked=True)] if system else []) + [Message("user", user, masked=True)]


def _expected(model, tokenizer, prompts, attention, max_new_tokens) -> List[List[int]]:
    """``mas.generate`` one prompt at a time (the slow twin), on a copy of the model."""
    reference = copy.deepcopy(model)
    return [
        mas.generate(reference, tokenizer, [p], attention=attention, max_new_tokens=max_new_tokens, batch_size=1, reuse_system_cache=False).tokens[0]
        for p in prompts
    ]


def _settings(attention="mas", rows=4, cache=True, **kwargs) -> GenerationSettings:
    return GenerationSettings(attention=attention, batch_size=rows, max_cache_len=512, reuse_system_cache=cache, **kwargs)


def _engine(model, tokenizer, attention, rows=4, cache=True, stop_tokens=None, max_queue=64, **kwargs) -> Engine:
    prefix_cache = PrefixCache(max_tokens=100_000, max_bytes=1 << 30) if cache else None
    settings = _settings(attention, rows, cache, **kwargs)
    return Engine(copy.deepcopy(model), tokenizer, settings, prefix_cache=prefix_cache, stop_tokens=stop_tokens, max_queue=max_queue).start()


def _submit(engine, tokenizer, messages, max_tokens, **params) -> Collector:
    collector = Collector()
    prompt = SegmentBuilder(tokenizer)(messages, for_generation=True)
    collector.handle = SequenceHandle(prompt, SamplingParams(max_tokens=max_tokens, **params), collector)
    engine.submit([collector.handle])
    return collector


@pytest.fixture(scope="module")
def model():
    from mas.models import tiny_llama3_2

    torch.manual_seed(0)
    model = tiny_llama3_2().eval()
    # A plain random init repeats one token under greedy decoding, which would make "same
    # tokens" a weak check; these scales give varied continuations.
    with torch.no_grad():
        model.tok_embeddings.weight.mul_(0.02)
        for name, p in model.named_parameters():
            if p.dim() == 2 and name != "tok_embeddings.weight":
                p.mul_(3.0)
    return model


@pytest.fixture(scope="module")
def tokenizer():
    from mas.models import tiny_llama3_tokenizer

    return tiny_llama3_tokenizer()


@pytest.mark.parametrize("attention", ["mas", "causal"])
def test_batched_and_joining_sequences_equal_generate(model, tokenizer, attention):
    prompts = [{"system": SYSTEM, "user": u} for u in USERS[:3]] + [{"user": USERS[3]}]
    expected = _expected(model, tokenizer, prompts, attention, max_new_tokens=12)
    engine = _engine(model, tokenizer, attention, rows=3, cache=False)
    try:
        # Four sequences of different lengths on three rows: the fourth waits for a free row.
        got = [_submit(engine, tokenizer, _messages(p.get("system"), p["user"]), 12) for p in prompts]
        assert [c.wait().tokens for c in got] == expected
        # One sequence decoding, another joining at its next step.
        first = _submit(engine, tokenizer, _messages(SYSTEM, USERS[1]), 12)
        while len(first.tokens) < 3 and not first.done.is_set():
            time.sleep(0.001)
        second = _submit(engine, tokenizer, _messages(None, USERS[3]), 12)
        assert [first.wait().tokens, second.wait().tokens] == [expected[1], expected[3]]
        assert engine.active_slots() == 0
    finally:
        engine.stop()


@pytest.mark.parametrize("attention", ["mas", "causal"])
def test_prefix_cache_hits_are_exact(model, tokenizer, attention):
    prompts = [{"system": SYSTEM, "user": u} for u in USERS]
    expected = _expected(model, tokenizer, prompts, attention, max_new_tokens=10)
    engine = _engine(model, tokenizer, attention, rows=2)
    try:
        cold = _submit(engine, tokenizer, _messages(SYSTEM, USERS[0]), 10).wait()
        warm = [_submit(engine, tokenizer, _messages(SYSTEM, u), 10) for u in USERS[1:]]
        assert [cold.tokens] + [c.wait().tokens for c in warm] == expected
        system_len = len(SegmentBuilder(tokenizer)(_messages(SYSTEM, "x")).spans[0])
        # The cold request prefilled everything; every later one copied the system prompt.
        assert engine.prefix_cache.stats.hits >= 3
        assert engine.prefix_cache.stats.saved_tokens >= 3 * system_len
    finally:
        engine.stop()


@pytest.mark.parametrize("attention", ["mas", "causal"])
def test_chat_turn_by_turn_equals_whole_conversation(model, tokenizer, attention):
    engine = _engine(model, tokenizer, attention, rows=2)
    try:
        turn1 = _submit(engine, tokenizer, _messages(SYSTEM, USERS[1]), 8).wait()
        answer = tokenizer.decode(turn1.tokens)
        conversation = _messages(SYSTEM, USERS[1]) + [Message("assistant", answer), Message("user", USERS[0], masked=True)]
        handle_prompt = SegmentBuilder(tokenizer)(conversation, for_generation=True)
        turn2 = Collector()
        handle = SequenceHandle(handle_prompt, SamplingParams(max_tokens=8), turn2)
        engine.submit([handle])
        turn2.wait()
        expected = _expected(model, tokenizer, [{"messages": conversation}], attention, max_new_tokens=8)[0]
        assert turn2.tokens == expected
        turn1_prompt_len = len(SegmentBuilder(tokenizer)(_messages(SYSTEM, USERS[1]), for_generation=True))
        # Only the new turn was prefilled: the first prompt (and the answer where it re-tokenizes
        # to the same ids) came from the cache.
        assert handle.cached_tokens >= turn1_prompt_len
    finally:
        engine.stop()


def test_merged_system_and_user_reuses_nothing_before_the_user_turn_end(model, tokenizer):
    builder = SegmentBuilder(tokenizer, merge_system_and_user=True)
    engine = _engine(model, tokenizer, "mas", rows=1)
    try:
        for user in USERS[:2]:
            collector = Collector()
            engine.submit([SequenceHandle(builder(_messages(SYSTEM, user), for_generation=True), SamplingParams(max_tokens=4), collector)])
            collector.wait()
        assert engine.prefix_cache.stats.hits == 0
    finally:
        engine.stop()


def test_a_failing_request_fails_alone(model, tokenizer):
    prompts = [{"system": SYSTEM, "user": u} for u in USERS[:3]]
    expected = _expected(model, tokenizer, prompts, "mas", max_new_tokens=6)
    others = {t for row in expected[1:] for t in row}
    poison = next(t for t in expected[0][1:-1] if t not in others)  # a token only prompt 0 decodes
    engine_model = copy.deepcopy(model)
    engine = Engine(engine_model, tokenizer, _settings(rows=3, cache=False)).start()

    def fail_on_poison(module, args):
        tokens = args[0]
        if tokens.shape[1] == 1 and bool((tokens == poison).any()):
            raise RuntimeError("poisoned token")

    engine_model.tok_embeddings.register_forward_pre_hook(fail_on_poison)
    try:
        got = [_submit(engine, tokenizer, _messages(p["system"], p["user"]), 6) for p in prompts]
        for c in got:
            c.wait()
        assert got[0].error is not None and "poisoned token" in got[0].error.message
        assert [c.tokens for c in got[1:]] == expected[1:]
        # The engine keeps serving.
        assert _submit(engine, tokenizer, _messages(SYSTEM, USERS[1]), 6).wait().tokens == expected[1]
        assert engine.active_slots() == 0
    finally:
        engine.stop()


def test_cancel_frees_the_row_and_queue_is_bounded(model, tokenizer):
    engine = _engine(model, tokenizer, "mas", rows=1, max_queue=1, stop_tokens=[])
    try:
        running = _submit(engine, tokenizer, _messages(None, USERS[0]), 400)
        while not running.tokens:
            time.sleep(0.001)
        waiting = _submit(engine, tokenizer, _messages(None, USERS[1]), 2)
        with pytest.raises(QueueFullError, match="at capacity"):
            _submit(engine, tokenizer, _messages(None, USERS[2]), 2)
        running.handle.cancel()
        running.wait()
        assert running.events[-1].finish_reason == "cancelled"
        assert len(running.tokens) < 400
        assert waiting.wait().events[-1].finish_reason == "length"
        assert engine.active_slots() == 0 and engine.queue_depth() == 0
    finally:
        engine.stop()


def test_stop_cancels_in_flight_sequences(model, tokenizer):
    engine = _engine(model, tokenizer, "mas", rows=1, stop_tokens=[])
    running = _submit(engine, tokenizer, _messages(None, USERS[0]), 400)
    queued = _submit(engine, tokenizer, _messages(None, USERS[1]), 400)
    while not running.tokens:
        time.sleep(0.001)
    engine.stop(drain_timeout_s=0.0)
    assert running.wait().error.status == 503 and queued.wait().error.status == 503
    assert not engine.is_alive()


def _expected_sampled(model, tokenizer, prompts, max_new_tokens, **sampling) -> List[List[int]]:
    """Seeded ``mas.generate`` with batch size 1, one prompt at a time (the contract's reference)."""
    reference = copy.deepcopy(model)
    return [
        mas.generate(reference, tokenizer, [p], max_new_tokens=max_new_tokens, batch_size=1, reuse_system_cache=False, **sampling).tokens[0]
        for p in prompts
    ]


SAMPLINGS = [dict(temperature=1.0), dict(temperature=0.8, top_k=20), dict(temperature=1.3, top_p=0.9)]


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["plain", "top_k", "top_p"])
def test_seeded_sampling_equals_generate_alone(model, tokenizer, sampling):
    prompts = [{"system": SYSTEM, "user": USERS[0]}, {"user": USERS[3]}]
    seeds = [0, 7]
    engine = _engine(model, tokenizer, "mas", rows=1, stop_tokens=[])
    try:
        for seed in seeds:
            expected = _expected_sampled(model, tokenizer, prompts, 12, seed=seed, stop_tokens=[], **sampling)
            got = [_submit(engine, tokenizer, _messages(p.get("system"), p["user"]), 12, seed=seed, **sampling).wait().tokens for p in prompts]
            assert got == expected, seed
        greedy = _expected(model, tokenizer, prompts[:1], "mas", max_new_tokens=12)[0]
        # The check can fail: sampling chose other tokens than greedy decoding would.
        assert expected[0] != greedy
    finally:
        engine.stop()


def test_seeded_sequence_draws_the_same_alone_and_batched(model, tokenizer):
    sampling = dict(temperature=1.0, top_p=0.95)
    target = _messages(SYSTEM, USERS[1])
    expected = _expected_sampled(model, tokenizer, [{"system": SYSTEM, "user": USERS[1]}], 16, seed=3, stop_tokens=[], **sampling)[0]
    engine = _engine(model, tokenizer, "mas", rows=4, stop_tokens=[])
    try:
        alone = _submit(engine, tokenizer, target, 16, seed=3, **sampling).wait().tokens
        # Batched: other seeded and unseeded sequences decode around it, one of them already
        # running when it joins, another admitted after it.
        first = _submit(engine, tokenizer, _messages(None, USERS[0]), 30, temperature=1.0)
        while len(first.tokens) < 3 and not first.done.is_set():
            time.sleep(0.001)
        second = _submit(engine, tokenizer, _messages(SYSTEM, USERS[2]), 20, seed=3, **sampling)
        batched = _submit(engine, tokenizer, target, 16, seed=3, **sampling)
        third = _submit(engine, tokenizer, _messages(None, USERS[3]), 10, temperature=0.7, top_k=5)
        for c in (first, second, batched, third):
            c.wait()
        assert alone == expected
        assert batched.tokens == expected
        assert engine.steps > 0 and len(second.tokens) == 20
    finally:
        engine.stop()


def test_unseeded_sampling_still_generates(model, tokenizer):
    engine = _engine(model, tokenizer, "mas", rows=2, stop_tokens=[])
    try:
        got = [_submit(engine, tokenizer, _messages(None, u), 8, temperature=1.0, top_k=10).wait() for u in USERS[:2]]
        assert [len(c.tokens) for c in got] == [8, 8]
        assert all(c.error is None and c.events[-1].finish_reason == "length" for c in got)
        vocab = model.tok_embeddings.num_embeddings
        assert all(0 <= t < vocab for c in got for t in c.tokens)
    finally:
        engine.stop()


def test_prefill_is_rounded_to_the_flex_tile_only_where_flex_runs(model, tokenizer):
    from mas.block_mask import FLEX_TILE

    plain = Engine(copy.deepcopy(model), tokenizer, _settings(rows=1))
    assert plain.core.prefill_bucket == 0
    flex = Engine(copy.deepcopy(model), tokenizer, _settings(rows=1, attention_backend="flex"))
    assert flex.core.prefill_bucket == FLEX_TILE


def test_a_failing_compiler_falls_back_to_eager_decoding_once(model, tokenizer, monkeypatch, caplog):
    """A compiled decode step that cannot run (a broken compiler toolchain): the step is retried
    row by row eagerly, the tokens stay exact, and the engine stops trying to compile."""
    import importlib

    from mas.generation.decode_loop import decode_step

    engine_module = importlib.import_module("mas.generation.engine")
    attempts = []

    def broken_compiler(mode):
        def step(*args, **kwargs):
            attempts.append(kwargs["width"])
            raise RuntimeError("inductor: no C++ compiler")

        return step

    monkeypatch.setattr(engine_module, "compiled_decode_step", broken_compiler)
    expected = _expected(model, tokenizer, [{"system": SYSTEM, "user": USERS[0]}], "mas", max_new_tokens=8)
    engine = _engine(model, tokenizer, "mas", rows=2, cache=False, compile_decode=True)
    try:
        with caplog.at_level("ERROR", logger="mas.generation.engine"):
            assert [_submit(engine, tokenizer, _messages(SYSTEM, USERS[0]), 8).wait().tokens] == expected
        assert len(attempts) == 1 and engine.core._step_fn is decode_step
        assert any("decoding eagerly from now on" in r.message for r in caplog.records)
    finally:
        engine.stop()


@pytest.mark.slow
def test_compiled_decode_equals_eager_engine_and_generate(model, tokenizer):
    """Real inductor compile: the same greedy and seeded sampled tokens as the eager engine and as
    mas.generate alone, with a request joining rows at other lengths, across the 64 and 128 slot
    width buckets."""
    greedy = [{"system": SYSTEM, "user": USERS[2]}, {"user": USERS[0]}, {"user": USERS[3]}]
    sampled_prompt = {"system": SYSTEM, "user": USERS[1]}
    sampling = dict(temperature=1.0, top_k=20, seed=5)
    max_tokens = [24, 16, 20]  # the second finishes first; the waiting one joins the others mid-stream
    expected = [_expected(model, tokenizer, [p], "mas", n)[0] for p, n in zip(greedy, max_tokens)]
    expected_sampled = _expected_sampled(model, tokenizer, [sampled_prompt], 20, stop_tokens=[], **sampling)[0]

    def serve(engine: Engine) -> List[List[int]]:
        try:
            collectors = [_submit(engine, tokenizer, _messages(greedy[0]["system"], greedy[0]["user"]), max_tokens[0])]
            collectors.append(_submit(engine, tokenizer, _messages(SYSTEM, sampled_prompt["user"]), 20, **sampling))
            collectors += [_submit(engine, tokenizer, _messages(None, p["user"]), n) for p, n in zip(greedy[1:], max_tokens[1:])]
            return [c.wait(timeout=300).tokens for c in collectors]
        finally:
            engine.stop()

    eager = serve(_engine(model, tokenizer, "mas", rows=3, cache=False, stop_tokens=[]))
    torch._dynamo.reset()
    compiled = serve(_engine(model, tokenizer, "mas", rows=3, cache=False, stop_tokens=[], compile_decode=True))
    reference = [expected[0], expected_sampled, expected[1], expected[2]]
    assert eager == reference
    assert compiled == reference
