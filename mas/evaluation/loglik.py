"""Log-likelihood scoring: how likely is each candidate answer after the prompt?

A candidate is scored exactly as training would see it: the prompt segments (MAS or causal)
followed by the answer tokens, causal. The score is the sum of the answer tokens' log
probabilities (no end-of-sequence token), one forward pass per batch of candidates; nothing is
generated, so there is no answer to extract and no extraction failure.

Only the positions that predict an answer token are projected to the vocabulary (the
training loss's mechanism, :func:`mas.lm_head.logits_at_positions`): ~7 rows per candidate instead of an fp32
``[b, s, vocab]`` log-softmax (1.7 GiB per batch of 16 at Llama 3's vocabulary). The full-logits
path is the slow twin (tests/unit/evaluation/test_loglik.py; tools/bench_scoring.py times both).
"""

from __future__ import annotations

import math
from typing import Any, List, Sequence

import torch
from torch import Tensor, nn

from mas.attention import build_attention_mask, prefill_tile
from mas.block_mask import round_up_to_tile
from mas.data.collate import collate_segmented
from mas.lm_head import has_unembed, logits_at_positions
from mas.segments import SegmentedSequence, counts_as_target

__all__ = ["answer_logprobs", "drop_final_eos"]


def drop_final_eos(sequence: SegmentedSequence, eos_id: int | None) -> SegmentedSequence:
    """The sequence without its trailing EOS (a candidate answer is scored without it)."""
    if eos_id is not None and sequence.tokens and sequence.tokens[-1] == eos_id:
        return sequence.head(len(sequence) - 1)
    return sequence


@torch.inference_mode()
def answer_logprobs(
    model: nn.Module,
    sequences: Sequence[SegmentedSequence],
    *,
    attention: str = "mas",
    backend: str = "auto",
    batch_size: int = 16,
    head_on_answers_only: bool = True,
) -> List[float]:
    """Sum of log p(answer token | everything before) over each sequence's causal answer part.

    Args:
        model (nn.Module): a torchtune decoder with MAS attention, without KV caches.
        sequences (Sequence[SegmentedSequence]): prompt + answer, answer tokens ``CAUSAL``.
        attention (str): ``"mas"`` or ``"causal"`` for the prompt.
        backend (str): attention backend.
        batch_size (int): sequences per forward pass.
        head_on_answers_only (bool): run the LM head and the softmax only at the positions
            that predict an answer token (a torchtune decoder's ``unembed`` step); False: over
            every position (the slow twin, equal within float rounding).

    Returns:
        List[float]: one score per sequence.

    Raises:
        ValueError: a sequence without answer tokens.
    """
    device = model.tok_embeddings.weight.device
    scores: List[float] = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        for i, seq in enumerate(chunk):
            if not any(counts_as_target(s) for s in seq.segment_ids):
                raise ValueError(f"sequence {start + i} has no answer tokens to score")
        # Where compiled FlexAttention runs, lengths in tiles: a few compiled shapes, not one per
        # batch; never past the model's positions (torchtune refuses longer inputs).
        multiple = prefill_tile(backend, device) or None  # type: ignore[arg-type]
        longest = max(len(s) for s in chunk)
        if multiple and round_up_to_tile(longest, tile=multiple) > getattr(model, "max_seq_len", math.inf):
            multiple = None
        items = [{"tokens": s.tokens, "labels": s.labels, "segment_ids": s.segment_ids} for s in chunk]
        batch = collate_segmented(items, pad_to_multiple_of=multiple)
        mask = build_attention_mask(batch["segment_ids"].to(device), attention=attention, backend=backend)
        score = _scores_on_answer_rows if head_on_answers_only and has_unembed(model) else _scores_on_full_logits
        scores.extend(score(model, batch["tokens"], batch["segment_ids"], mask).tolist())
    return scores


def _scores_on_answer_rows(model: nn.Module, tokens: Tensor, segment_ids: Tensor, mask: Any) -> Tensor:
    """Per row, the summed log-probability of its answer tokens, with the LM head and the
    softmax only at the positions that predict one (a few per row instead of ``[b, s, vocab]``).

    Args:
        model (nn.Module): a torchtune decoder (:func:`mas.lm_head.has_unembed`).
        tokens (Tensor), segment_ids (Tensor): ``[b, s]`` CPU batch.
        mask: the batch's attention mask, on the model's device.

    Returns:
        Tensor: ``[b]`` CPU float scores.
    """
    # Position i predicts token i + 1: the rows whose next token is an answer token.
    row, position = counts_as_target(segment_ids[:, 1:]).nonzero(as_tuple=True)  # [n] each
    device = model.tok_embeddings.weight.device
    logits = logits_at_positions(model, tokens.to(device), row.to(device), position.to(device), mask=mask)
    targets = tokens[row, position + 1].to(device)
    picked = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)  # [n]
    return torch.zeros(tokens.shape[0], dtype=picked.dtype).index_add_(0, row, picked.cpu())


def _scores_on_full_logits(model: nn.Module, tokens: Tensor, segment_ids: Tensor, mask: Any) -> Tensor:
    """:func:`_scores_on_answer_rows` over the full ``[b, s, vocab]`` logits: the slow twin (and
    the path of a model without torchtune's ``unembed`` step)."""
    device = model.tok_embeddings.weight.device
    tokens = tokens.to(device)
    logits = model(tokens, mask=mask)
    if isinstance(logits, list):
        logits = torch.cat(logits, dim=1)
    # Position i predicts token i + 1: [b, s - 1, vocab] vs [b, s - 1].
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logprobs.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    is_answer = counts_as_target(segment_ids[:, 1:]).to(device)
    return (picked * is_answer).sum(-1).cpu()
