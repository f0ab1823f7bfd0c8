"""Pack MAS examples into fixed-length sequences, combining the document mask with MAS.

Examples are placed greedily in order and never split across packs. Inside a pack each example
is one document: ``document_ids`` stop attention across examples, ``input_pos`` restarts at 0
for each example (RoPE positions as if it were alone), and segment ids are offset so that no two
examples share a prompt-segment id. The tail is padding (``PAD``, its own document).
"""

from __future__ import annotations

from typing import Dict, List, Sequence

from mas.masks import PAD
from mas.segments import IGNORE_INDEX, SegmentedSequence

__all__ = ["pack_sequences"]


def _empty_pack() -> Dict[str, List[int]]:
    return {"tokens": [], "labels": [], "segment_ids": [], "document_ids": [], "input_pos": []}


def pack_sequences(
    sequences: Sequence[SegmentedSequence], max_seq_len: int, pad_id: int = 0
) -> List[Dict[str, List[int]]]:
    """Greedy in-order packing.

    Args:
        sequences (Sequence[SegmentedSequence]): examples, each at most ``max_seq_len`` long.
        max_seq_len (int): pack length.
        pad_id (int): token id of the padding tail.

    Returns:
        List[Dict[str, List[int]]]: packs of exactly ``max_seq_len`` tokens with keys
        ``tokens``, ``labels``, ``segment_ids``, ``document_ids``, ``input_pos``.

    Raises:
        ValueError: if an example is longer than ``max_seq_len``.
    """
    packs: List[Dict[str, List[int]]] = []
    pack = _empty_pack()
    documents = 0
    next_segment = 0

    def close(current: Dict[str, List[int]], documents: int) -> None:
        fill = max_seq_len - len(current["tokens"])
        current["tokens"] += [pad_id] * fill
        current["labels"] += [IGNORE_INDEX] * fill
        current["segment_ids"] += [PAD] * fill
        current["document_ids"] += [documents] * fill
        current["input_pos"] += list(range(fill))
        packs.append(current)

    for index, sequence in enumerate(sequences):
        n = len(sequence)
        if n > max_seq_len:
            raise ValueError(f"example {index} has {n} tokens > pack length {max_seq_len}")
        if len(pack["tokens"]) + n > max_seq_len:
            close(pack, documents)
            pack, documents, next_segment = _empty_pack(), 0, 0
        offset = next_segment
        segments = [s + offset if s >= 0 else s for s in sequence.segment_ids]
        next_segment = max([s + 1 for s in segments if s >= 0], default=next_segment)
        pack["tokens"] += sequence.tokens
        pack["labels"] += sequence.labels
        pack["segment_ids"] += segments
        pack["document_ids"] += [documents] * n
        pack["input_pos"] += list(range(n))
        documents += 1
    if pack["tokens"]:
        close(pack, documents)
    return packs
