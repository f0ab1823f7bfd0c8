"""Presence, frequency and repetition penalties, per row, inside the decode step.

The OpenAI/vLLM definitions, applied to the logits before the temperature:

- repetition (``r``, 1: off): a token seen in the prompt or the output has its logit divided by
  ``r`` when positive, multiplied by ``r`` when negative;
- frequency (``f``, 0: off): ``logit -= f * count`` of the token in the output so far;
- presence (``p``, 0: off): ``logit -= p`` for a token that occurs in the output so far.

The state is ``[rows, vocab]``: output counts and the tokens of each row's prompt, kept on the
device and updated inside the step (no host read). The engine makes it on the first request that
asks for a penalty; until then the step does not pay for it. The slow twin is
:func:`mas.testing.reference_decoding.reference_generate` (a Python ``Counter`` per sequence).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["RowPenalties", "apply_penalties"]


@dataclass
class RowPenalties:
    """Each row's penalties and what they count.

    Attributes:
        presence (Tensor), frequency (Tensor), repetition (Tensor): ``[b]`` float32.
        counts (Tensor): ``[b, vocab]`` int32, each token's count in the row's output so far.
        in_prompt (Tensor): ``[b, vocab]`` bool, tokens of the row's prompt.
    """

    presence: Tensor
    frequency: Tensor
    repetition: Tensor
    counts: Tensor
    in_prompt: Tensor

    @classmethod
    def empty(cls, rows: int, vocab: int, device: torch.device) -> "RowPenalties":
        zeros = torch.zeros(rows, dtype=torch.float32, device=device)
        return cls(
            zeros,
            zeros.clone(),
            torch.ones(rows, dtype=torch.float32, device=device),
            torch.zeros((rows, vocab), dtype=torch.int32, device=device),
            torch.zeros((rows, vocab), dtype=torch.bool, device=device),
        )

    def start_rows(self, rows: Sequence[int], params: Sequence, prompts: Sequence[Sequence[int]]) -> None:
        """Rows ``rows`` start a sequence: their settings, their prompt's tokens, no output yet."""
        device = self.counts.device
        index = torch.tensor(list(rows), dtype=torch.long).to(device)
        self.presence[index] = torch.tensor([p.presence_penalty for p in params], dtype=torch.float32).to(device)
        self.frequency[index] = torch.tensor([p.frequency_penalty for p in params], dtype=torch.float32).to(device)
        self.repetition[index] = torch.tensor([p.repetition_penalty for p in params], dtype=torch.float32).to(device)
        self.counts[index] = 0
        self.in_prompt[index] = False
        for row, tokens in zip(rows, prompts):
            self.in_prompt[row, torch.tensor(list(tokens), dtype=torch.long).to(device)] = True

    def gather(self, index: Tensor) -> "RowPenalties":
        """Some rows (``index``: ``[k]`` long), copied."""
        return RowPenalties(self.presence[index], self.frequency[index], self.repetition[index], self.counts[index], self.in_prompt[index])

    def rows(self, lo: int, hi: int) -> "RowPenalties":
        """Rows ``[lo, hi)`` (views: updates reach the whole table)."""
        return RowPenalties(self.presence[lo:hi], self.frequency[lo:hi], self.repetition[lo:hi], self.counts[lo:hi], self.in_prompt[lo:hi])

    def count(self, tokens: Tensor, active: Tensor) -> None:
        """Add each active row's chosen token (``[b]``) to its output counts, in place."""
        self.counts.scatter_add_(1, tokens[:, None], active[:, None].to(self.counts.dtype))


def apply_penalties(logits: Tensor, penalties: RowPenalties) -> Tensor:
    """``[b, vocab]`` logits with each row's penalties applied (see the module docstring)."""
    logits = logits.float()
    seen = penalties.in_prompt | (penalties.counts > 0)
    repetition = penalties.repetition[:, None]
    logits = torch.where(seen, torch.where(logits > 0, logits / repetition, logits * repetition), logits)
    counts = penalties.counts.to(logits.dtype)
    return logits - penalties.frequency[:, None] * counts - penalties.presence[:, None] * (counts > 0).to(logits.dtype)
