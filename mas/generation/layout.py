"""Lay a batch of segmented prompts out in KV-cache slots.

All rows end at the same slot so that decoding writes one slot per step for the whole batch.
Without a shared prefix, rows are left-padded::

    row 0:  [PAD PAD  s  s  u  u  u ]        slots 0..6, positions -, -, 0, 1, 2, 3, 4
    row 1:  [ s   s   u  u  u  u  u ]        positions 0..6

With a shared system prefix (reused from a cache) the prefix occupies slots ``[0, prefix_len)``
in every row and the padding gap sits between it and the rest::

    row 0:  [ s  s  PAD PAD  u  u  u ]       positions 0, 1, -, -, 2, 3, 4
    row 1:  [ s  s   u   u   u  u  u ]

Padding slots have segment id ``PAD`` and are never attended; each token keeps its true
position for RoPE, so the layout does not change any logit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from mas.masks import PAD
from mas.segments import SegmentedSequence

__all__ = ["PromptBatch", "layout_prompts"]


@dataclass
class PromptBatch:
    """A batch of prompts in cache-slot layout.

    Attributes:
        tokens (Tensor): ``[b, P]`` token ids (pad id in padding slots).
        segment_ids (Tensor): ``[b, P]`` (``PAD`` in padding slots).
        positions (Tensor): ``[b, P]`` RoPE positions (0 in padding slots).
        lengths (Tensor): ``[b]`` number of real prompt tokens per row.
        prefix_len (int): slots ``[0, prefix_len)`` hold a shared prefix (0: none).
    """

    tokens: Tensor
    segment_ids: Tensor
    positions: Tensor
    lengths: Tensor
    prefix_len: int = 0

    @property
    def num_slots(self) -> int:
        return self.tokens.shape[1]

    def padded_right(self, num_slots: int, pad_id: int) -> "PromptBatch":
        """The batch with padding slots appended up to ``num_slots`` (a bucketed prefill width).

        Right padding keeps every token at its slot (a slot cache whose slots are positions);
        the padding slots are ``PAD`` (never attended) and their queries' outputs unused.
        """
        extra = num_slots - self.num_slots
        if extra < 0:
            raise ValueError(f"num_slots {num_slots} is shorter than the batch ({self.num_slots} slots)")
        b = self.tokens.shape[0]

        def pad(t: Tensor, value: int) -> Tensor:
            return torch.cat([t, t.new_full((b, extra), value)], dim=1)

        return PromptBatch(pad(self.tokens, pad_id), pad(self.segment_ids, PAD), pad(self.positions, 0), self.lengths, self.prefix_len)

    def to(self, device: torch.device) -> "PromptBatch":
        return PromptBatch(
            self.tokens.to(device),
            self.segment_ids.to(device),
            self.positions.to(device),
            self.lengths.to(device),
            self.prefix_len,
        )


def layout_prompts(
    sequences: Sequence[SegmentedSequence], pad_id: int, prefix_len: int = 0, num_slots: Optional[int] = None
) -> PromptBatch:
    """Place prompts in slots (see module docstring).

    Args:
        sequences (Sequence[SegmentedSequence]): the prompts; with ``prefix_len > 0`` their first
            ``prefix_len`` tokens must be identical.
        pad_id (int): token id for padding slots.
        prefix_len (int): length of the shared prefix to keep at slots ``[0, prefix_len)``.
        num_slots (Optional[int]): slots of the batch, at least the longest prompt (more left
            padding, so compiled prefill sees few shapes); default the longest prompt.

    Returns:
        PromptBatch: the batch on CPU.

    Raises:
        ValueError: an empty prompt, or rows that do not share the prefix.
    """
    for i, seq in enumerate(sequences):
        if len(seq) <= prefix_len:
            raise ValueError(f"prompt {i} has no token after the {prefix_len}-token shared prefix")
        if prefix_len and seq.tokens[:prefix_len] != sequences[0].tokens[:prefix_len]:
            raise ValueError(f"prompt {i} does not start with the shared prefix")
    tails = [len(seq) - prefix_len for seq in sequences]
    width = prefix_len + max(tails)
    if num_slots is not None:
        if num_slots < width:
            raise ValueError(f"num_slots {num_slots} is shorter than the longest prompt ({width} slots)")
        width = num_slots
    b = len(sequences)
    tokens = torch.full((b, width), pad_id, dtype=torch.long)
    segment_ids = torch.full((b, width), PAD, dtype=torch.long)
    positions = torch.zeros((b, width), dtype=torch.long)
    for row, (seq, tail) in enumerate(zip(sequences, tails)):
        slots: List[int] = list(range(prefix_len)) + list(range(width - tail, width))
        tokens[row, slots] = torch.tensor(seq.tokens)
        segment_ids[row, slots] = torch.tensor(seq.segment_ids)
        positions[row, slots] = torch.arange(len(seq))
    lengths = torch.tensor([len(seq) for seq in sequences], dtype=torch.long)
    return PromptBatch(tokens, segment_ids, positions, lengths, prefix_len)
