"""Generation: KV cache vs full recompute, train/inference parity, padding, system-prompt cache."""

from __future__ import annotations

import copy

import pytest
import torch

import mas
from mas import CAUSAL, dense_mas_mask
from mas.data import collate_segmented, instruction_messages
from mas.generation import DecodeState, GenerationSettings, decode_one_token, prefill, sample_next_token, system_prefix
from mas.generation.kv_cache import clear_kv_caches, setup_kv_caches
from mas.generation.layout import layout_prompts
from mas.segments import IGNORE_INDEX, SegmentBuilder, SegmentedSequence
from mas.training import prepare_batch
from support.models import varied_tiny_model

PROMPTS = [
    {"system": "Below is an instruction that describes a task.", "user": "### Instruction:\nIs ice cold?\n\n### Response:\n"},
    {"system": "Below is an instruction that describes a task.", "user": "### Instruction:\nWhich is heavier, a stone or a feather? Answer briefly.\n\n### Response:\n"},
    {"user": "Name a colour."},
    {"system": "You are terse.", "user": "Why is the sea salty?"},
]


@pytest.fixture
def model():
    m = varied_tiny_model()
    return m


def _recompute_greedy(model, seq: SegmentedSequence, steps: int):
    """The slow twin: re-run the whole sequence without a cache for every new token."""
    clear_kv_caches(model)
    tokens, segments = list(seq.tokens), list(seq.segment_ids)
    generated, all_logits = [], []
    with torch.no_grad():
        for _ in range(steps):
            t = torch.tensor([tokens])
            mask = dense_mas_mask(torch.tensor([segments]))
            logits = model(t, mask=mask)[0, -1]
            nxt = int(logits.argmax())
            generated.append(nxt)
            all_logits.append(logits)
            tokens.append(nxt)
            segments.append(CAUSAL)  # generated tokens are causal
    return generated, torch.stack(all_logits)


def test_kv_cached_generation_equals_full_recompute(model, llama3_tokenizer):
    builder = SegmentBuilder(llama3_tokenizer)
    for prompt in PROMPTS:
        seq = builder(mas.generation.prompt_messages(prompt), for_generation=True)
        expected_tokens, expected_logits = _recompute_greedy(model, seq, steps=8)
        # Cached path, logits step by step.
        setup_kv_caches(model, 1, 256, torch.float32)
        batch = layout_prompts([seq], pad_id=0)
        with torch.no_grad():
            logits = prefill(model, batch)[:, -1]
            state = DecodeState.after_prefill(batch, 256)
            got_tokens, got_logits = [], []
            for _ in range(8):
                token = logits.argmax(-1)
                got_tokens.append(int(token))
                got_logits.append(logits[0])
                logits = decode_one_token(model, token, state)
        assert got_tokens == expected_tokens
        torch.testing.assert_close(torch.stack(got_logits), expected_logits, atol=1e-4, rtol=1e-4)


def test_training_forward_equals_prefill_plus_teacher_forced_decode(model, llama3_tokenizer):
    builder = SegmentBuilder(llama3_tokenizer)
    train = builder(instruction_messages("Is ice cold?", "", "the correct answer is true"))
    batch = collate_segmented([{"tokens": train.tokens, "labels": train.labels, "segment_ids": train.segment_ids}])
    prepared = prepare_batch(batch, attention="mas", device=torch.device("cpu"))
    clear_kv_caches(model)
    with torch.no_grad():
        train_logits = model(prepared.tokens, **prepared.model_kwargs())[0]  # [s, vocab]
    prompt_len = train.segment_ids.index(CAUSAL)
    prompt = SegmentedSequence(train.tokens[:prompt_len], train.labels[:prompt_len], train.segment_ids[:prompt_len])
    setup_kv_caches(model, 1, 256, torch.float32)
    layout = layout_prompts([prompt], pad_id=0)
    with torch.no_grad():
        infer = [prefill(model, layout)[0]]  # [prompt_len, vocab]
        state = DecodeState.after_prefill(layout, 256)
        for token in train.tokens[prompt_len:-1]:
            infer.append(decode_one_token(model, torch.tensor([token]), state))
    torch.testing.assert_close(torch.cat(infer), train_logits[:-1], atol=1e-4, rtol=1e-4)


def test_causal_attention_matches_torchtunes_generate(llama3_tokenizer):
    from torchtune.generation import generate as tt_generate

    from mas.models import tiny_llama3_2

    torch.manual_seed(1)
    plain = tiny_llama3_2().eval()
    ours = copy.deepcopy(plain)
    prompt = "Which is heavier, a stone or a feather?"
    out = mas.generate(ours, llama3_tokenizer, [prompt], attention="causal", max_new_tokens=12, stop_tokens=[])
    seq = out.prompts[0]
    with torch.no_grad():
        reference, _ = tt_generate(
            plain, torch.tensor(seq.tokens), max_generated_tokens=12, pad_id=0, temperature=1.0, top_k=1
        )
    assert out.tokens[0] == reference[0, len(seq.tokens) :].tolist()


def test_padded_batch_equals_each_row_alone(model, llama3_tokenizer):
    batched = mas.generate(model, llama3_tokenizer, PROMPTS, max_new_tokens=10, batch_size=4)
    for i, prompt in enumerate(PROMPTS):
        alone = mas.generate(model, llama3_tokenizer, [prompt], max_new_tokens=10)
        assert alone.tokens[0] == batched.tokens[i], i
    assert batched.texts and all(isinstance(t, str) for t in batched.texts)


def test_system_prompt_cache_is_exact(model, llama3_tokenizer):
    shared = "Below is an instruction that describes a task."
    prompts = [{"system": shared, "user": f"Question {i}: " + "why " * i} for i in range(1, 6)]
    prompts.append({"system": "Another system prompt.", "user": "Hi"})
    plain = mas.generate(model, llama3_tokenizer, prompts, max_new_tokens=8, batch_size=3)
    cached = mas.generate(model, llama3_tokenizer, prompts, max_new_tokens=8, batch_size=3, reuse_system_cache=True)
    assert cached.tokens == plain.tokens
    assert cached.system_cache_hits == len(prompts)


@pytest.mark.parametrize("prefix", [False, True])
def test_prefill_logits_at_chosen_slots_equal_the_full_logits(model, llama3_tokenizer, monkeypatch, prefix):
    """``logits_at`` runs the LM head on one slot per row (here each row's last prompt token,
    and an earlier one), giving those rows of the full ``[b, slots, vocab]`` logits; a model
    without torchtune's unembed step takes the full path and picks the rows."""
    builder = SegmentBuilder(llama3_tokenizer)
    seqs = [builder(mas.generation.prompt_messages(p), for_generation=True) for p in PROMPTS[:2]]
    prefix_len = len(system_prefix(seqs[0])) if prefix else 0
    batch = layout_prompts(seqs, pad_id=0, prefix_len=prefix_len)
    width = batch.num_slots - prefix_len
    chosen = torch.tensor([width - 1, width - 5])

    def run(**kwargs):
        setup_kv_caches(model, 2, 256, torch.float32)
        if prefix_len:  # the cache must hold the prefix: prefill it first, as generate does
            prefill(model, layout_prompts([system_prefix(seqs[0])] * 2, pad_id=0))
        with torch.no_grad():
            return prefill(model, batch, **kwargs)

    full = run()
    projected = []
    real_output = model.output
    monkeypatch.setattr(model, "output", lambda h: projected.append(h.shape[0]) or real_output(h))
    picked = run(logits_at=chosen)
    assert projected[-1] == 2  # one slot per row reached the head
    torch.testing.assert_close(picked, full[torch.arange(2), chosen].float(), atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(mas.generation._decoding, "has_unembed", lambda m: False)
    torch.testing.assert_close(run(logits_at=chosen), full[torch.arange(2), chosen].float())


def test_system_prompt_cache_logits_match(model, llama3_tokenizer):
    """Prefill after a reused system prefix (with a padding gap) gives the same logits."""
    from mas.generation import SystemPromptCache, system_prefix
    from mas.generation.kv_cache import write_prefix

    builder = SegmentBuilder(llama3_tokenizer)
    seqs = [builder(mas.generation.prompt_messages(p), for_generation=True) for p in PROMPTS[:2]]
    setup_kv_caches(model, 2, 256, torch.float32)
    with torch.no_grad():
        full = prefill(model, layout_prompts(seqs, pad_id=0))[:, -1]
        prefix = system_prefix(seqs[0])
        cached = SystemPromptCache().get(model, prefix, attention="mas", backend="auto", cache_len=256)
        setup_kv_caches(model, 2, 256, torch.float32)
        write_prefix(model, cached)
        reused = prefill(model, layout_prompts(seqs, pad_id=0, prefix_len=len(prefix)))[:, -1]
    torch.testing.assert_close(reused, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tile", [16, 64])
def test_system_prompt_prefill_padded_to_a_tile_keeps_the_same_cache(model, llama3_tokenizer, monkeypatch, tile):
    """The system prompt's own prefill, right-padded to a tile (as where flex runs), keeps the
    same keys and values as the unpadded prefill; the prefill really ran at the padded width."""
    from mas.generation import SystemPromptCache, _decoding, system_prefix

    builder = SegmentBuilder(llama3_tokenizer)
    prefix = system_prefix(builder(mas.generation.prompt_messages(PROMPTS[0]), for_generation=True))
    assert len(prefix) % tile  # so the padding is not empty
    widths = []
    real_prefill = _decoding.prefill
    monkeypatch.setattr(_decoding, "prefill", lambda m, batch, **kw: widths.append(batch.num_slots) or real_prefill(m, batch, **kw))
    with torch.no_grad():
        plain = SystemPromptCache(prefill_tile=0).get(model, prefix, attention="mas", backend="auto", cache_len=256)
        padded = SystemPromptCache(prefill_tile=tile).get(model, prefix, attention="mas", backend="auto", cache_len=256)
    assert widths == [len(prefix), -(-len(prefix) // tile) * tile]
    for (k, v), (k_ref, v_ref) in zip(padded, plain):
        assert k.shape == k_ref.shape
        torch.testing.assert_close(k, k_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v, v_ref, atol=1e-5, rtol=1e-5)


def test_sampling_is_seeded_and_filters_work():
    logits = torch.randn(4, 50)
    greedy = sample_next_token(logits)
    assert torch.equal(sample_next_token(logits, temperature=0.7, top_k=1, generator=torch.Generator().manual_seed(0)), greedy)
    assert torch.equal(sample_next_token(logits, temperature=0.7, top_p=1e-6, generator=torch.Generator().manual_seed(0)), greedy)
    a = sample_next_token(logits, temperature=1.0, generator=torch.Generator().manual_seed(3))
    b = sample_next_token(logits, temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    top5 = logits.topk(5, dim=-1).indices
    for seed in range(20):
        s = sample_next_token(logits, temperature=2.0, top_k=5, generator=torch.Generator().manual_seed(seed))
        assert (top5 == s[:, None]).any(-1).all()


def test_seeded_sampling_is_reproducible(model, llama3_tokenizer):
    kwargs = dict(max_new_tokens=8, temperature=1.0, top_k=20, seed=7)
    assert mas.generate(model, llama3_tokenizer, PROMPTS, **kwargs).tokens == mas.generate(model, llama3_tokenizer, PROMPTS, **kwargs).tokens


def test_stop_tokens_end_rows(model, llama3_tokenizer):
    free = mas.generate(model, llama3_tokenizer, PROMPTS[:1], max_new_tokens=6, stop_tokens=[])
    stop_at = free.tokens[0][2]
    stopped = mas.generate(model, llama3_tokenizer, PROMPTS[:1], max_new_tokens=6, stop_tokens=[stop_at])
    assert stopped.tokens[0] == free.tokens[0][: free.tokens[0].index(stop_at)]


def test_clear_errors(model, llama3_tokenizer):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        mas.generate(model, llama3_tokenizer, ["ok", "  "])
    with pytest.raises(ValueError, match="user message is empty"):
        mas.generate(model, llama3_tokenizer, [{"system": "s", "user": ""}])
    with pytest.raises(ValueError, match=r"max_new_tokens .* > the 64-slot KV cache"):
        mas.generate(model, llama3_tokenizer, ["word " * 40], max_new_tokens=30, max_cache_len=64)
    with pytest.raises(ValueError, match="own segment"):
        mas.generate(model, llama3_tokenizer, PROMPTS, reuse_system_cache=True, merge_system_and_user=True)
    with pytest.raises(ValueError, match="attention must be"):
        GenerationSettings(attention="bidirectional")


@pytest.mark.slow
def test_compiled_decode_equals_eager_decode(model, llama3_tokenizer):
    """The compiled decode step (static shapes, full-width mask) gives the eager tokens."""
    eager = mas.generate(model, llama3_tokenizer, PROMPTS, max_new_tokens=10, max_cache_len=128)
    compiled = mas.generate(model, llama3_tokenizer, PROMPTS, max_new_tokens=10, max_cache_len=128, compile_decode=True)
    assert compiled.tokens == eager.tokens


# ---------------------------------------------------------------------------------------------
# The system prefix comes from the builder's spans; masks come from the one entry point.
# ---------------------------------------------------------------------------------------------


def _scan_system_prefix(seq: SegmentedSequence):
    """The old definition, kept as the twin: the leading run of segment 0, if tokens follow."""
    n = 0
    while n < len(seq) and seq.segment_ids[n] == 0:
        n += 1
    if n == 0 or n == len(seq):
        return None
    return seq.tokens[:n], seq.labels[:n], seq.segment_ids[:n]


SYSTEM_PROMPTS = [p for p in PROMPTS if "system" in p] + [
    {"system": "S " * 40, "user": "short"},
    {"messages": [{"role": "system", "content": "Two turns."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Again?"}]},
]


@pytest.mark.parametrize("prompt_format", ["text", "chat"])
def test_system_prefix_from_spans_equals_the_scan(llama3_tokenizer, prompt_format):
    from mas.generation import system_prefix

    builder = SegmentBuilder(llama3_tokenizer, prompt_format=prompt_format)
    for i, prompt in enumerate(SYSTEM_PROMPTS):
        seq = builder(mas.generation.prompt_messages(prompt, i), for_generation=True)
        prefix = system_prefix(seq)
        assert prefix is not None
        assert (prefix.tokens, prefix.labels, prefix.segment_ids) == _scan_system_prefix(seq)
        assert [(s.role, s.start, s.end) for s in prefix.spans] == [("system", 0, len(prefix))]


def test_system_prefix_needs_a_system_message_of_its_own(llama3_tokenizer):
    from mas.generation import system_prefix

    messages = mas.generation.prompt_messages({"system": "Be brief.", "user": "Hi"})
    merged = SegmentBuilder(llama3_tokenizer, prompt_format="chat", merge_system_and_user=True)(messages, for_generation=True)
    assert system_prefix(merged) is None  # the system tokens see the user turn: not cacheable alone
    for prompt_format in ("text", "chat"):
        user_only = SegmentBuilder(llama3_tokenizer, prompt_format=prompt_format)(mas.generation.prompt_messages("Hi"), for_generation=True)
        assert system_prefix(user_only) is None
    # The old scan took a chat prompt's user turn for a "system prefix" (a cache entry that no
    # other prompt shares); the spans know it is not one.
    assert _scan_system_prefix(user_only) is not None
    hand_built = SegmentedSequence([1, 2, 3], [IGNORE_INDEX] * 3, [0, 0, 1])
    assert system_prefix(hand_built) is None  # roles not recorded


@pytest.mark.parametrize("attention", ["mas", "causal"])
def test_prefill_and_decode_masks_are_the_entry_points(llama3_tokenizer, monkeypatch, attention):
    """prefill asks build_attention_mask for its window; each decode step's mask is the row of
    build_attention_mask for that query over the cache (generated tokens are CAUSAL)."""
    import mas.generation._decoding as decoding
    from mas.attention import build_attention_mask

    builder = SegmentBuilder(llama3_tokenizer)
    seqs = [builder(mas.generation.prompt_messages(p, i), for_generation=True) for i, p in enumerate(PROMPTS[:3])]
    batch = layout_prompts(seqs, pad_id=0)
    calls, vocab = [], 7

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return build_attention_mask(*args, **kwargs)

    class FakeModel(torch.nn.Module):
        def forward(self, tokens, mask, input_pos=None):
            self.mask = mask
            return torch.zeros(tokens.shape[0], tokens.shape[1], vocab)

    monkeypatch.setattr(decoding, "build_attention_mask", spy)
    model = FakeModel()
    prefill(model, batch, attention=attention, backend="sdpa")
    assert calls == [dict(attention=attention, backend="sdpa", query_start=0, query_len=batch.num_slots, compile_block_tables=False)]
    assert torch.equal(model.mask, build_attention_mask(batch.segment_ids, attention=attention, backend="sdpa"))

    cache_len = batch.num_slots + 5
    state = DecodeState.after_prefill(batch, cache_len)
    cache_segments = torch.full((len(seqs), cache_len), mas.PAD)
    cache_segments[:, : batch.num_slots] = batch.segment_ids
    for step in range(5):
        slot = batch.num_slots + step
        decode_one_token(model, torch.zeros(len(seqs), dtype=torch.long), state)
        cache_segments[:, slot] = CAUSAL
        expected = build_attention_mask(cache_segments[:, : slot + 1], attention=attention, backend="sdpa", query_start=slot, query_len=1)
        assert torch.equal(model.mask, expected)
