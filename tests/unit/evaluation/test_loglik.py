"""Tests for mas/evaluation/loglik.py: scores against a forward pass written out by hand."""

from __future__ import annotations

import pytest
import torch

from mas.attention import build_attention_mask, use_mas_attention
from mas.block_mask import FLEX_TILE
from mas.data import instruction_messages
from mas.evaluation.loglik import answer_logprobs, drop_final_eos
from mas.masks import CAUSAL
from mas.models import tiny_llama3_2
from mas.segments import SegmentBuilder, SegmentedSequence


@pytest.fixture(scope="module")
def model():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = tiny_llama3_2()
    return use_mas_attention(m).eval()


def _by_hand(model, seq: SegmentedSequence, attention: str) -> float:
    """One unpadded sequence: sum of log p(token) over the answer (CAUSAL) tokens."""
    tokens, segment_ids = torch.tensor([seq.tokens]), torch.tensor([seq.segment_ids])
    with torch.no_grad():
        logits = model(tokens, mask=build_attention_mask(segment_ids, attention=attention))[0]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return sum(float(logprobs[i - 1, seq.tokens[i]]) for i in range(1, len(seq)) if seq.segment_ids[i] == CAUSAL)


@pytest.mark.parametrize("attention", ["mas", "causal"])
def test_scores_equal_the_hand_written_forward(model, llama3_tokenizer, attention):
    builder = SegmentBuilder(llama3_tokenizer)
    eos = llama3_tokenizer.eos_id
    sequences = [
        drop_final_eos(builder(instruction_messages(question, "", answer)), eos)
        for question, answer in [("Is ice cold?", "true"), ("Which is heavier, a stone or a feather?", "a stone"), ("Hi", "hello there")]
    ]
    # Padding in a batch changes nothing: batch size 2 pads the shorter rows.
    scores = answer_logprobs(model, sequences, attention=attention, batch_size=2)
    expected = [_by_hand(model, seq, attention) for seq in sequences]
    assert scores == pytest.approx(expected, abs=1e-4)
    if attention == "mas":
        assert scores != pytest.approx(answer_logprobs(model, sequences, attention="causal"), abs=1e-4)


@pytest.mark.parametrize("attention", ["mas", "causal"])
def test_head_on_answer_rows_equals_full_logits_and_projects_only_those_rows(model, llama3_tokenizer, attention, monkeypatch):
    """The default scores run the LM head on the positions that predict an answer token only:
    the same scores as over the full ``[b, s, vocab]`` logits, for a fraction of the head."""
    builder = SegmentBuilder(llama3_tokenizer)
    eos = llama3_tokenizer.eos_id
    sequences = [
        drop_final_eos(builder(instruction_messages(q, "", a)), eos)
        for q, a in [("Is ice cold?", "true"), ("Which is heavier, a stone or a feather?", "a stone"), ("Hi", "hello there"), ("2+2?", "4")]
    ]
    full = answer_logprobs(model, sequences, attention=attention, batch_size=3, head_on_answers_only=False)
    projected = []
    real_output = model.output
    monkeypatch.setattr(model, "output", lambda h: projected.append(h.shape[0]) or real_output(h))
    rows = answer_logprobs(model, sequences, attention=attention, batch_size=3)
    assert rows == pytest.approx(full, rel=1e-6)  # fp32 sums in another order
    answer_tokens = [sum(s == CAUSAL for s in seq.segment_ids) for seq in sequences]
    assert projected == [sum(answer_tokens[:3]), answer_tokens[3]]


def test_a_model_without_an_unembed_step_is_scored_on_full_logits(model, llama3_tokenizer):
    class Plain(torch.nn.Module):  # a decoder of another kind: forward only
        def __init__(self, inner):
            super().__init__()
            self.inner, self.tok_embeddings = inner, inner.tok_embeddings

        def forward(self, tokens, mask=None):
            return self.inner(tokens, mask=mask)

    seq = drop_final_eos(SegmentBuilder(llama3_tokenizer)(instruction_messages("Is ice cold?", "", "true")), llama3_tokenizer.eos_id)
    assert answer_logprobs(Plain(model), [seq]) == pytest.approx(answer_logprobs(model, [seq]), rel=1e-6)


def test_drop_final_eos_keeps_the_spans(llama3_tokenizer):
    seq = SegmentBuilder(llama3_tokenizer)(instruction_messages("Is ice cold?", "", "true"))
    dropped = drop_final_eos(seq, llama3_tokenizer.eos_id)
    assert dropped.tokens == seq.tokens[:-1] and dropped.segment_ids == seq.segment_ids[:-1]
    assert [s.role for s in dropped.spans] == [s.role for s in seq.spans]
    assert dropped.spans[-1].end == len(dropped)


def test_a_sequence_without_answer_tokens_is_refused(model):
    with pytest.raises(ValueError, match="sequence 1 has no answer tokens"):
        answer_logprobs(model, [SegmentedSequence([1, 2], [-100, 2], [0, CAUSAL]), SegmentedSequence([1, 2], [-100] * 2, [0, 0])])


def test_flex_tile_padding_never_passes_the_model_positions(monkeypatch):
    """Where flex runs, scoring pads to 128-token tiles, but never past the model's max_seq_len
    (torchtune refuses longer inputs): a 150-token row of a 200-position model is not padded to
    256. The padding decision alone is forced here; the kernel stays dense SDPA."""
    from mas.evaluation import loglik

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        short_model = use_mas_attention(tiny_llama3_2(max_seq_len=200)).eval()
    seq = SegmentedSequence(list(range(1, 151)), [-100] * 140 + list(range(141, 151)), [0] * 140 + [CAUSAL] * 10)
    expected = answer_logprobs(short_model, [seq], backend="sdpa")
    monkeypatch.setattr(loglik, "prefill_tile", lambda backend, device: FLEX_TILE)
    assert answer_logprobs(short_model, [seq], backend="sdpa") == pytest.approx(expected, abs=1e-5)
