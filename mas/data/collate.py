"""Collate MAS examples into padded batches.

Padding is on the right: tokens get the tokenizer's pad id, labels ``IGNORE_INDEX``, segment ids
``PAD`` (never attended), document ids (packed batches) a document of their own. Lengths can be
rounded up to a multiple (``pad_to_multiple_of``) so compiled FlexAttention sees few shapes.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from mas.masks import PAD
from mas.segments import IGNORE_INDEX

__all__ = ["collate_segmented", "pad_token_id"]

_PAD_VALUES = {"labels": IGNORE_INDEX, "segment_ids": PAD}


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, or 0 when it has none (padding is masked out anyway)."""
    pad = getattr(tokenizer, "pad_id", None)
    return 0 if pad is None else int(pad)


def collate_segmented(
    batch: Sequence[Dict[str, List[int]]],
    pad_id: int = 0,
    pad_to_multiple_of: Optional[int] = None,
    pad_to: Optional[int] = None,
) -> Dict[str, Tensor]:
    """Pad a list of examples (or packs) into a batch.

    Args:
        batch (Sequence[Dict[str, List[int]]]): items with ``tokens``, ``labels``,
            ``segment_ids`` and, for packs, ``document_ids`` and ``input_pos``.
        pad_id (int): token id used for padding.
        pad_to_multiple_of (Optional[int]): round the padded length up to this multiple.
        pad_to (Optional[int]): pad to exactly this length (at least the longest item).

    Returns:
        Dict[str, Tensor]: each ``[b, s]`` long tensor.

    Raises:
        ValueError: items whose fields differ in length, or an item longer than ``pad_to``.
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    keys = list(batch[0])
    for i, item in enumerate(batch):
        lengths = {k: len(item[k]) for k in keys}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"batch item {i} has fields of different lengths: {lengths}")
    longest = max(len(item["tokens"]) for item in batch)
    length = longest
    if pad_to is not None:
        if pad_to < longest:
            raise ValueError(f"an item has {longest} tokens > pad_to={pad_to}")
        length = pad_to
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    out: Dict[str, Tensor] = {}
    for key in keys:
        if key == "document_ids":
            # Each row's padding is a document of its own, so it attends to no real token.
            fills = [max(item[key], default=-1) + 1 for item in batch]
        elif key == "input_pos":
            fills = [None] * len(batch)
        else:
            fills = [_PAD_VALUES.get(key, pad_id if key == "tokens" else 0)] * len(batch)
        rows = []
        for item, fill in zip(batch, fills):
            values = list(item[key])
            extra = length - len(values)
            if key == "input_pos":
                start = values[-1] + 1 if values else 0
                values += list(range(start, start + extra))
            else:
                values += [fill] * extra
            rows.append(values)
        out[key] = torch.tensor(rows, dtype=torch.long)
    return out
