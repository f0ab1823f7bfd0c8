"""Log-likelihood scoring: how likely is each candidate answer after the prompt?

A candidate is scored exactly as training would see it: the prompt segments (MAS or causal)
followed by the answer tokens, causal. The score is the sum of the answer tokens' log
probabilities (no end-of-sequence token), one forward pass per batch of candidates; nothing is
generated, so there is no answer to extract and no extraction failure.
"""

from __future__ import annotations

import math
from typing import List, Sequence

import torch
from torch import nn

from mas.attention import build_attention_mask, prefill_tile
from mas.block_mask import round_up_to_tile
from mas.data.collate import collate_segmented
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
) -> List[float]:
    """Sum of log p(answer token | everything before) over each sequence's causal answer part.

    Args:
        model (nn.Module): a torchtune decoder with MAS attention, without KV caches.
        sequences (Sequence[SegmentedSequence]): prompt + answer, answer tokens ``CAUSAL``.
        attention (str): ``"mas"`` or ``"causal"`` for the prompt.
        backend (str): attention backend.
        batch_size (int): sequences per forward pass.

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
        segment_ids = batch["segment_ids"].to(device)
        mask = build_attention_mask(segment_ids, attention=attention, backend=backend)
        tokens = batch["tokens"].to(device)
        logits = model(tokens, mask=mask)
        if isinstance(logits, list):
            logits = torch.cat(logits, dim=1)
        # Position i predicts token i + 1: [b, s - 1, vocab] vs [b, s - 1].
        logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        targets = tokens[:, 1:]
        picked = logprobs.gather(-1, targets[..., None]).squeeze(-1)
        is_answer = counts_as_target(segment_ids[:, 1:])
        scores.extend((picked * is_answer).sum(-1).tolist())
    return scores
