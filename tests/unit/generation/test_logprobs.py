"""Log-probabilities from the engine against one full forward of the whole sequence without a
cache under the dense mask (:func:`mas.testing.reference_decoding.reference_logprobs`): generated
tokens (first token and decode steps, eager and compiled, greedy and sampled), prompt tokens
(``prompt_logprobs``, chunked prefill included), and a prompt scored with nothing generated."""

from __future__ import annotations

import copy
from typing import List

import pytest
import torch

import mas
from mas import CAUSAL
from mas.evaluation.loglik import answer_logprobs
from mas.generation import GenerationSettings, InferenceEngine, SamplingParams
from mas.generation.logprobs import TokenLogprob
from mas.segments import SegmentBuilder, SegmentedSequence
from mas.testing.reference_decoding import reference_logprobs
from support.models import varied_tiny_model
from torchtune.data import Message

SYSTEM = "Below is an instruction that describes a task."
PROMPTS = [{"system": SYSTEM, "user": "Is ice cold?"}, {"user": "Name a colour, and say why it is your favourite."}, {"system": SYSTEM, "user": "Hi"}]


@pytest.fixture(scope="module")
def model():
    return varied_tiny_model()


def _sequences(tokenizer) -> List[SegmentedSequence]:
    builder = SegmentBuilder(tokenizer)
    return [builder(mas.generation.prompt_messages(p, i), for_generation=True) for i, p in enumerate(PROMPTS)]


def _run(engine, seqs, params):
    requests = [engine.submit(s, p) for s, p in zip(seqs, params)]
    while engine.has_unfinished():
        engine.step()
    return requests


def _check(scores: List[TokenLogprob], expected: torch.Tensor, tokens: List[int], top: int) -> None:
    """Each score equals the twin's row: the token's log-probability and the ``top`` best."""
    assert len(scores) == len(tokens) == expected.shape[0]
    for score, row, token in zip(scores, expected, tokens):
        assert score.token == token
        assert score.logprob == pytest.approx(row[token].item(), abs=1e-4)
        best = row.topk(top)
        assert [i for i, _ in score.top] == best.indices.tolist()
        assert [v for _, v in score.top] == pytest.approx(best.values.tolist(), abs=1e-4)


@pytest.mark.parametrize("attention", ["mas", "causal"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_generated_token_logprobs_equal_a_full_forward(model, llama3_tokenizer, attention, compiled):
    seqs = _sequences(llama3_tokenizer)
    params = [SamplingParams(7, logprobs=3), SamplingParams(5, temperature=1.0, seed=4, logprobs=0), SamplingParams(6)]
    settings = GenerationSettings(attention=attention, batch_size=2, max_cache_len=128, stop_tokens=[], compile_decode=compiled)
    with InferenceEngine(copy.deepcopy(model), settings) as engine:
        requests = _run(engine, seqs, params)
    for request, top in zip(requests[:2], (3, 0)):
        whole = request.prompt.tokens + request.tokens
        ids = request.prompt.segment_ids + [CAUSAL] * len(request.tokens)
        expected = reference_logprobs(model, whole, ids, attention)[len(request.prompt) - 1 :]
        _check(request.logprobs, expected, request.tokens, top)
    assert requests[2].logprobs == []  # not asked for


@pytest.mark.parametrize("chunk", [None, 8], ids=["whole", "chunked"])
def test_prompt_logprobs_equal_a_full_forward_and_skip_the_prefix_cache(model, llama3_tokenizer, chunk):
    seqs = _sequences(llama3_tokenizer)
    settings = GenerationSettings(attention="mas", batch_size=2, max_cache_len=128, stop_tokens=[], reuse_system_cache=True, prefill_chunk_tokens=chunk or 2048)
    with InferenceEngine(copy.deepcopy(model), settings) as engine:
        _run(engine, seqs[:1], [SamplingParams(3)])  # caches the system prompt and this prompt whole
        # A long decode keeps a row busy, so the scored prompt is prefilled in chunks beside it.
        busy = engine.submit(seqs[1], SamplingParams(40))
        scored = engine.submit(seqs[0], SamplingParams(2, prompt_logprobs=2, logprobs=1))
        while engine.has_unfinished():
            engine.step()
    assert busy.finished and scored.cached_tokens == 0
    prompt = scored.prompt
    expected = reference_logprobs(model, prompt.tokens, prompt.segment_ids, "mas")
    _check(scored.prompt_logprobs, expected, prompt.tokens[1:], 2)
    assert len(scored.tokens) == 2 and len(scored.logprobs) == 2


def test_a_prompt_scored_with_nothing_generated_gives_mas_eval_loglik(model, llama3_tokenizer):
    """max_tokens=0: the prompt is prefilled, scored and ends with "length"; the scores of a
    candidate answer (a final causal assistant part) sum to mas_eval's loglik score."""
    builder = SegmentBuilder(llama3_tokenizer)
    messages = [Message("system", SYSTEM, masked=True), Message("user", "Is ice cold?", masked=True), Message("assistant", "Yes, it is.")]
    candidate = builder(messages, for_generation=True)
    answer = [i for i, s in enumerate(candidate.segment_ids) if s == CAUSAL]
    assert answer and answer[-1] == len(candidate) - 1
    settings = GenerationSettings(attention="mas", batch_size=1, max_cache_len=128, stop_tokens=[])
    with InferenceEngine(copy.deepcopy(model), settings) as engine:
        (request,) = _run(engine, [candidate], [SamplingParams(0, prompt_logprobs=0)])
    assert request.finish_reason == "length" and request.tokens == []
    summed = sum(s.logprob for s in request.prompt_logprobs[answer[0] - 1 :])
    (expected,) = answer_logprobs(copy.deepcopy(model), [candidate], attention="mas")
    assert summed == pytest.approx(expected, abs=1e-4)


def test_is_prediction_marks_tokens_their_predicting_position_has_seen():
    from mas.generation.logprobs import is_prediction

    segments = [0, 0, 1, 1, CAUSAL, CAUSAL]
    assert is_prediction(segments, "mas") == [False, True, False, True, True]
    assert is_prediction(segments, "causal") == [True] * 5
    # Against the dense Eq. 14 mask: position p-1 sees token p exactly where it is not a prediction.
    from mas.masks import dense_mas_mask

    mask = dense_mas_mask(torch.tensor([segments]))[0]
    mask = mask.squeeze(0) if mask.dim() == 3 else mask
    assert [not bool(mask[p - 1, p]) for p in range(1, len(segments))] == is_prediction(segments, "mas")


def test_generate_returns_logprobs_when_asked(model, llama3_tokenizer):
    out = mas.generate(copy.deepcopy(model), llama3_tokenizer, PROMPTS[:2], max_new_tokens=4, logprobs=2, stop_tokens=[])
    assert [len(x) for x in out.logprobs] == [len(t) for t in out.tokens] == [4, 4]
    assert all(len(s.top) == 2 and s.top[0][1] >= s.logprob - 1e-6 for row in out.logprobs for s in row)
    assert mas.generate(copy.deepcopy(model), llama3_tokenizer, PROMPTS[:1], max_new_tokens=2).logprobs is None
