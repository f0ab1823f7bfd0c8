"""The real compiled FlexAttention wrapper (``mas.attention._flex``) on CPU, under its budget.

Compiled flex forward works on CPU (about 20 s per new shape here), so this keeps to two
shapes: both run compiled (none uncompiled), equal the dense SDPA twin of the same BlockMask,
and a repeated shape compiles nothing. tests/gpu/test_flex_recompiles_cuda.py runs more shapes
than dynamo's default limit on CUDA; tests/unit/core/test_compile_budget.py checks the budget
itself past that limit with a trivial function.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from mas import attention
from mas.attention import FLEX_SHAPE_BUDGET, block_mask_to_dense
from mas.block_mask import FLEX_TILE, create_mas_block_mask
from mas.compile_budget import CompiledWithBudget

from support.masks import CAUSAL_ID, PAD_ID


def _layout(batch_size: int, seq_len: int) -> torch.Tensor:
    """``[b, s]``: a system and a user segment, a causal answer, right padding per row."""
    seg = torch.full((batch_size, seq_len), CAUSAL_ID)
    for row in range(batch_size):
        seg[row, : 10 + row] = 0
        seg[row, 10 + row : seq_len // 2] = 1
        seg[row, seq_len - 5 * row :] = PAD_ID
    return seg


def _dense_twin(q, k, v, block_mask):
    """SDPA over the BlockMask's dense mask; rows without a key give zeros, as flex does."""
    mask = block_mask_to_dense(block_mask)[:, None]  # [b, 1, q, kv]
    has_key = mask.any(-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | ~has_key)
    return out * has_key


def test_flex_budget_beats_the_default_limit():
    assert FLEX_SHAPE_BUDGET > torch._dynamo.config.recompile_limit
    assert isinstance(attention._compiled_flex(), CompiledWithBudget)
    assert attention._compiled_flex().max_shapes == FLEX_SHAPE_BUDGET


@pytest.mark.slow
@torch.no_grad()
def test_compiled_flex_on_cpu_equals_dense_twin_and_never_recompiles_a_seen_shape():
    torch._dynamo.reset()
    attention._compiled_flex.cache_clear()
    counters.clear()
    try:
        generator = torch.Generator().manual_seed(0)
        # Two (batch, length) shapes, one not a multiple of the 128-token tile.
        for batch_size, seq_len in ((2, 150), (1, 256)):
            seg = _layout(batch_size, seq_len)
            block_mask = create_mas_block_mask(seg)
            q, k, v = (torch.randn(batch_size, 2, seq_len, 16, generator=generator) for _ in range(3))
            out = attention._flex(q, k, v, block_mask)
            torch.testing.assert_close(out, _dense_twin(q, k, v, block_mask), atol=1e-5, rtol=1e-5)
        warm = counters["stats"]["unique_graphs"]
        assert warm >= 2  # each shape compiled (flex's own graphs may add to the count)
        seg = _layout(2, 150)
        block_mask = create_mas_block_mask(seg)  # a new BlockMask and mask_mod closure, same shape
        q, k, v = (torch.randn(2, 2, 150, 16, generator=generator) for _ in range(3))
        torch.testing.assert_close(attention._flex(q, k, v, block_mask), _dense_twin(q, k, v, block_mask), atol=1e-5, rtol=1e-5)
        assert counters["stats"]["unique_graphs"] == warm, "a seen shape recompiled"
        assert attention._compiled_flex().uncompiled_calls == 0
    finally:
        torch._dynamo.reset()
        attention._compiled_flex.cache_clear()


# ---------------------------------------------------------------------------------------------
# Callers whose lengths vary bucket them to the flex tile, so the budget covers their shapes.
# ---------------------------------------------------------------------------------------------


def test_prefill_slots_are_tiles_of_queries_where_flex_runs(monkeypatch, llama3_tokenizer):
    """The engine's prefill rounds its query slots up to the flex tile past the written slots,
    never past the row; without flex it takes the prompts' own length."""
    import importlib

    from mas.generation import GenerationSettings, InferenceEngine, SamplingParams
    from mas.segments import SegmentedSequence
    from support.models import varied_tiny_model

    engine_module = importlib.import_module("mas.generation.engine")
    widths = []
    monkeypatch.setattr(engine_module, "prefill", lambda m, batch, **kw: widths.append((batch.prefix_len, batch.num_slots)) or torch.zeros(batch.tokens.shape[0], 1024))

    def prefill_widths(lengths, max_len, bucket):
        widths.clear()
        with InferenceEngine(varied_tiny_model(), GenerationSettings(batch_size=2, max_cache_len=max_len, stop_tokens=[]), prefill_bucket=bucket) as engine:
            for n in lengths:
                engine.submit(SegmentedSequence(list(range(1, n + 1)), [-100] * n, [0] * n), SamplingParams(1))
            engine.step()
        return widths[:]

    assert prefill_widths([30, 70], 1000, 0) == [(0, 70)]
    assert prefill_widths([30, 70], 1000, FLEX_TILE) == [(0, 128)]
    assert prefill_widths([30, 200], 1000, FLEX_TILE) == [(0, 256)]
    assert prefill_widths([30, 200], 220, FLEX_TILE) == [(0, 220)]  # never past the row


def _flex_query_lengths(monkeypatch):
    """Record the query length of every call of the compiled flex wrapper."""
    seen = []
    real = attention._flex

    def spy(q, k, v, block_mask, enable_gqa=False):
        seen.append(q.shape[-2])
        return real(q, k, v, block_mask, enable_gqa)

    monkeypatch.setattr(attention, "_flex", spy)
    return seen


@pytest.mark.slow
def test_flex_prefill_in_tiles_generates_the_dense_tokens(monkeypatch, llama3_tokenizer):
    """Prompts of different lengths prefill as one tile-sized query length on the flex path, and
    the extra left padding changes no token (dense SDPA with the natural width is the twin)."""
    import mas
    from mas.segments import SegmentBuilder
    from support.models import varied_tiny_model

    builder = SegmentBuilder(llama3_tokenizer)
    prompts = [{"user": "Name a colour."}, {"system": "You are terse.", "user": "Why is the sea salty? Say why, briefly."}]
    seqs = [builder(mas.generation.prompt_messages(p, i), for_generation=True) for i, p in enumerate(prompts)]
    model = varied_tiny_model()
    common = dict(max_new_tokens=6, batch_size=1, stop_tokens=[], max_cache_len=256)
    dense = mas.generate(model, seqs, attention_backend="sdpa", **common)
    seen = _flex_query_lengths(monkeypatch)
    mas.use_mas_attention(model, "flex")  # the kernel choice is the model's; the mask's form follows
    flex = mas.generate(model, seqs, attention_backend="flex", **common)
    assert flex.tokens == dense.tokens
    assert seen and all(n % 128 == 0 for n in seen), seen
    assert attention._compiled_flex().uncompiled_calls == 0


@pytest.mark.slow
def test_flex_scoring_pads_to_tiles_and_equals_dense_scores(monkeypatch, llama3_tokenizer):
    import mas
    from mas.data import instruction_messages
    from mas.evaluation.loglik import answer_logprobs, drop_final_eos
    from mas.segments import SegmentBuilder
    from support.models import varied_tiny_model

    builder = SegmentBuilder(llama3_tokenizer)
    eos = llama3_tokenizer.eos_id
    sequences = [
        drop_final_eos(builder(instruction_messages(question, "", answer)), eos)
        for question, answer in [("Is ice cold?", "true"), ("Which is heavier, a stone or a feather?", "a stone")]
    ]
    model = varied_tiny_model()
    dense = answer_logprobs(model, sequences, backend="sdpa", batch_size=1)
    seen = _flex_query_lengths(monkeypatch)
    mas.use_mas_attention(model, "flex")
    flex = answer_logprobs(model, sequences, backend="flex", batch_size=1)
    assert flex == pytest.approx(dense, abs=1e-3)
    assert seen and set(seen) == {128}, seen  # two batch lengths, one compiled shape
