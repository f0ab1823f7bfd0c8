"""Build the MAS FlexAttention ``BlockMask`` directly from per-block segment summaries.

``torch.nn.attention.flex_attention.create_block_mask`` evaluates the ``mask_mod`` on every
(query, key) pair to classify 128 x 128 tiles as empty, partial or full: ``O(s^2)`` work per
step (about 10 ms compiled, 84 ms eager at 8 x 1024 on a CPU). MAS segments are intervals, so a
tile's class follows from a handful of per-block minima and maxima (``O(s)`` work, no
``[s, s]`` tensor). The classification is conservative where it cannot be exact:

- a tile marked *empty* has no allowed pair (never wrong);
- a tile marked *full* has every pair allowed (never wrong);
- anything else is *partial*, and FlexAttention evaluates the exact ``mask_mod`` inside it.

So the result is exact for any ids; for the layouts the data pipeline produces (contiguous,
increasing segment ids) it is also as sparse as the ``create_block_mask`` result, which the
tests check against Eq. 14 and against ``create_block_mask`` itself.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

from mas.compile_budget import CompiledWithBudget, compile_with_budget
from mas.masks import PAD, mas_mask_mod

__all__ = ["FLEX_TILE", "create_mas_block_mask", "create_mas_block_mask_reference", "round_up_to_tile"]

#: FlexAttention's tile (the default ``block_size``). Callers whose lengths vary pad them to a
#: multiple of it where flex runs, so the compiled kernel sees few shapes.
FLEX_TILE = 128


def round_up_to_tile(end: int, *, start: int = 0, tile: int = FLEX_TILE, limit: Optional[int] = None) -> int:
    """The end of ``[start, end)`` rounded up so that its length is a multiple of ``tile``.

    The one rounding of every caller that buckets lengths (prefill after a cached prefix, the
    server's prefill, scoring, the training fit check): at most ``limit`` (a cache row, the
    model's positions), but never below ``end``.

    Args:
        end (int): the real end.
        start (int): where the rounded part starts (e.g. after a cached prefix).
        tile (int): the multiple.
        limit (Optional[int]): the largest end allowed.

    Returns:
        int: ``max(end, min(start + ceil((end - start) / tile) * tile, limit))``.
    """
    rounded = start + -(-(end - start) // tile) * tile
    return max(end, rounded if limit is None else min(rounded, limit))

# Sentinels for min/max reductions over blocks that hold no token of the kind asked for.
_BIG = torch.iinfo(torch.int64).max // 4


@dataclass(frozen=True)
class _BlockSummary:
    """Per-block facts, each ``[b, n_blocks]``."""

    doc_min: Tensor
    doc_max: Tensor
    prompt_seg_min: Tensor  # over prompt tokens (segment id >= 0); _BIG when none
    prompt_seg_max: Tensor  # -_BIG when none
    all_one_prompt_segment: Tensor  # bool: every token is in the same prompt segment
    any_real: Tensor  # bool: at least one non-padding token
    all_real: Tensor  # bool: no padding token
    pos_min: Tensor  # first key/query position of the block
    pos_max: Tensor  # last position of the block (clipped to the sequence)


def _pad_to_blocks(x: Tensor, block_size: int, fill: int) -> Tensor:
    # [b, s] -> [b, n_blocks, block_size]
    b, s = x.shape
    n_blocks = -(-s // block_size)
    padded = x.new_full((b, n_blocks * block_size), fill)
    padded[:, :s] = x
    return padded.view(b, n_blocks, block_size)


def _summarize(
    segment_ids: Tensor, document_ids: Tensor, start: int, block_size: int, ignore_padding_docs: bool
) -> _BlockSummary:
    """Summarize ``segment_ids[:, start:]`` in blocks of ``block_size`` tokens."""
    seg = _pad_to_blocks(segment_ids[:, start:], block_size, PAD)
    doc = _pad_to_blocks(document_ids[:, start:], block_size, 0)
    n_tokens = segment_ids.shape[1] - start
    real = seg != PAD
    prompt = seg >= 0
    if ignore_padding_docs:
        # Keys that are padding are never attended, so their document does not matter.
        doc_min = torch.where(real, doc, _BIG).amin(-1)
        doc_max = torch.where(real, doc, -_BIG).amax(-1)
    else:
        # Queries that are padding still attend (for finite outputs), so their document counts.
        in_range = torch.arange(seg.shape[1] * block_size, device=seg.device).view(
            1, seg.shape[1], block_size
        ) < n_tokens
        doc_min = torch.where(in_range, doc, _BIG).amin(-1)
        doc_max = torch.where(in_range, doc, -_BIG).amax(-1)
    prompt_seg_min = torch.where(prompt, seg, _BIG).amin(-1)
    prompt_seg_max = torch.where(prompt, seg, -_BIG).amax(-1)
    n_blocks = seg.shape[1]
    block_start = torch.arange(n_blocks, device=seg.device) * block_size
    return _BlockSummary(
        doc_min=doc_min,
        doc_max=doc_max,
        prompt_seg_min=prompt_seg_min,
        prompt_seg_max=prompt_seg_max,
        all_one_prompt_segment=prompt.all(-1) & (prompt_seg_min == prompt_seg_max),
        any_real=real.any(-1),
        all_real=real.all(-1),
        pos_min=start + block_start,
        pos_max=start + torch.clamp(block_start + block_size, max=n_tokens) - 1,
    )


def _ordered(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """Dense ``[b, h, n_q, n_kv]`` bool block table -> (counts, indices) in BlockMask order."""
    counts = blocks.sum(-1, dtype=torch.int32)
    # Selected blocks first, in increasing order (stable sort of "not selected").
    indices = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    # The kernels index these tables as row-major. argsort keeps the strides of a transposed
    # input, and a transposed q table silently corrupts dK and dV in the CUDA backward.
    return counts.contiguous(), indices.contiguous()


def _block_tables(segment_ids: Tensor, docs: Tensor, query_start: int, query_len: int, block_size: int) -> Tuple[Tensor, ...]:
    """The eight BlockMask tables (kv-major partial/full, then q-major partial/full) of a batch.

    Pure tensor code with static ints, so ``torch.compile`` can fuse it (``compile=True``).
    """
    queries = segment_ids[:, : query_start + query_len]
    q = _summarize(queries, docs[:, : query_start + query_len], query_start, block_size, False)
    k = _summarize(segment_ids, docs, 0, block_size, True)

    # Every tile is a (query block, key block) pair: [b, n_q, n_kv].
    def pair(q_stat: Tensor, k_stat: Tensor) -> tuple[Tensor, Tensor]:
        return q_stat.unsqueeze(-1), k_stat.unsqueeze(-2)

    q_pos_min, k_pos_min = pair(q.pos_min, k.pos_min)
    q_pos_max, k_pos_max = pair(q.pos_max, k.pos_max)
    any_causal = k_pos_min <= q_pos_max
    all_causal = k_pos_max <= q_pos_min

    q_doc_min, k_doc_min = pair(q.doc_min, k.doc_min)
    q_doc_max, k_doc_max = pair(q.doc_max, k.doc_max)
    docs_overlap = (q_doc_min <= k_doc_max) & (k_doc_min <= q_doc_max)
    one_shared_doc = (q_doc_min == q_doc_max) & (k_doc_min == k_doc_max) & (q_doc_min == k_doc_min)

    q_seg_min, k_seg_min = pair(q.prompt_seg_min, k.prompt_seg_min)
    q_seg_max, k_seg_max = pair(q.prompt_seg_max, k.prompt_seg_max)
    prompt_segments_overlap = (q_seg_min <= k_seg_max) & (k_seg_min <= q_seg_max)
    q_one, k_one = pair(q.all_one_prompt_segment, k.all_one_prompt_segment)
    one_shared_prompt_segment = q_one & k_one & (q_seg_min == k_seg_min)

    k_any_real = k.any_real.unsqueeze(-2)
    k_all_real = k.all_real.unsqueeze(-2)
    maybe_any = k_any_real & docs_overlap & (any_causal | prompt_segments_overlap)
    full = k_all_real & one_shared_doc & (all_causal | one_shared_prompt_segment)
    partial = maybe_any & ~full

    # [b, n_q, n_kv] -> [b, 1, n_q, n_kv]: one head, broadcast by FlexAttention.
    partial, full = partial.unsqueeze(1), full.unsqueeze(1)
    kv_num_blocks, kv_indices = _ordered(partial)
    full_kv_num_blocks, full_kv_indices = _ordered(full)
    # The backward pass walks the table by key block; transposing the small dense table here
    # is ~100x cheaper than BlockMask.from_kv_blocks re-deriving it from the ordered form.
    q_num_blocks, q_indices = _ordered(partial.transpose(-1, -2))
    full_q_num_blocks, full_q_indices = _ordered(full.transpose(-1, -2))
    return (
        kv_num_blocks,
        kv_indices,
        full_kv_num_blocks,
        full_kv_indices,
        q_num_blocks,
        q_indices,
        full_q_num_blocks,
        full_q_indices,
    )


#: Compiled block-table signatures per process: one per (batch, length, query window) shape.
#: Training pads to 128-token buckets (32 up to 4,096 tokens); prefill does not compile them.
BLOCK_TABLES_SHAPE_BUDGET = 64


@functools.lru_cache(maxsize=None)
def _compiled_block_tables() -> CompiledWithBudget[Tuple[Tensor, ...]]:
    # Built on first use, not at import: importing mas changes no compiler state.
    return compile_with_budget(
        _block_tables,
        name="BlockMask table builder",
        max_shapes=BLOCK_TABLES_SHAPE_BUDGET,
        fix="pad batches to a multiple of 128 tokens (pad_to_multiple_of: 128), or build masks whose shapes vary with compile_block_tables=False",
    )


def _block_tables_fn(compile: bool) -> Callable[..., Tuple[Tensor, ...]]:
    return _compiled_block_tables() if compile else _block_tables


def create_mas_block_mask(
    segment_ids: Tensor,
    document_ids: Optional[Tensor] = None,
    *,
    query_start: int = 0,
    query_len: Optional[int] = None,
    block_size: int = 128,
    validate: bool = True,
    compile: bool = False,
) -> BlockMask:
    """The MAS ``BlockMask`` for a batch, built from segment boundaries in ``O(s)``.

    Built once per batch and shared by every layer, on the device of ``segment_ids``.

    Args:
        segment_ids (Tensor): ``[b, s]`` segment ids of all key positions (``>= 0`` prompt
            segment, ``CAUSAL``, ``PAD``).
        document_ids (Optional[Tensor]): ``[b, s]`` document ids for packed rows, or None.
        query_start (int): key position of the first query (KV-cache prefill after a cached
            prefix). Default 0.
        query_len (Optional[int]): number of queries; default ``s - query_start``.
        block_size (int): FlexAttention tile size. Default 128.
        validate (bool): check the ids first (a device sync on CUDA); the training loop checks
            its CPU batch instead and passes False.
        compile (bool): build the tables with ``torch.compile`` (one fused graph per shape:
            fewer kernel launches on CUDA, a compile per new shape, at most
            :data:`BLOCK_TABLES_SHAPE_BUDGET` shapes, then a warning and the eager build).

    Returns:
        BlockMask: ``seq_lengths == (query_len, s)``, one head (broadcast over heads).
    """
    batch_size, kv_len = segment_ids.shape
    if query_len is None:
        query_len = kv_len - query_start
    if query_start < 0 or query_len < 1 or query_start + query_len > kv_len:
        raise ValueError(
            f"queries [{query_start}, {query_start + query_len}) exceed the {kv_len} key positions"
        )
    mask_mod = mas_mask_mod(segment_ids, document_ids, query_start=query_start, validate=validate)
    docs = torch.zeros_like(segment_ids) if document_ids is None else document_ids
    tables = _block_tables_fn(compile)(segment_ids.long(), docs.long(), query_start, query_len, block_size)
    (
        kv_num_blocks,
        kv_indices,
        full_kv_num_blocks,
        full_kv_indices,
        q_num_blocks,
        q_indices,
        full_q_num_blocks,
        full_q_indices,
    ) = tables
    return BlockMask(
        seq_lengths=(query_len, kv_len),
        kv_num_blocks=kv_num_blocks,
        kv_indices=kv_indices,
        full_kv_num_blocks=full_kv_num_blocks,
        full_kv_indices=full_kv_indices,
        q_num_blocks=q_num_blocks,
        q_indices=q_indices,
        full_q_num_blocks=full_q_num_blocks,
        full_q_indices=full_q_indices,
        BLOCK_SIZE=(block_size, block_size),
        mask_mod=mask_mod,
    )


def create_mas_block_mask_reference(
    segment_ids: Tensor,
    document_ids: Optional[Tensor] = None,
    *,
    query_start: int = 0,
    query_len: Optional[int] = None,
    block_size: int = 128,
    compile: bool = False,
) -> BlockMask:
    """The same BlockMask through ``create_block_mask`` (``O(s^2)``): the slow twin."""
    batch_size, kv_len = segment_ids.shape
    if query_len is None:
        query_len = kv_len - query_start
    mask_mod = mas_mask_mod(segment_ids, document_ids, query_start=query_start)
    return create_block_mask(
        mask_mod,
        batch_size,
        None,
        query_len,
        kv_len,
        device=segment_ids.device,
        BLOCK_SIZE=block_size,
        _compile=compile,
    )
