"""The inference engine against its slow twin (a full recompute per token without any cache,
:mod:`mas.testing.reference_decoding`): greedy and seeded, MAS and causal, rows joining and
leaving mid-stream, prefix-cache hits at every cut point, chunked prefill, compiled and eager;
its masks come from the one entry point, and it reads the device once per step."""

from __future__ import annotations

import copy
import dataclasses
from typing import List

import pytest
import torch
from torchtune.data import Message

import mas
from mas import CAUSAL
from mas.generation import GenerationSettings, InferenceEngine, SamplingParams, decode_width, is_cut_point
from mas.generation.gqa_attention import NativeGQAMultiHeadAttention, native_gqa_attention
from mas.segments import SegmentBuilder, SegmentedSequence
from mas.testing.reference_decoding import reference_generate
from support.models import varied_tiny_model
from torchtune.modules import MultiHeadAttention

SYSTEM = "Below is an instruction that describes a task."
PROMPTS = [
    {"system": SYSTEM, "user": "Is ice cold?"},
    {"system": SYSTEM, "user": "Which is heavier, a stone or a feather? Answer briefly, please."},
    {"user": "Name a colour."},
    {"system": "You are terse.", "user": "Why is the sea salty?"},
    {"system": SYSTEM, "user": "Hi"},
]
SAMPLED = [SamplingParams(12, temperature=1.0, seed=3), SamplingParams(12, temperature=0.8, top_k=20, seed=5), SamplingParams(12, temperature=1.3, top_p=0.9, seed=9)]


@pytest.fixture(scope="module")
def model():
    m = varied_tiny_model()
    assert m.layers[0].attn.num_kv_heads < m.layers[0].attn.num_heads  # grouped queries
    return m


def _sequences(tokenizer, prompts=PROMPTS) -> List[SegmentedSequence]:
    builder = SegmentBuilder(tokenizer)
    return [builder(mas.generation.prompt_messages(p, i), for_generation=True) for i, p in enumerate(prompts)]


def _run(engine: InferenceEngine, seqs, params) -> List[List[int]]:
    requests = [engine.submit(s, p) for s, p in zip(seqs, params)]
    while engine.has_unfinished():
        engine.step()
    return [r.tokens for r in requests]


def _reference(model, seqs, params, attention="mas") -> List[List[int]]:
    twin = copy.deepcopy(model)
    return [reference_generate(twin, s, p, attention=attention)[0] for s, p in zip(seqs, params)]


@pytest.mark.parametrize("attention", ["mas", "causal"])
@pytest.mark.parametrize("reuse", [False, True], ids=["no-cache", "prefix-cache"])
def test_rows_joining_and_leaving_equal_a_recompute_without_cache(model, llama3_tokenizer, attention, reuse):
    """Five prompts on two rows, different lengths, greedy and seeded sampled: a row that
    finishes is taken by a waiting prompt while the other row is mid-stream."""
    seqs = _sequences(llama3_tokenizer)
    params = [SamplingParams(6), SAMPLED[0], SamplingParams(9), SAMPLED[1], SAMPLED[2]]
    expected = _reference(model, seqs, params, attention)
    settings = GenerationSettings(attention=attention, batch_size=2, max_cache_len=128, reuse_system_cache=reuse, stop_tokens=[])
    with InferenceEngine(copy.deepcopy(model), settings) as engine:
        assert _run(engine, seqs, params) == expected
        assert engine.decode_steps > 0 and not engine.has_unfinished()
    greedy = _reference(model, seqs[1:2], [SamplingParams(12)], attention)[0]
    assert expected[1] != greedy  # the check can fail: sampling chose other tokens than greedy


def _chat(tokenizer, turns: int) -> List[SegmentedSequence]:
    """A conversation's prompts: turn 1, then turn 1 + its answer + turn 2, ... (answers fixed)."""
    builder = SegmentBuilder(tokenizer)
    messages, prompts = [Message("system", SYSTEM, masked=True)], []
    for t in range(turns):
        messages.append(Message("user", f"Question {t}: why is it so?", masked=True))
        prompts.append(builder(list(messages), for_generation=True))
        messages.append(Message("assistant", f"Because {t}."))
    return prompts


@pytest.mark.parametrize("attention", ["mas", "causal"])
def test_prefix_cache_hits_at_every_cut_point_are_exact(model, llama3_tokenizer, attention):
    """A chat turn by turn: each turn reuses the longest cached prefix that ends at a cut point
    (the system prompt, then the whole earlier conversation), and its tokens equal the recompute."""
    prompts = _chat(llama3_tokenizer, 3)
    params = [SamplingParams(5)] * 3
    expected = _reference(model, prompts, params, attention)
    settings = GenerationSettings(attention=attention, batch_size=1, max_cache_len=256, reuse_system_cache=True, stop_tokens=[])
    with InferenceEngine(copy.deepcopy(model), settings) as engine:
        got, cached = [], []
        for prompt, p in zip(prompts, params):
            request = engine.submit(prompt, p)
            while engine.has_unfinished():
                engine.step()
            got.append(request.tokens)
            cached.append(request.cached_tokens)
    assert got == expected
    assert cached[0] == 0
    for earlier, prompt, n in zip(prompts, prompts[1:], cached[1:]):
        # The earlier turn's prompt (and its answer, where it re-tokenizes the same) came back.
        assert n >= len(earlier) and is_cut_point(prompt.segment_ids, n, attention)
        assert prompt.tokens[:n] == (earlier.tokens + prompt.tokens[len(earlier) :])[:n]


def test_a_shared_system_prompt_is_prefilled_once(model, llama3_tokenizer):
    seqs = _sequences(llama3_tokenizer)
    shared = [s for s, p in zip(seqs, PROMPTS) if p.get("system") == SYSTEM]
    system_len = shared[0].spans[0].end
    settings = GenerationSettings(batch_size=4, max_cache_len=128, reuse_system_cache=True, stop_tokens=[])
    with InferenceEngine(copy.deepcopy(model), settings) as engine:
        requests = [engine.submit(s, SamplingParams(4)) for s in shared]
        engine.step()
        assert [r.cached_tokens for r in requests] == [0] + [system_len] * (len(shared) - 1)
        assert engine.prefilled_tokens == sum(len(s) for s in shared) - system_len * (len(shared) - 1)
        while engine.has_unfinished():
            engine.step()
    assert [r.tokens for r in requests] == _reference(model, shared, [SamplingParams(4)] * len(shared))


@pytest.mark.parametrize("attention", ["mas", "causal"])
def test_identical_prompts_are_prefilled_once_and_then_found_whole(model, llama3_tokenizer, attention):
    """The choices of an n > 1 request (one prompt, three seeds) prefill the prompt once; a later
    repeat of it needs no prefill at all (its keys, values and next-token logits are cached)."""
    prompt = _sequences(llama3_tokenizer)[1]
    params = [SamplingParams(8, temperature=1.0, seed=s) for s in (1, 2, 3)]
    expected = _reference(model, [prompt] * 3, params, attention)
    settings = GenerationSettings(attention=attention, batch_size=3, max_cache_len=128, reuse_system_cache=True, stop_tokens=[])
    with InferenceEngine(copy.deepcopy(model), settings) as engine:
        assert _run(engine, [prompt] * 3, params) == expected
        assert engine.prefilled_tokens == len(prompt)
        before = engine.prefill_forwards
        again = engine.submit(prompt, params[1])
        while engine.has_unfinished():
            engine.step()
        assert again.tokens == expected[1] and again.cached_tokens == len(prompt)
        assert engine.prefill_forwards == before  # nothing prefilled
    assert len({tuple(t) for t in expected}) == 3  # the seeds drew differently


@pytest.mark.parametrize("attention", ["mas", "causal"])
def test_chunked_prefill_cuts_at_segment_ends_and_stays_exact(model, llama3_tokenizer, attention, monkeypatch):
    """A long prompt arriving while another row decodes is prefilled in chunks of at most 8
    tokens (a longer segment whole), each ending at a cut point, and the running row keeps
    decoding between them."""
    import mas.generation.engine as engine_module

    running = _sequences(llama3_tokenizer, [{"user": "Hi"}])[0]
    arriving = _sequences(llama3_tokenizer, [{"system": "S a b c d e f g h i j", "user": "Long question " * 4}])[0]
    params = SamplingParams(20)
    expected = _reference(model, [running, arriving], [params, params], attention)
    chunks = []
    real_prefill = engine_module.prefill

    def recording(model, batch, **kwargs):
        chunks.append((batch.prefix_len, batch.num_slots, batch.segment_ids.clone()))
        return real_prefill(model, batch, **kwargs)

    monkeypatch.setattr(engine_module, "prefill", recording)
    settings = GenerationSettings(attention=attention, batch_size=2, max_cache_len=128, prefill_chunk_tokens=8, stop_tokens=[], stop_check_every=1)
    with InferenceEngine(copy.deepcopy(model), settings) as engine:
        first = engine.submit(running, params)
        engine.step()
        chunks.clear()
        second = engine.submit(arriving, params)
        lengths = []
        while engine.has_unfinished():
            before = len(first.tokens)
            engine.step()
            lengths.append(len(first.tokens) - before)
    assert [first.tokens, second.tokens] == expected
    assert len(chunks) >= 2 and chunks[-1][1] == len(arriving)
    # MAS: a segment is never split (each of these two is longer than 8); causal: any position.
    longest_segment = max(sp.end - sp.start for sp in arriving.spans) if attention == "mas" else 8
    for start, end, _ in chunks:
        assert end - start <= max(8, longest_segment)
        assert is_cut_point(arriving.segment_ids, end, attention)
    # The running row decoded at every step while the arrival was prefilled.
    assert all(n == 1 for n in lengths[: len(chunks)] if not first.finished)


def test_a_row_prefilled_in_chunks_below_a_decoding_row_keeps_its_keys(model, llama3_tokenizer):
    """Eager steps run rows [0, last decoding row]: a row still prefilling in between takes part
    (it attends nothing) and its decode write must land in a slot the next chunk overwrites."""
    short, running = _sequences(llama3_tokenizer, [{"user": "Hi"}, {"user": "Tell me more, please."}])
    arriving = _sequences(llama3_tokenizer, [{"system": "S a b c d e f g h i j", "user": "Long question " * 4}])[0]
    params = [SamplingParams(3), SamplingParams(40), SamplingParams(10)]
    expected = _reference(model, [short, running, arriving], params)
    settings = GenerationSettings(batch_size=2, max_cache_len=128, prefill_chunk_tokens=8, stop_tokens=[], stop_check_every=1)
    with InferenceEngine(copy.deepcopy(model), settings) as engine:
        first, second = engine.submit(short, params[0]), engine.submit(running, params[1])
        while not first.finished:
            engine.step()
        third = engine.submit(arriving, params[2])  # takes row 0 while row 1 decodes
        engine.step()
        assert third.row == 0 and 0 < third.prefilled < len(arriving) and second.decoding
        while engine.has_unfinished():
            engine.step()
    assert [first.tokens, second.tokens, third.tokens] == expected


def test_each_decode_mask_is_the_rows_written_slots(model, llama3_tokenizer):
    """Each decode forward attends decode_width(written slots) keys (the exact count eagerly),
    and a row's query sees exactly its own written slots: the row of build_attention_mask."""
    from mas.attention import build_attention_mask

    seqs = _sequences(llama3_tokenizer)[:2]
    masks = []

    def record(module, args, kwargs):
        if args[0].shape[1] == 1:  # a decode step
            masks.append((kwargs["mask"].clone(), kwargs["input_pos"].clone()))

    twin = copy.deepcopy(model)
    handle = twin.register_forward_pre_hook(record, with_kwargs=True)
    settings = GenerationSettings(batch_size=2, max_cache_len=256, stop_tokens=[])
    with InferenceEngine(twin, settings) as engine:
        _run(engine, seqs, [SamplingParams(5), SamplingParams(3)])
    handle.remove()
    assert len(masks) == 4
    for step, (mask, pos) in enumerate(masks):
        for row, seq in enumerate(seqs):
            if step >= (4 if row == 0 else 2):
                # A finished row is left out of eager forwards (or attends nothing).
                assert row >= mask.shape[0] or not mask[row].any()
                continue
            slot = len(seq) + step
            assert int(pos[row, 0]) == slot
            layout = torch.tensor([seq.segment_ids + [CAUSAL] * (step + 1)])
            expected = build_attention_mask(layout, attention="mas", backend="sdpa", query_start=slot, query_len=1)
            assert torch.equal(mask[row, :, : slot + 1], expected[0]) and not mask[row, :, slot + 1 :].any()


def test_one_host_read_per_step_and_every_n_tokens(model, llama3_tokenizer, monkeypatch):
    """Offline, the new tokens are read from the device once per ``stop_check_every`` decode
    steps; streaming, once per step."""
    seqs = _sequences(llama3_tokenizer)[:2]
    reads = []
    original = torch.Tensor.tolist

    def counting(self):
        if self.dim() == 2 and self.shape[0] == 2:  # the step's [rows, tokens] table
            reads.append(tuple(self.shape))
        return original(self)

    # 24 tokens: the first from the prefill and 23 decode steps, 8 (or 1) per read.
    for every, stream, expected_reads in ((8, False, 3), (1, True, 23)):
        reads.clear()
        settings = GenerationSettings(batch_size=2, max_cache_len=128, stop_tokens=[], stop_check_every=every)
        with InferenceEngine(copy.deepcopy(model), settings, stream_text=stream, tokenizer=llama3_tokenizer if stream else None) as engine:
            monkeypatch.setattr(torch.Tensor, "tolist", counting)
            _run(engine, seqs, [SamplingParams(24), SamplingParams(24)])
            monkeypatch.setattr(torch.Tensor, "tolist", original)
        assert len(reads) == expected_reads, (every, reads)


def test_stop_tokens_and_stop_strings(model, llama3_tokenizer):
    seqs = _sequences(llama3_tokenizer)[:1]
    free = mas.generate(copy.deepcopy(model), seqs, max_new_tokens=8, stop_tokens=[]).tokens[0]
    stopped = mas.generate(copy.deepcopy(model), seqs, max_new_tokens=8, stop_tokens=[free[3]]).tokens[0]
    assert stopped == free[: free.index(free[3])]
    text = llama3_tokenizer.decode(free)
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    out = mas.generate(copy.deepcopy(model), llama3_tokenizer, PROMPTS[:1], max_new_tokens=8, stop_tokens=[], stop=[stop])
    assert out.texts[0] == text[: text.index(stop)] and out.finish_reasons == ["stop"]


def test_a_row_that_ignores_stop_tokens_runs_on_beside_one_that_stops(model, llama3_tokenizer):
    seqs = _sequences(llama3_tokenizer)[:1] * 2
    free = _reference(model, seqs[:1], [SamplingParams(8)])[0]
    stop = free[2]
    settings = GenerationSettings(batch_size=2, max_cache_len=128, stop_tokens=[stop])
    with InferenceEngine(copy.deepcopy(model), settings) as engine:
        requests = [engine.submit(seqs[0], SamplingParams(8)), engine.submit(seqs[1], SamplingParams(8, ignore_stop_tokens=True))]
        while engine.has_unfinished():
            engine.step()
    assert requests[0].tokens == free[: free.index(stop)] and requests[0].finish_reason == "stop"
    assert requests[1].tokens == free and requests[1].finish_reason == "length"


def test_per_request_stop_ids_and_min_tokens_equal_the_recompute(model, llama3_tokenizer):
    """stop_token_ids end one sequence only; min_tokens makes every stop id impossible until that
    many tokens exist (the twin masks them the same way); ignore_stop_tokens keeps the request's own."""
    seq = _sequences(llama3_tokenizer)[:1]
    free = _reference(model, seq, [SamplingParams(12)])[0]
    engine_stop, own_stop = free[3], free[1]
    params = [
        SamplingParams(12),
        SamplingParams(12, stop_token_ids=(own_stop,)),
        SamplingParams(12, min_tokens=6),
        SamplingParams(12, min_tokens=6, temperature=1.0, seed=4),
        SamplingParams(12, ignore_stop_tokens=True, stop_token_ids=(own_stop,)),
    ]
    twin = copy.deepcopy(model)
    expected = [reference_generate(twin, seq[0], p, stop_tokens=[engine_stop])[0] for p in params]
    settings = GenerationSettings(batch_size=3, max_cache_len=128, stop_tokens=[engine_stop])
    with InferenceEngine(copy.deepcopy(model), settings) as engine:
        got = _run(engine, seq * len(params), params)
    assert got == expected
    assert got[0] == free[: free.index(engine_stop)] and got[1] == free[:1]
    assert len(got[2]) >= 6 and engine_stop not in got[2][:6] and got[2] != got[0]
    assert got[4] == free[:1]  # its own stop id ends it although the engine's are ignored


def test_penalties_equal_the_recompute_and_leave_later_rows_alone(model, llama3_tokenizer):
    """Presence, frequency and repetition penalties inside the step equal the twin's token-by-token
    Counter; a row that had a penalized sequence serves a plain one next without a trace."""
    seqs = _sequences(llama3_tokenizer)[:2]
    params = [
        SamplingParams(12, repetition_penalty=2.0),
        SamplingParams(12, presence_penalty=0.5, frequency_penalty=0.25),
        SamplingParams(12, temperature=1.0, seed=6, frequency_penalty=1.5, repetition_penalty=0.5),
        SamplingParams(12),
    ]
    prompts = [seqs[0], seqs[1], seqs[0], seqs[1]]
    expected = _reference(model, prompts, params)
    settings = GenerationSettings(batch_size=2, max_cache_len=128, stop_tokens=[])
    with InferenceEngine(copy.deepcopy(model), settings) as engine:
        assert _run(engine, prompts, params) == expected
    unpenalized = [dataclasses.replace(p, presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0) for p in params[:3]]
    assert _reference(model, prompts[:3], unpenalized) != expected[:3]  # the penalties changed choices


def test_widths():
    assert [decode_width(n, 4096) for n in (1, 64, 65, 300, 513, 4000)] == [64, 64, 128, 512, 1024, 4096]
    assert decode_width(300, 320) == 320


def _counting_compiler(monkeypatch):
    """The engine's compiled step under a counting backend (graphs run eagerly); returns the counter."""
    from torch._dynamo.testing import CompileCounter

    import mas.generation.engine as engine_module
    from mas.compile_budget import compile_with_budget
    from mas.generation.decode_loop import decode_step

    counter = CompileCounter()
    monkeypatch.setattr(engine_module, "compiled_decode_step", lambda mode: compile_with_budget(decode_step, name="test", max_shapes=16, fix="", backend=counter))
    return counter


def _eager_then_compiled(model, seqs, params, settings):
    """The tokens of an eager engine, then of a compiled one (dynamo reset in between)."""
    with InferenceEngine(copy.deepcopy(model), settings) as engine:
        eager = _run(engine, seqs, params)
    torch._dynamo.reset()
    with InferenceEngine(copy.deepcopy(model), dataclasses.replace(settings, compile_decode=True)) as engine:
        return eager, _run(engine, seqs, params)


def test_compiled_engine_equals_eager_and_compiles_once_per_width_bucket(model, llama3_tokenizer, monkeypatch):
    """Counting backend (the graphs run eagerly): rows joining and leaving, greedy and sampled,
    give the eager tokens; the graphs are one per width bucket, none while lengths grow."""
    counter = _counting_compiler(monkeypatch)
    params = [SamplingParams(70), SAMPLED[0], SamplingParams(9), SAMPLED[1], SamplingParams(20)]
    eager, compiled = _eager_then_compiled(model, _sequences(llama3_tokenizer), params, GenerationSettings(batch_size=3, max_cache_len=256, stop_tokens=[]))
    assert compiled == eager
    # widths 64 and 128 (prompts of ~20 tokens + 70 new), greedy-only and mixed sampling rows
    assert counter.frame_count <= 4
    # The steps that compiled are timed apart from the decode rate (mas_generate reports both).
    out = mas.generate(copy.deepcopy(model), _sequences(llama3_tokenizer)[:2], max_new_tokens=20, compile_decode=True, stop_tokens=[])
    assert out.compile_seconds > 0 and out.decode_tokens_per_s > 0


def test_compiled_step_with_penalties_and_min_tokens_equals_eager(model, llama3_tokenizer, monkeypatch):
    """The penalty counts and the owed-token counts update inside a compiled step as eagerly."""
    counter = _counting_compiler(monkeypatch)
    params = [SamplingParams(20, repetition_penalty=2.0, min_tokens=5), SamplingParams(20, temperature=1.0, seed=2, presence_penalty=0.5), SamplingParams(20)]
    eager, compiled = _eager_then_compiled(model, _sequences(llama3_tokenizer)[:3], params, GenerationSettings(batch_size=3, max_cache_len=128, stop_tokens=[7]))
    assert compiled == eager and counter.frame_count >= 1


@pytest.mark.slow
def test_inductor_compiled_engine_equals_eager_without_graph_breaks(model, llama3_tokenizer):
    from torch._dynamo.utils import counters

    counters.clear()
    params = [SamplingParams(40), SAMPLED[0], SamplingParams(9), SAMPLED[1], SamplingParams(20)]
    eager, compiled = _eager_then_compiled(model, _sequences(llama3_tokenizer), params, GenerationSettings(batch_size=3, max_cache_len=128, stop_tokens=[]))
    assert compiled == eager
    assert dict(counters["graph_break"]) == {}  # forward, token choice and stops: one graph per shape


def test_native_gqa_forward_equals_torchtunes(model):
    tokens = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        reference = model(tokens)
        with native_gqa_attention(model) as switched:
            assert switched == len(model.layers)
            assert type(model.layers[0].attn) is NativeGQAMultiHeadAttention
            with native_gqa_attention(model) as nested:
                assert nested == 0
            got = model(tokens)
        assert type(model.layers[0].attn) is MultiHeadAttention
        torch.testing.assert_close(got, reference, atol=1e-5, rtol=1e-5)


def test_native_gqa_hands_the_attention_kv_heads_not_copies(model, llama3_tokenizer, monkeypatch):
    """With native GQA every attention call (prefill and decode) gets the keys and values at
    ``n_kv`` heads; torchtune's forward (``native_gqa=False``) expands them to ``n_h``."""
    from mas.attention import MASAttention

    attn = model.layers[0].attn
    seen = []
    original = MASAttention.__call__

    def recording(self, q, k, v, *args, **kwargs):
        seen.append((q.shape[1], k.shape[1], v.shape[1]))
        return original(self, q, k, v, *args, **kwargs)

    monkeypatch.setattr(MASAttention, "__call__", recording)
    heads, tokens = {}, {}
    for native in (True, False):
        seen.clear()
        tokens[native] = mas.generate(copy.deepcopy(model), llama3_tokenizer, PROMPTS[:2], max_new_tokens=4, stop_tokens=[], native_gqa=native).tokens
        assert len(seen) >= 4 * len(model.layers), native
        heads[native] = set(seen)
    assert heads[True] == {(attn.num_heads, attn.num_kv_heads, attn.num_kv_heads)}
    assert heads[False] == {(attn.num_heads, attn.num_heads, attn.num_heads)}
    assert tokens[True] == tokens[False]


def test_close_gives_the_model_back(model, llama3_tokenizer):
    twin = copy.deepcopy(model)
    with InferenceEngine(twin, GenerationSettings(batch_size=2, max_cache_len=64)) as engine:
        assert twin.caches_are_setup() and type(twin.layers[0].attn) is NativeGQAMultiHeadAttention
        _run(engine, _sequences(llama3_tokenizer)[:1], [SamplingParams(2)])
    assert not twin.caches_are_setup() and type(twin.layers[0].attn) is MultiHeadAttention
    with torch.no_grad():
        torch.testing.assert_close(twin(torch.tensor([[1, 2, 3]])), model(torch.tensor([[1, 2, 3]])))
