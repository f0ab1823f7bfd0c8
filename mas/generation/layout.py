"""Lay prompt chunks out for one prefill forward over the slot cache.

A row holds its sequence at slots ``[0, length)``, slot ``i`` = position ``i``. One prefill
forward takes rows that have written the same number of slots ``start`` (a cached prefix, an
earlier chunk, or nothing) and writes each row's next chunk at ``[start, end_r)``; shorter
chunks are right-padded to the longest (rounded up to a tile where FlexAttention runs)::

    start = 2, chunks of 3 and 5 tokens, 5 query slots:

    row 0:  [ s  s | u  u  u  .  . ]     slots 5, 6: padding queries (segment PAD)
    row 1:  [ s  s | u  u  u  u  u ]

Padding slots are ``PAD`` (never attended) and their queries' outputs unused; their keys and
values land in the row's own unused slots, which the next chunk or generated token overwrites
before anything attends them. Each chunk ends where no earlier token attends a later one
(:func:`chunk_end`), so a chunk's keys and values are final when it is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from mas.masks import PAD, AttentionMode
from mas.generation.prefix_cache import is_cut_point
from mas.segments import SegmentedSequence

__all__ = ["PromptBatch", "chunk_end", "layout_chunks"]


@dataclass
class PromptBatch:
    """Rows of one prefill forward in slot layout.

    Attributes:
        tokens (Tensor): ``[b, P]`` token ids (pad id in padding slots; slots before
            ``prefix_len`` are not read).
        segment_ids (Tensor): ``[b, P]`` segment ids of every key slot (``PAD`` in padding).
        positions (Tensor): ``[b, P]`` RoPE positions (= slots).
        prefix_len (int): slots ``[0, prefix_len)`` are already in the cache; the forward
            runs the queries ``[prefix_len, P)``.
    """

    tokens: Tensor
    segment_ids: Tensor
    positions: Tensor
    prefix_len: int = 0

    @property
    def num_slots(self) -> int:
        return self.tokens.shape[1]

    def to(self, device: torch.device) -> "PromptBatch":
        return PromptBatch(self.tokens.to(device), self.segment_ids.to(device), self.positions.to(device), self.prefix_len)


def layout_chunks(
    sequences: Sequence[SegmentedSequence], ends: Sequence[int], *, start: int, num_slots: Optional[int] = None, pad_id: int = 0
) -> PromptBatch:
    """Rows whose slots ``[0, start)`` are written, each to be filled up to ``ends[i]``.

    Args:
        sequences (Sequence[SegmentedSequence]): each row's whole prompt.
        ends (Sequence[int]): each row's chunk end (``start < end <= len``).
        start (int): slots already written in every row.
        num_slots (Optional[int]): slots of the batch (``>= max(ends)``; more: right padding);
            default ``max(ends)``.
        pad_id (int): token id of padding slots.

    Returns:
        PromptBatch: on the CPU.

    Raises:
        ValueError: an end outside ``(start, len]`` or more ends than ``num_slots``.
    """
    width = max(ends)
    if num_slots is not None:
        if num_slots < width:
            raise ValueError(f"num_slots {num_slots} is shorter than the longest chunk end ({width})")
        width = num_slots
    b = len(sequences)
    tokens = torch.full((b, width), pad_id, dtype=torch.long)
    segment_ids = torch.full((b, width), PAD, dtype=torch.long)
    for row, (seq, end) in enumerate(zip(sequences, ends)):
        if not start < end <= len(seq):
            raise ValueError(f"row {row}: chunk [{start}, {end}) is not inside its {len(seq)}-token prompt")
        tokens[row, :end] = torch.tensor(seq.tokens[:end])
        segment_ids[row, :end] = torch.tensor(seq.segment_ids[:end])
    positions = torch.arange(width).expand(b, width)
    return PromptBatch(tokens, segment_ids, positions, start)


def chunk_end(segment_ids: Sequence[int], start: int, budget: Optional[int], attention: AttentionMode) -> int:
    """Where a prefill chunk starting at ``start`` ends: the whole rest when it fits ``budget``
    tokens, else the last cut point (:func:`~mas.generation.prefix_cache.is_cut_point`) within
    the budget, else the first one after it (a prompt segment is never split: its tokens attend
    to each other).

    Args:
        segment_ids (Sequence[int]): the prompt's segment ids.
        start (int): slots already written.
        budget (Optional[int]): tokens this chunk may take (None: no limit).
        attention (AttentionMode): the prefill's mode (causal: every position is a cut point).

    Returns:
        int: the chunk's end, ``start < end <= len(segment_ids)``.
    """
    length = len(segment_ids)
    if budget is None or length - start <= budget:
        return length
    limit = start + max(budget, 1)
    for end in range(limit, start, -1):
        if is_cut_point(segment_ids, end, attention):
            return end
    for end in range(limit + 1, length):
        if is_cut_point(segment_ids, end, attention):
            return end
    return length
