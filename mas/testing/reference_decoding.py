"""The slow, obviously correct twins of the inference engine: the tests' oracles.

- :func:`reference_generate`: one sequence, one token at a time, every step a full forward of
  the whole sequence without any cache, under the dense Eq. 14 mask of the paper
  (:func:`mas.masks.dense_mas_mask`); generated tokens are ``CAUSAL``. The token choice draws the
  same ``Exp(1)`` noise as the engine (one ``[1, vocab]`` draw per chosen token from the
  sequence's generator), filtered with :func:`reference_filtered_probs`, so greedy *and* seeded
  sampled tokens must equal the engine's.
- :func:`reference_filtered_probs`: one row's distribution with Python-scalar settings, the
  twin of :func:`mas.generation.sampling.filtered_probs` (per-row tensor settings).
- :func:`multinomial_sample`: ``torch.multinomial`` over that distribution, the distributional
  oracle of the engine's exponential-race draw.
- :func:`reference_logprobs`: every position's full ``[vocab]`` log-softmax of one forward of a
  whole sequence (prompt and answer) under the dense mask, the twin of the engine's
  ``logprobs`` and ``prompt_logprobs`` (scored on chosen rows only).

Imported by the tests and tools only; the product never imports :mod:`mas.testing`.
"""

from __future__ import annotations

from collections import Counter
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from mas.generation.sampling import SamplingParams, exponential_noise
from mas.generation.slot_cache import remove_caches
from mas.masks import CAUSAL, AttentionMode, as_causal, dense_mas_mask
from mas.segments import SegmentedSequence

__all__ = ["multinomial_sample", "reference_filtered_probs", "reference_generate", "reference_logits", "reference_logprobs"]


def reference_filtered_probs(logits: Tensor, temperature: float, top_k: Optional[int] = None, top_p: Optional[float] = None) -> Tensor:
    """``[vocab]`` probabilities of one row after temperature, then top-k, then top-p.

    Args:
        logits (Tensor): ``[vocab]`` next-token logits.
        temperature (float): > 0.
        top_k (Optional[int]): keep the ``k`` most likely tokens.
        top_p (Optional[float]): keep the smallest set of most likely tokens whose mass reaches ``p``.
    """
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the tokens ranked above each token
        drop = torch.zeros_like(before, dtype=torch.bool).scatter(-1, order, before >= top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


def multinomial_sample(logits: Tensor, params: SamplingParams, generator: Optional[torch.Generator] = None) -> int:
    """One token of one row drawn with ``torch.multinomial`` (greedy: ``argmax``)."""
    if not params.samples:
        return int(logits.argmax())
    probs = reference_filtered_probs(logits, params.temperature, params.top_k, params.top_p)
    return int(torch.multinomial(probs, 1, generator=generator))


def _whole_sequence_logits(model: nn.Module, tokens: Sequence[int], segment_ids: Sequence[int], attention: AttentionMode) -> Tensor:
    """``[s, vocab]`` logits of one forward of a whole sequence without a cache, under the dense
    Eq. 14 mask (causal: the causal mask)."""
    ids = torch.tensor([list(segment_ids)])
    mask = dense_mas_mask(ids if attention == "mas" else as_causal(ids))
    device = model.tok_embeddings.weight.device
    output = model(torch.tensor([list(tokens)], device=device), mask=mask.to(device))
    output = torch.cat(output, dim=1) if isinstance(output, list) else output
    return output[0]


def reference_logits(model: nn.Module, tokens: Sequence[int], segment_ids: Sequence[int], attention: AttentionMode = "mas") -> Tensor:
    """``[vocab]`` next-token logits of a whole sequence in one forward without a cache, under
    the dense Eq. 14 mask."""
    return _whole_sequence_logits(model, tokens, segment_ids, attention)[-1].float()


def reference_logprobs(model: nn.Module, tokens: Sequence[int], segment_ids: Sequence[int], attention: AttentionMode = "mas") -> Tensor:
    """``[len - 1, vocab]`` fp32: row ``p`` is ``log_softmax`` of the logits that predict token
    ``p + 1``, from one forward of the whole sequence without a cache under the dense Eq. 14 mask
    (the full LM head over every position)."""
    return torch.log_softmax(_whole_sequence_logits(model, tokens, segment_ids, attention)[:-1].float(), dim=-1)


def _penalized(logits: Tensor, prompt_tokens: set, output: Counter, params: SamplingParams) -> Tensor:
    """The penalties of one row, token by token, from a plain ``Counter`` of the output."""
    logits = logits.float().clone()
    for token in range(logits.shape[-1]):
        if token in prompt_tokens or output[token]:
            value = float(logits[token])
            logits[token] = value / params.repetition_penalty if value > 0 else value * params.repetition_penalty
        logits[token] -= params.frequency_penalty * output[token] + params.presence_penalty * (output[token] > 0)
    return logits


@torch.inference_mode()
def reference_generate(
    model: nn.Module,
    prompt: SegmentedSequence,
    params: SamplingParams,
    *,
    attention: AttentionMode = "mas",
    stop_tokens: Sequence[int] = (),
) -> Tuple[List[int], Optional[str]]:
    """Generate for one prompt by recomputing the whole sequence for every token.

    Args:
        model (nn.Module): a torchtune decoder with MAS attention (its caches are removed).
        prompt (SegmentedSequence): the segmented prompt.
        params (SamplingParams): ``max_tokens``, the token choice and ``seed`` (a generator on
            the model's device, as the engine seeds one; None with sampling: the default RNG).
        attention (AttentionMode): the prompt mask.
        stop_tokens (Sequence[int]): the engine's ids that end the sequence (excluded; ignored
            with ``params.ignore_stop_tokens``); ``params.stop_token_ids`` end it too.

    Returns:
        Tuple[List[int], Optional[str]]: the generated ids and ``"stop"`` or ``"length"``.
    """
    remove_caches(model)
    device = model.tok_embeddings.weight.device
    generator = torch.Generator(device=device).manual_seed(params.seed) if params.seed is not None else None
    tokens, segment_ids = list(prompt.tokens), list(prompt.segment_ids)
    stops = set(params.stop_token_ids) | (set() if params.ignore_stop_tokens else set(stop_tokens))
    out: List[int] = []
    while len(out) < params.max_tokens:
        logits = reference_logits(model, tokens, segment_ids, attention)
        if params.penalizes:
            logits = _penalized(logits, set(prompt.tokens), Counter(out), params)
        if len(out) < params.min_tokens:  # no stop token before min_tokens
            for t in stops:
                logits[t] = float("-inf")
        if params.samples:
            noise = exponential_noise((1, logits.shape[-1]), device, generator)[0]
            probs = reference_filtered_probs(logits, params.temperature, params.top_k, params.top_p)
            token = int((probs / noise).argmax())
        else:
            token = int(logits.argmax())
        if token in stops:
            return out, "stop"
        out.append(token)
        tokens.append(token)
        segment_ids.append(CAUSAL)  # generated tokens are causal
    return out, "length"
