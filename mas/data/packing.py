"""Pack MAS examples into fixed-length sequences, combining the document mask with MAS.

Examples are placed greedily in order and never split across packs. Inside a pack each example
is one document: ``document_ids`` stop attention across examples, ``input_pos`` restarts at 0
for each example (RoPE positions as if it were alone), and segment ids are offset so that no two
examples share a prompt-segment id. The tail is padding (``PAD``, a document of its own).

Every pack is exactly ``pack_length`` tokens long, so a packed run sees one batch shape (one
compiled graph, one FlexAttention kernel): the bucketing is "one bucket". The attention rule
inside a pack is MAS AND same document, so a pack of eight examples trains each example exactly
as a batch of eight would (``tests/unit/data/test_packing.py`` checks the per-example losses)::

    pack = [ s0 s0 a a | s1 a a | pad ]        (s: prompt segment, a: answer, two documents)

          s0 s0 a  a  s1 a  a  pad
    s0  [ 1  1  0  0  0  0  0  0 ]
    s0  [ 1  1  0  0  0  0  0  0 ]
    a   [ 1  1  1  0  0  0  0  0 ]
    a   [ 1  1  1  1  0  0  0  0 ]
    s1  [ 0  0  0  0  1  0  0  0 ]
    a   [ 0  0  0  0  1  1  0  0 ]
    a   [ 0  0  0  0  1  1  1  0 ]
    pad [ 0  0  0  0  0  0  0  0 ]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

from mas.masks import PAD
from mas.segments import IGNORE_INDEX, SegmentedSequence

__all__ = ["PackingStats", "pack_sequences", "packing_stats"]


def _empty_pack() -> Dict[str, List[int]]:
    return {"tokens": [], "labels": [], "segment_ids": [], "document_ids": [], "input_pos": []}


def pack_sequences(
    sequences: Sequence[SegmentedSequence], pack_length: int, pad_id: int = 0
) -> List[Dict[str, List[int]]]:
    """Greedy in-order packing of whole examples.

    Args:
        sequences (Sequence[SegmentedSequence]): examples, each at most ``pack_length`` long.
        pack_length (int): tokens per pack (e.g. 1024-4096; a multiple of 128 keeps whole
            FlexAttention tiles).
        pad_id (int): token id of the padding tail.

    Returns:
        List[Dict[str, List[int]]]: packs of exactly ``pack_length`` tokens with keys
        ``tokens``, ``labels``, ``segment_ids``, ``document_ids``, ``input_pos``.

    Raises:
        ValueError: if an example is longer than ``pack_length``.
    """
    packs: List[Dict[str, List[int]]] = []
    pack = _empty_pack()
    documents = 0
    next_segment = 0

    def close(current: Dict[str, List[int]], documents: int) -> None:
        fill = pack_length - len(current["tokens"])
        current["tokens"] += [pad_id] * fill
        current["labels"] += [IGNORE_INDEX] * fill
        current["segment_ids"] += [PAD] * fill
        current["document_ids"] += [documents] * fill
        current["input_pos"] += list(range(fill))
        packs.append(current)

    for index, sequence in enumerate(sequences):
        n = len(sequence)
        if n > pack_length:
            raise ValueError(f"example {index} has {n} tokens > pack length {pack_length}")
        if len(pack["tokens"]) + n > pack_length:
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


@dataclass(frozen=True)
class PackingStats:
    """How full the packs are.

    Attributes:
        packs (int): number of packs.
        examples (int): examples in them.
        real_tokens (int): non-padding tokens.
        fill (float): ``real_tokens / (packs * pack_length)``.
    """

    packs: int
    examples: int
    real_tokens: int
    fill: float


def packing_stats(packs: Sequence[Dict[str, List[int]]]) -> PackingStats:
    """Count packs, examples and real tokens (for logs and benchmarks)."""
    slots = sum(len(p["tokens"]) for p in packs)
    real = sum(sum(1 for s in p["segment_ids"] if s != PAD) for p in packs)
    examples = sum(len({d for d, s in zip(p["document_ids"], p["segment_ids"]) if s != PAD}) for p in packs)
    return PackingStats(len(packs), examples, real, real / slots if slots else 0.0)
