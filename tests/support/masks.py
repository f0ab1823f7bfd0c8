"""Independent references and random layouts for the mask tests.

Nothing here calls ``mas``: the references are written from the paper's Eq. 14 (Katz et al.,
arXiv 2412.18487) plus the project's padding and packed-document extension, so a bug in
``mas.masks`` cannot hide in its own reference. The segment-id convention is public and
duplicated here on purpose (``test_masks.py`` checks that it matches ``mas``).

Eq. 14 (MAS): query ``i`` may attend key ``j`` iff ``j <= i`` or ``i`` and ``j`` lie in the
same prompt segment. Extended: key ``j`` is not padding and lies in the document of ``i``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import torch
from hypothesis import strategies as st

#: Segment id of padding (never attended as a key).
PAD_ID = -2
#: Segment id of causal-only tokens (answers, generated tokens).
CAUSAL_ID = -1


@dataclass
class Layout:
    """A batch of per-token ids and the query window to check.

    Attributes:
        segment_ids (np.ndarray): ``[b, s]`` int64.
        document_ids (Optional[np.ndarray]): ``[b, s]`` int64, or None (one document per row).
        query_start (int): key position of query 0.
        query_len (int): number of queries.
    """

    segment_ids: np.ndarray
    document_ids: Optional[np.ndarray]
    query_start: int
    query_len: int

    @property
    def seq_len(self) -> int:
        return self.segment_ids.shape[1]

    def torch_ids(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(segment_ids ``[b, s]``, document_ids ``[b, s]`` or None) as LongTensors."""
        docs = None if self.document_ids is None else torch.from_numpy(self.document_ids)
        return torch.from_numpy(self.segment_ids), docs


# ----------------------------------------------------------------------------------------------
# Eq. 14, twice: element by element (obviously right, slow) and broadcast with numpy (fast).
# ----------------------------------------------------------------------------------------------


def eq14_allowed_loops(
    segment_ids: List[int],
    document_ids: Optional[List[int]] = None,
    query_start: int = 0,
    query_len: Optional[int] = None,
) -> List[List[bool]]:
    """Eq. 14 for one row, one (query, key) pair at a time.

    Args:
        segment_ids (List[int]): ``[s]`` segment id of every position.
        document_ids (Optional[List[int]]): ``[s]`` document id of every position, or None.
        query_start (int): position of query 0.
        query_len (Optional[int]): number of queries; default ``s - query_start``.

    Returns:
        List[List[bool]]: ``[query_len][s]``, True where the query may attend the key.
    """
    seq_len = len(segment_ids)
    if query_len is None:
        query_len = seq_len - query_start
    rows = []
    for query_index in range(query_len):
        i = query_start + query_index
        row = []
        for j in range(seq_len):
            if segment_ids[j] == PAD_ID:
                row.append(False)
            elif document_ids is not None and document_ids[i] != document_ids[j]:
                row.append(False)
            elif j <= i:
                row.append(True)
            else:
                row.append(segment_ids[i] >= 0 and segment_ids[i] == segment_ids[j])
        rows.append(row)
    return rows


def eq14_allowed(layout: Layout) -> np.ndarray:
    """Eq. 14 for a batch, by numpy broadcasting.

    Returns:
        np.ndarray: bool ``[b, query_len, s]``.
    """
    seg = layout.segment_ids
    positions = np.arange(layout.seq_len)
    q_pos = positions[layout.query_start : layout.query_start + layout.query_len]
    q_seg = seg[:, q_pos][:, :, None]  # [b, q, 1]
    k_seg = seg[:, None, :]  # [b, 1, s]
    earlier_or_same = positions[None, None, :] <= q_pos[None, :, None]
    same_prompt_segment = (q_seg >= 0) & (q_seg == k_seg)
    allowed = (k_seg != PAD_ID) & (earlier_or_same | same_prompt_segment)
    if layout.document_ids is not None:
        docs = layout.document_ids
        allowed &= docs[:, q_pos][:, :, None] == docs[:, None, :]
    return allowed


# ----------------------------------------------------------------------------------------------
# Random layouts.
# ----------------------------------------------------------------------------------------------


@st.composite
def _contiguous_row(draw, seq_len: int, packed: bool) -> Tuple[List[int], List[int]]:
    """One row as the data pipeline builds it: per document, prompt segments with increasing
    ids (never reused in the row), each optionally followed by an answer; then padding."""
    n_docs = draw(st.integers(1, 3)) if packed else 1
    segments: List[int] = []
    documents: List[int] = []
    next_segment = 0
    for document in range(n_docs):
        for _ in range(draw(st.integers(1, 5))):
            prompt_len = draw(st.integers(1, 150))
            answer_len = draw(st.integers(0, 60))
            segments += [next_segment] * prompt_len + [CAUSAL_ID] * answer_len
            documents += [document] * (prompt_len + answer_len)
            next_segment += 1
    pad_side = draw(st.sampled_from(["left", "right"]))
    # Mostly rows that are full or nearly so; sometimes mostly padding.
    min_pad = draw(st.one_of(st.just(0), st.integers(0, seq_len // 4), st.integers(0, seq_len)))
    n_real = min(len(segments), seq_len - min_pad)
    segments, documents = segments[:n_real], documents[:n_real]
    n_pad = seq_len - n_real
    # Packing gives the tail padding a document of its own; a plain batch gives it none.
    pad_document = draw(st.sampled_from([n_docs, documents[-1] if documents else 0]))
    if pad_side == "left":
        return [PAD_ID] * n_pad + segments, [0] * n_pad + documents
    return segments + [PAD_ID] * n_pad, documents + [pad_document] * n_pad


@st.composite
def _arbitrary_row(draw, seq_len: int, packed: bool) -> Tuple[List[int], List[int]]:
    """Any ids at all, in any order: the BlockMask must still be exact."""
    segments = draw(st.lists(st.integers(PAD_ID, 3), min_size=seq_len, max_size=seq_len))
    if packed:
        documents = draw(st.lists(st.integers(0, 2), min_size=seq_len, max_size=seq_len))
    else:
        documents = [0] * seq_len
    return segments, documents


@st.composite
def layouts(
    draw,
    max_len: int = 400,
    max_batch: int = 3,
    contiguous: bool = True,
    windows: bool = True,
) -> Layout:
    """Batches of 1..``max_batch`` rows of 1..``max_len`` tokens (rarely a multiple of 128).

    Args:
        max_len (int): longest row.
        max_batch (int): largest batch.
        contiguous (bool): pipeline-like rows; False draws arbitrary ids per token.
        windows (bool): sometimes check a query window (``query_start > 0`` or a short
            ``query_len``), as a KV-cache prefill after a cached prefix does.
    """
    seq_len = draw(st.integers(1, max_len))
    batch_size = draw(st.integers(1, max_batch))
    packed = draw(st.booleans())
    row = _contiguous_row if contiguous else _arbitrary_row
    rows = [draw(row(seq_len, packed)) for _ in range(batch_size)]
    segment_ids = np.array([r[0] for r in rows], dtype=np.int64).reshape(batch_size, seq_len)
    document_ids = np.array([r[1] for r in rows], dtype=np.int64).reshape(batch_size, seq_len)
    query_start, query_len = 0, seq_len
    if windows and draw(st.booleans()):
        query_start = draw(st.integers(0, seq_len - 1))
        query_len = draw(st.integers(1, seq_len - query_start))
    return Layout(segment_ids, document_ids if packed else None, query_start, query_len)


# ----------------------------------------------------------------------------------------------
# BlockMask, read back independently of torch's own helpers.
# ----------------------------------------------------------------------------------------------


def ordered_to_tiles(num_blocks: torch.Tensor, indices: torch.Tensor, n_cols: int) -> np.ndarray:
    """Decode BlockMask's ordered form into a dense tile table.

    Args:
        num_blocks (torch.Tensor): ``[b, h, n_rows]`` how many blocks each row lists.
        indices (torch.Tensor): ``[b, h, n_rows, >= max count]`` block indices, listed first.
        n_cols (int): number of column blocks.

    Returns:
        np.ndarray: bool ``[b, h, n_rows, n_cols]``.

    Raises:
        AssertionError: on an index out of range or listed twice.
    """
    counts = num_blocks.cpu().numpy()
    listed = indices.cpu().numpy()
    tiles = np.zeros(counts.shape + (n_cols,), dtype=bool)
    for b, h, row in np.ndindex(*counts.shape):
        for slot in range(counts[b, h, row]):
            col = listed[b, h, row, slot]
            assert 0 <= col < n_cols, f"block index {col} out of range {n_cols}"
            assert not tiles[b, h, row, col], f"block {col} listed twice in row {row}"
            tiles[b, h, row, col] = True
    return tiles


def block_mask_tiles(block_mask) -> Tuple[np.ndarray, np.ndarray]:
    """(partial tiles, full tiles), each bool ``[b, h, n_q_blocks, n_kv_blocks]``."""
    q_len, kv_len = block_mask.seq_lengths
    q_block, kv_block = block_mask.BLOCK_SIZE
    n_q, n_kv = -(-q_len // q_block), -(-kv_len // kv_block)
    partial = ordered_to_tiles(block_mask.kv_num_blocks, block_mask.kv_indices, n_kv)
    full = ordered_to_tiles(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, n_kv)
    assert partial.shape[-2] == n_q and full.shape[-2] == n_q
    return partial, full


def block_mask_token_view(block_mask) -> np.ndarray:
    """What FlexAttention computes with a BlockMask, token by token.

    A pair is allowed iff its tile is full, or its tile is partial and ``mask_mod`` allows it.

    Returns:
        np.ndarray: bool ``[b, q_len, kv_len]`` (head 0).
    """
    q_len, kv_len = block_mask.seq_lengths
    q_block, kv_block = block_mask.BLOCK_SIZE
    partial, full = block_mask_tiles(block_mask)
    batch_size = partial.shape[0]
    # [b, n_q, n_kv] -> [b, n_q * q_block, n_kv * kv_block] -> [b, q_len, kv_len]
    def to_tokens(tiles: np.ndarray) -> np.ndarray:
        tokens = tiles[:, 0].repeat(q_block, axis=1).repeat(kv_block, axis=2)
        return tokens[:, :q_len, :kv_len]

    b = torch.arange(batch_size)[:, None, None]
    q_idx = torch.arange(q_len)[None, :, None]
    kv_idx = torch.arange(kv_len)[None, None, :]
    mask_mod_value = block_mask.mask_mod(b, torch.tensor(0), q_idx, kv_idx)
    mask_mod_value = mask_mod_value.expand(batch_size, q_len, kv_len).cpu().numpy()
    return to_tokens(full) | (to_tokens(partial) & mask_mod_value)


def true_tiles(allowed: np.ndarray, block_size: int) -> Tuple[np.ndarray, np.ndarray]:
    """Which tiles hold an allowed pair, and which allow every in-range pair.

    Args:
        allowed (np.ndarray): bool ``[b, q_len, kv_len]``.
        block_size (int): tile side.

    Returns:
        Tuple[np.ndarray, np.ndarray]: (nonempty, full), bool ``[b, n_q, n_kv]``.
    """
    batch_size, q_len, kv_len = allowed.shape
    n_q, n_kv = -(-q_len // block_size), -(-kv_len // block_size)
    nonempty = np.zeros((batch_size, n_q, n_kv), dtype=bool)
    full = np.zeros((batch_size, n_q, n_kv), dtype=bool)
    for qb, kb in np.ndindex(n_q, n_kv):
        tile = allowed[:, qb * block_size : (qb + 1) * block_size, kb * block_size : (kb + 1) * block_size]
        nonempty[:, qb, kb] = tile.any(axis=(1, 2))
        full[:, qb, kb] = tile.all(axis=(1, 2))
    return nonempty, full


# ----------------------------------------------------------------------------------------------
# Attention, written out.
# ----------------------------------------------------------------------------------------------


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor
) -> torch.Tensor:
    """Softmax attention by its definition; a query that may attend nothing outputs zeros.

    Differentiable with finite gradients (zero for the empty rows).

    Args:
        q (torch.Tensor): ``[b, h, s_q, d]``.
        k (torch.Tensor): ``[b, h, s_kv, d]``.
        v (torch.Tensor): ``[b, h, s_kv, d]``.
        allowed (torch.Tensor): bool ``[b, s_q, s_kv]``.

    Returns:
        torch.Tensor: ``[b, h, s_q, d]``.
    """
    allowed = allowed[:, None]  # [b, 1, s_q, s_kv]
    row_has_key = allowed.any(-1, keepdim=True)  # [b, 1, s_q, 1]
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~allowed, float("-inf"))
    # Empty rows: softmax over zeros keeps everything finite; the output is zeroed below.
    scores = scores.masked_fill(~row_has_key, 0.0)
    weights = torch.softmax(scores, dim=-1) * row_has_key
    return weights @ v
