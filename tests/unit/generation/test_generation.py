"""Generation (``mas.generate``, the offline driver of the engine): equal to a recompute without
cache, train/inference parity, padding, the prefix cache, the prefill's mask and LM head."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch

import mas
from mas import CAUSAL
from mas.errors import ConfigError
from mas.data import collate_segmented, instruction_messages
from mas.generation import GenerationSettings, SamplingParams, install_slot_caches, layout_chunks, prefill
from mas.generation.decode_loop import decode_mask, forward_one_token
from mas.segments import SegmentBuilder, SegmentedSequence
from mas.testing.reference_decoding import reference_generate
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


def _sequences(tokenizer, prompts=PROMPTS):
    builder = SegmentBuilder(tokenizer)
    return [builder(mas.generation.prompt_messages(p, i), for_generation=True) for i, p in enumerate(prompts)]


@pytest.mark.parametrize("attention", ["mas", "causal"])
def test_generate_equals_a_full_recompute_per_token(model, llama3_tokenizer, attention):
    out = mas.generate(copy.deepcopy(model), llama3_tokenizer, PROMPTS, attention=attention, max_new_tokens=8, batch_size=2, stop_tokens=[])
    for seq, tokens in zip(out.prompts, out.tokens):
        assert tokens == reference_generate(model, seq, SamplingParams(8), attention=attention)[0]


def _slot_prefill(model, seq: SegmentedSequence, start: int = 0, **kwargs):
    """Prefill one prompt into row 0 of freshly installed slot caches (slots [start, len))."""
    batch = layout_chunks([seq], [len(seq)], start=start)
    caches = install_slot_caches(model, 1, 256, torch.float32)
    caches.plan_rows([0], batch.positions[:, start:], batch.num_slots)
    return caches, prefill(model, batch, **kwargs)


def test_training_forward_equals_prefill_plus_teacher_forced_decode(model, llama3_tokenizer):
    builder = SegmentBuilder(llama3_tokenizer)
    train = builder(instruction_messages("Is ice cold?", "", "the correct answer is true"))
    batch = collate_segmented([{"tokens": train.tokens, "labels": train.labels, "segment_ids": train.segment_ids}])
    prepared = prepare_batch(batch, attention="mas", device=torch.device("cpu"))
    with torch.no_grad():
        train_logits = model(prepared.tokens, **prepared.model_kwargs())[0]  # [s, vocab]
    prompt_len = train.segment_ids.index(CAUSAL)
    prompt = SegmentedSequence(train.tokens[:prompt_len], train.labels[:prompt_len], train.segment_ids[:prompt_len])
    with torch.no_grad():
        caches, logits = _slot_prefill(model, prompt)
        infer = [logits[0]]  # [prompt_len, vocab]
        for slot, token in enumerate(train.tokens[prompt_len:-1], start=prompt_len):
            slots = torch.tensor([slot])
            caches.plan_decode(slots, slot + 1)
            infer.append(forward_one_token(model, torch.tensor([[token]]), decode_mask(slots, torch.tensor([True]), slot + 1), slots[:, None]))
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


def test_prefix_cache_is_exact_and_prefills_a_shared_system_prompt_once(model, llama3_tokenizer):
    shared = "Below is an instruction that describes a task."
    prompts = [{"system": shared, "user": f"Question {i}: " + "why " * i} for i in range(1, 6)]
    prompts.append({"system": "Another system prompt.", "user": "Hi"})
    plain = mas.generate(copy.deepcopy(model), llama3_tokenizer, prompts, max_new_tokens=8, batch_size=3)
    cached = mas.generate(copy.deepcopy(model), llama3_tokenizer, prompts, max_new_tokens=8, batch_size=3, reuse_system_cache=True)
    assert cached.tokens == plain.tokens
    system_len = cached.prompts[0].spans[0].end
    # The first of the five prefilled the shared system prompt; the other four copied it.
    assert cached.system_cache_hits == 4 and cached.cached_prompt_tokens == 4 * system_len


@pytest.mark.parametrize("start", [0, 1])
def test_prefill_logits_at_chosen_slots_equal_the_full_logits(model, llama3_tokenizer, monkeypatch, start):
    """``logits_at`` runs the LM head on one slot per row, giving those rows of the full logits
    (after a cached prefix too); a model without torchtune's unembed takes the full path."""
    prefill_module = importlib.import_module("mas.generation.prefill")

    seq = _sequences(llama3_tokenizer)[1]
    start = seq.spans[0].end if start else 0
    width = len(seq) - start
    chosen = torch.tensor([width - 1])

    def run(**kwargs):
        with torch.no_grad():
            if start:  # the cache must hold the prefix: prefill it first
                caches, _ = _slot_prefill(model, seq.head(start))
                batch = layout_chunks([seq], [len(seq)], start=start)
                caches.plan_rows([0], batch.positions[:, start:], batch.num_slots)
                return prefill(model, batch, **kwargs)
            return _slot_prefill(model, seq, **kwargs)[1]

    full = run()
    projected = []
    real_output = model.output
    monkeypatch.setattr(model, "output", lambda h: projected.append(h.shape[0]) or real_output(h))
    picked = run(logits_at=chosen)
    assert projected[-1] == 1  # one slot reached the head
    torch.testing.assert_close(picked, full[torch.arange(1), chosen].float(), atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(prefill_module, "has_unembed", lambda m: False)
    torch.testing.assert_close(run(logits_at=chosen), full[torch.arange(1), chosen].float())


@pytest.mark.parametrize("bucket", [16, 64])
def test_prefill_padded_to_a_tile_gives_the_same_tokens(model, llama3_tokenizer, monkeypatch, bucket):
    """Every prefill right-padded to a tile (as where flex runs): the same tokens, cold and after
    a prefix-cache hit, and every prefill really ran at a tile multiple."""
    import mas.generation.engine as engine_module
    from mas.generation import InferenceEngine

    widths = []
    real_prefill = engine_module.prefill
    monkeypatch.setattr(engine_module, "prefill", lambda m, batch, **kw: widths.append(batch.num_slots - batch.prefix_len) or real_prefill(m, batch, **kw))
    seqs = _sequences(llama3_tokenizer)
    settings = GenerationSettings(batch_size=2, max_cache_len=256, reuse_system_cache=True, max_new_tokens=8)
    expected = mas.generate(copy.deepcopy(model), seqs, settings=settings).tokens
    widths.clear()
    with InferenceEngine(copy.deepcopy(model), settings, prefill_bucket=bucket) as engine:
        assert mas.generate(model, seqs, settings=settings, engine=engine).tokens == expected
        assert engine.prefix_cache.stats.hits >= 1
    assert widths and all(w % bucket == 0 for w in widths), widths
    assert any(len(s) % bucket for s in seqs)  # some prompts really were padded


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
    with pytest.raises(ValueError, match=r"prompt 0: .*max_tokens \(30\) = .* > the 64-slot KV cache"):
        mas.generate(model, llama3_tokenizer, ["word " * 40], max_new_tokens=30, max_cache_len=64)
    with pytest.raises(ValueError, match=r"max_cache_len 4096 is more than the model's max_seq_len \d+"):
        mas.generate(model, llama3_tokenizer, ["hi"], max_cache_len=4096)
    with pytest.raises(ValueError, match="attention must be"):
        GenerationSettings(attention="bidirectional")
    with pytest.raises(ConfigError, match="compile_mode must be one of"):
        GenerationSettings(compile_mode="fastest")
    with pytest.raises(ConfigError, match="stop_check_every"):
        GenerationSettings(stop_check_every=0)
    with pytest.raises(ConfigError, match="top_p"):
        GenerationSettings(temperature=1.0, top_p=0.0)


def test_merged_system_and_user_generates_and_reuses_nothing_before_the_user_turn_end(model, llama3_tokenizer):
    """One policy: a merged prompt segment is no error; the prefix cache simply finds no cut point
    before the end of the merged segment."""
    kwargs = dict(max_new_tokens=6, batch_size=2, reuse_system_cache=True, merge_system_and_user=True)
    out = mas.generate(copy.deepcopy(model), llama3_tokenizer, PROMPTS[:2], **kwargs)
    assert out.system_cache_hits == 0
    assert out.tokens == mas.generate(copy.deepcopy(model), llama3_tokenizer, PROMPTS[:2], **{**kwargs, "reuse_system_cache": False}).tokens


def test_seeded_prompts_draw_what_they_draw_alone(model, llama3_tokenizer):
    """Prompt i of a seeded call samples from seed + i: the same tokens as alone with that seed,
    whatever the batch size; identical prompts get different draws."""
    sampling = dict(max_new_tokens=8, temperature=1.0, top_k=20, stop_tokens=[])
    batched = mas.generate(copy.deepcopy(model), llama3_tokenizer, PROMPTS + PROMPTS[:1], batch_size=3, seed=11, **sampling).tokens
    for i, prompt in enumerate(PROMPTS + PROMPTS[:1]):
        assert batched[i] == mas.generate(copy.deepcopy(model), llama3_tokenizer, [prompt], batch_size=1, seed=11 + i, **sampling).tokens[0]
    assert batched[0] != batched[-1]


@pytest.mark.parametrize("attention", ["mas", "causal"])
def test_prefill_asks_the_one_mask_entry_point(llama3_tokenizer, monkeypatch, attention):
    """prefill asks build_attention_mask for its query window and hands that mask to the model."""
    prefill_module = importlib.import_module("mas.generation.prefill")
    from mas.attention import build_attention_mask

    seqs = _sequences(llama3_tokenizer)[:3]
    start = 2
    batch = layout_chunks(seqs, [len(s) for s in seqs], start=start)
    calls, vocab = [], 7

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return build_attention_mask(*args, **kwargs)

    class FakeModel(torch.nn.Module):
        def forward(self, tokens, mask, input_pos=None):
            self.mask = mask
            return torch.zeros(tokens.shape[0], tokens.shape[1], vocab)

    monkeypatch.setattr(prefill_module, "build_attention_mask", spy)
    model = FakeModel()
    prefill(model, batch, attention=attention, backend="sdpa")
    assert calls == [dict(attention=attention, backend="sdpa", query_start=start, query_len=batch.num_slots - start, compile_block_tables=False)]
    expected = build_attention_mask(batch.segment_ids, attention=attention, backend="sdpa", query_start=start, query_len=batch.num_slots - start)
    assert torch.equal(model.mask, expected)
