"""Dense-mask SDPA that skips the keys no query of a tile may see (the CPU twin of flex's tile skipping).

Where FlexAttention cannot run (CPU training: no flex backward), attention is
``scaled_dot_product_attention`` over the dense ``[b, q, kv]`` mask, which costs every query
every key. A packed row makes most of that work masked: a 1024-token pack of eight ~130-token
examples lets a query see at most its own example, so ~85% of the score matrix is masked.

:func:`windowed_sdpa` cuts the queries into tiles and gives each tile only the contiguous key
window that some query of the tile may attend (over the whole batch)::

    packed mask (two documents)        query tile 0 -> keys [0, 4)
      segment_ids  = [0 0 1 1 2 2 -1 -1]   query tile 1 -> keys [4, 8)
      document_ids = [0 0 0 0 1 1  1  1]
      k: 0 1 2 3 4 5 6 7
      [1 1 0 0 0 0 0 0]  tile 0
      [1 1 0 0 0 0 0 0]
      [1 1 1 1 0 0 0 0]  (MAS: a prompt segment may reach ahead)
      [1 1 1 1 0 0 0 0]
      [0 0 0 0 1 1 0 0]  tile 1
      [0 0 0 0 1 1 0 0]
      [0 0 0 0 1 1 1 0]
      [0 0 0 0 1 1 1 1]

Keys outside a tile's window are masked for every query of the tile, so leaving them out is
exact: the softmax over the window equals the softmax over the row (tests compare with one SDPA
call over the whole mask, outputs and gradients). When the windows would save little (a padded
batch whose padding queries see every key) one call over the whole mask runs.

Two ways in, both giving an :class:`SdpaMask` that every layer of a forward pass (and their
backward) shares, cached on the mask tensor:

- :func:`windowed_mas_mask` builds a MAS mask on the CPU from the ids: :func:`plan_key_windows`
  cuts the tiles where documents start (about one tile per packed example, a small dynamic
  programme over scores computed plus a per-call cost), and the rule is evaluated only inside
  the windows (the ~85% of a pack's score matrix outside them is never computed). The training
  loader plans on its CPU batch, so the step reads no id. Its slow twin is
  :func:`mas.masks.dense_mas_mask`.
- :func:`sdpa_mask_of` prepares any other dense mask (a caller's own, or one changed in place)
  by reading it: fixed tiles of :data:`QUERY_TILE` queries, each with the key range of its
  ``True`` entries.

Measured side by side by ``tools/bench_training.py`` (its "one SDPA call" variant, BENCHMARKS.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from mas.masks import MaskMod, dense_mas_mask, mas_mask_mod, materialize_mask_mod, validate_segment_ids

__all__ = [
    "MAX_WINDOWED_WORK",
    "QUERY_TILE",
    "MaskTile",
    "SdpaMask",
    "Window",
    "check_key_windows",
    "key_windows",
    "plan_key_windows",
    "prepare_sdpa_mask",
    "sdpa_mask_of",
    "windowed_mas_mask",
    "windowed_sdpa",
]

#: Queries per tile when the windows are read from a mask (:func:`key_windows`): 128 (the flex
#: tile) measured best on CPU for 1024-2048-token packs (32 and 64: less work, more calls).
QUERY_TILE: int = 128

#: Planning from ids: tiles start at multiples of this many queries, or where a document starts.
CUT_STEP: int = 32

#: Planning from ids: the longest tile, in queries.
MAX_TILE: int = 256

#: Planning from ids: what one more SDPA call costs, in score-matrix entries (forward and
#: backward). Measured on the 2-core CPU for the tiny model (4 heads of 16): one call costs about
#: as much as 7,000 scores, so a tile is split where that saves more than 8,192 scores.
CALL_COST: int = 8192

#: Windows are used when they cover at most this fraction of the ``[q, kv]`` score matrix
#: (a causal 1024-token row: 0.56, 1.5x faster; a padded batch: ~1.0, one call).
MAX_WINDOWED_WORK: float = 0.85

#: One query tile and its key window: ``(q_start, q_end, k_start, k_end)``, ends exclusive.
Window = Tuple[int, int, int, int]

_CACHE_ATTRIBUTE = "_mas_sdpa_mask"


@dataclass(frozen=True)
class MaskTile:
    """Queries ``[q_start, q_end)`` against keys ``[k_start, k_end)`` and their SDPA mask.

    Attributes:
        window (Window): ``(q_start, q_end, k_start, k_end)``.
        attn_mask (Tensor): bool ``[b, 1, q_end - q_start, k_end - k_start]``; rows that allow no
            key allow every key of the tile (a finite softmax) and are zeroed afterwards.
    """

    window: Window
    attn_mask: Tensor


@dataclass(frozen=True)
class SdpaMask:
    """A dense mask made ready for SDPA, built once per batch and shared by every layer.

    Attributes:
        tiles (List[MaskTile]): the query tiles in order, covering every query once (one tile
            over the whole mask when windows would not pay).
        row_has_key (Tensor): bool ``[b, 1, q, 1]``: queries that may attend at least one key.
    """

    tiles: List[MaskTile]
    row_has_key: Tensor

    @property
    def windows(self) -> Optional[List[Window]]:
        """The windows, or None for one call over the whole mask."""
        return [tile.window for tile in self.tiles] if len(self.tiles) > 1 else None


def key_windows(mask: Tensor, tile: int = QUERY_TILE) -> List[Window]:
    """For each tile of ``tile`` queries, the smallest key range every allowed key lies in.

    Args:
        mask (Tensor): bool ``[b, q, kv]``, True where a query may attend a key (on the CPU).
        tile (int): queries per tile.

    Returns:
        List[Window]: ``(q_start, q_end, k_start, k_end)`` per tile, covering every query once;
        a tile whose queries allow no key gets the one-key window ``[0, 1)`` (its rows are
        zeroed by the caller).
    """
    _, q_len, kv_len = mask.shape
    n_tiles = math.ceil(q_len / tile)
    if n_tiles < 2:  # one tile: the whole mask, nothing to read (decoding, short rows)
        return [(0, q_len, 0, kv_len)]
    any_query = mask.any(0)  # [q, kv]
    per_tile = F.pad(any_query, (0, 0, 0, n_tiles * tile - q_len)).view(n_tiles, tile, kv_len).any(1)
    key_index = torch.arange(kv_len, device=mask.device)
    first = torch.where(per_tile, key_index, kv_len).amin(1).tolist()
    last = torch.where(per_tile, key_index, -1).amax(1).tolist()
    return [_window(t * tile, min(q_len, (t + 1) * tile), first[t], last[t] + 1) for t in range(n_tiles)]


def _window(q_start: int, q_end: int, k_start: int, k_end: int) -> Window:
    # A tile whose queries see no key gets one key (a finite softmax); its rows are zeroed.
    return (q_start, q_end, k_start, k_end) if k_end > k_start else (q_start, q_end, 0, 1)


def _worth_windows(windows: List[Window], q_len: int, kv_len: int, max_work: float) -> bool:
    if len(windows) < 2:
        return False
    work = sum((q_end - q_start) * (k_end - k_start) for q_start, q_end, k_start, k_end in windows)
    return work <= max_work * q_len * kv_len


def _whole(mask: Tensor) -> SdpaMask:
    row_has_key = mask.any(-1, keepdim=True)  # [b, q, 1]
    _, q_len, kv_len = mask.shape
    tile = MaskTile((0, q_len, 0, kv_len), (mask | ~row_has_key)[:, None])
    return SdpaMask([tile], row_has_key[:, None])


def _from_tiles(windows: List[Window], tile_masks: List[Tensor]) -> SdpaMask:
    """Tiles from each window's bool ``[b, tq, tk]`` mask (every allowed key lies in the window)."""
    has_key = [m.any(-1, keepdim=True) for m in tile_masks]
    tiles = [MaskTile(w, (m | ~h)[:, None]) for w, m, h in zip(windows, tile_masks, has_key)]
    return SdpaMask(tiles, torch.cat(has_key, dim=1)[:, None])


def prepare_sdpa_mask(
    mask: Tensor, *, windowed: bool = True, tile: int = QUERY_TILE, max_work: float = MAX_WINDOWED_WORK
) -> SdpaMask:
    """Turn a dense mask into an :class:`SdpaMask`, planning key windows by reading it.

    Args:
        mask (Tensor): bool ``[b, q, kv]``.
        windowed (bool): plan key windows; only for a CPU mask outside ``torch.compile`` (the
            plan reads the mask on the host). Default True.
        tile (int): queries per tile.
        max_work (float): use windows when they cover at most this fraction of the scores.

    Returns:
        SdpaMask: the SDPA-ready mask, with windows where they save work.
    """
    if windowed and mask.device.type == "cpu" and not torch.compiler.is_compiling():
        windows = key_windows(mask, tile)
        if _worth_windows(windows, mask.shape[1], mask.shape[2], max_work):
            return _from_tiles(windows, [mask[:, q0:q1, k0:k1] for q0, q1, k0, k1 in windows])
    return _whole(mask)


def sdpa_mask_of(mask: Any, dense: Optional[Callable[[], Tensor]] = None) -> SdpaMask:
    """The :class:`SdpaMask` of a mask, cached on it (a dense mask: re-prepared after an in-place change).

    Inside ``torch.compile`` nothing is cached and no windows are planned.

    Args:
        mask (Any): a bool ``[b, q, kv]`` tensor, or another mask object (a BlockMask) whose
            dense twin ``dense`` gives; a batch pays for that twin once, not once per layer.
        dense (Optional[Callable[[], Tensor]]): the dense twin of a non-tensor ``mask``.
    """
    if torch.compiler.is_compiling():
        return prepare_sdpa_mask(mask if dense is None else dense(), windowed=False)
    version = _version(mask) if dense is None else None
    cached = getattr(mask, _CACHE_ATTRIBUTE, None)
    if cached is None or cached[0] != version:
        cached = (version, prepare_sdpa_mask(mask if dense is None else dense()))
        setattr(mask, _CACHE_ATTRIBUTE, cached)
    return cached[1]


def _version(mask: Tensor) -> Optional[int]:
    # Inference tensors (``torch.inference_mode``) keep no version counter; no code here changes a
    # mask in place (generation builds a new one per call).
    return None if mask.is_inference() else mask._version


def _require_cpu_ids(what: str, segment_ids: Tensor, document_ids: Optional[Tensor]) -> None:
    # The plan reads ids on the host: on a CUDA tensor each read would wait for the GPU.
    for name, ids in (("segment_ids", segment_ids), ("document_ids", document_ids)):
        if ids is not None and ids.device.type != "cpu":
            raise ValueError(
                f"{what} reads {name} on the host and got {name} on {ids.device}; pass the CPU ids (the "
                "loader's batch), or on a device build the mask with mas.attention.build_attention_mask"
            )


def _reach(ids: Tensor) -> Tuple[Tensor, Tensor]:
    """Per position, the first and the last position of its id's value in the row.

    Args:
        ids (Tensor): ``[b, s]`` integer ids (any values, in any order).

    Returns:
        Tuple[Tensor, Tensor]: ``(first, last)``, each ``[b, s]``.
    """
    batch_size, seq_len = ids.shape
    _, inverse = torch.unique(ids, return_inverse=True)
    n_values = int(inverse.max()) + 1 if inverse.numel() else 1
    keys = inverse + n_values * torch.arange(batch_size)[:, None]  # distinct per row
    positions = torch.arange(seq_len).expand(batch_size, seq_len)
    size = batch_size * n_values
    first = torch.full((size,), seq_len).scatter_reduce(0, keys.flatten(), positions.flatten(), "amin")
    last = torch.full((size,), -1).scatter_reduce(0, keys.flatten(), positions.flatten(), "amax")
    return first[keys], last[keys]


def _query_reach(segment_ids: Tensor, document_ids: Optional[Tensor], query_start: int, query_len: int) -> Tuple[Tensor, Tensor]:
    """Per query, over the rows of the batch, the first and the last key the MAS rule can allow.

    Query position ``p`` may attend key ``k`` only if ``k`` lies in its document (``k >=`` the
    document's first position) and ``k <= p`` or ``k`` is in its prompt segment (``k <=`` the
    segment's last position).

    Returns:
        Tuple[Tensor, Tensor]: ``(low, high)``, each ``[query_len]``.
    """
    kv_len = segment_ids.shape[1]
    positions = torch.arange(kv_len)
    lowest = _reach(document_ids)[0] if document_ids is not None else torch.zeros_like(segment_ids)
    segment_last = _reach(segment_ids)[1]
    highest = torch.where(segment_ids >= 0, torch.maximum(segment_last, positions), positions)
    q_slice = slice(query_start, query_start + query_len)
    return lowest[:, q_slice].amin(0), highest[:, q_slice].clamp(max=kv_len - 1).amax(0)


def check_key_windows(
    windows: Sequence[Window], segment_ids: Tensor, document_ids: Optional[Tensor], *, query_start: int, query_len: int
) -> None:
    """Raise unless ``windows`` tile the queries in order and each holds every key its queries
    may see (windows planned for other ids would silently drop keys).

    Raises:
        ValueError: naming the first window that does not fit.
    """
    low, high = _query_reach(segment_ids, document_ids, query_start, query_len)
    expected_start = 0
    for i, (q0, q1, k0, k1) in enumerate(windows):
        if q0 != expected_start or q1 <= q0 or q1 > query_len:
            raise ValueError(f"key window {i} covers queries [{q0}, {q1}); expected a tile starting at {expected_start} within {query_len} queries")
        needed = int(low[q0:q1].min()), int(high[q0:q1].max()) + 1
        if needed[1] > needed[0] and (k0 > needed[0] or k1 < needed[1]):
            raise ValueError(
                f"key window {i} (queries [{q0}, {q1})) holds keys [{k0}, {k1}) but its queries may see keys "
                f"[{needed[0]}, {needed[1]}): windows planned for other ids? Plan them with plan_key_windows"
            )
        expected_start = q1
    if expected_start != query_len:
        raise ValueError(f"the key windows cover queries [0, {expected_start}) of {query_len}")


def _cut_tiles(low: List[int], high: List[int], cuts: List[int], max_tile: int, call_cost: int) -> List[Tuple[int, int]]:
    """The query tiles (between candidate cuts) of least total cost, by dynamic programming.

    A tile's cost is ``len * (window length) + call_cost``; its window spans the lowest ``low``
    to the highest ``high`` of its queries.

    Args:
        low (List[int]): per query, the first key it may see (``kv_len`` if none).
        high (List[int]): per query, the last key it may see (-1 if none).
        cuts (List[int]): sorted candidate tile starts, from 0, ending with the query count.
        max_tile (int): longest tile.
        call_cost (int): cost of one more tile, in scores.

    Returns:
        List[Tuple[int, int]]: ``(q_start, q_end)`` of each tile, in order.
    """
    # Per gap between consecutive cuts: its lowest low and highest high.
    gap_low = [min(low[a:b]) for a, b in zip(cuts, cuts[1:])]
    gap_high = [max(high[a:b]) for a, b in zip(cuts, cuts[1:])]
    best = [0.0] + [math.inf] * (len(cuts) - 1)
    start_of = [0] * len(cuts)
    for end in range(1, len(cuts)):
        lowest, highest = math.inf, -1
        for start in range(end - 1, -1, -1):
            if cuts[end] - cuts[start] > max_tile and start < end - 1:
                break
            lowest, highest = min(lowest, gap_low[start]), max(highest, gap_high[start])
            width = max(highest - lowest + 1, 1) if highest >= 0 else 1
            cost = best[start] + (cuts[end] - cuts[start]) * width + call_cost
            if cost < best[end]:
                best[end], start_of[end] = cost, start
    tiles = []
    end = len(cuts) - 1
    while end > 0:
        tiles.append((cuts[start_of[end]], cuts[end]))
        end = start_of[end]
    return tiles[::-1]


def plan_key_windows(
    segment_ids: Tensor,
    document_ids: Optional[Tensor] = None,
    *,
    query_start: int = 0,
    query_len: Optional[int] = None,
    cut_step: int = CUT_STEP,
    max_tile: int = MAX_TILE,
    call_cost: int = CALL_COST,
) -> List[Window]:
    """Query tiles and key windows that hold every key the MAS rule can allow, from the CPU ids.

    Query position ``p`` may attend key ``k`` only if ``k`` lies in its document (``k >=`` the
    document's first position) and ``k <= p`` or ``k`` is in its prompt segment (``k <=`` the
    segment's last position); over the rows of the batch, each query gets the union of these
    ranges. The tiles are cut (at multiples of ``cut_step`` or where a document starts) so as to
    minimise the scores computed plus ``call_cost`` per tile: in a pack, about one tile per
    example, whose window is that example. The windows of a MAS layout also hold every key of
    the same layout made causal (a causal mask allows a subset), so one plan serves both
    attention modes. Reads the ids on the host: the training loader plans on its CPU batch,
    before the step.

    Args:
        segment_ids (Tensor): ``[b, s]`` CPU segment ids.
        document_ids (Optional[Tensor]): ``[b, s]`` document ids, or None.
        query_start (int): key position of the first query.
        query_len (Optional[int]): number of queries; default ``s - query_start``.
        cut_step (int): tiles start at multiples of this (or at a document start).
        max_tile (int): longest tile, in queries.
        call_cost (int): what one more tile costs, in scores.

    Returns:
        List[Window]: ``(q_start, q_end, k_start, k_end)`` per tile of queries, in order.

    Raises:
        ValueError: ids that are not on the CPU.
    """
    _require_cpu_ids("plan_key_windows", segment_ids, document_ids)
    kv_len = segment_ids.shape[1]
    if query_len is None:
        query_len = kv_len - query_start
    if query_len <= cut_step:  # one tile: the whole mask, nothing to read (decoding)
        return [(0, query_len, 0, kv_len)]
    low, high = _query_reach(segment_ids, document_ids, query_start, query_len)
    document_starts = (low[1:] != low[:-1]).nonzero().squeeze(1) + 1
    cuts = sorted(set(range(0, query_len, cut_step)) | set(document_starts.tolist()) | {query_len})
    low_list, high_list = low.tolist(), high.tolist()
    tiles = _cut_tiles(low_list, high_list, cuts, max_tile, call_cost)
    return [_window(q0, q1, min(low_list[q0:q1]), max(high_list[q0:q1]) + 1) for q0, q1 in tiles]


def _tile_masks(mask_mod: MaskMod, batch_size: int, windows: Sequence[Window]) -> Tuple[List[Tensor], SdpaMask]:
    """Each window's bool ``[b, q_end - q_start, k_end - k_start]`` block of ``mask_mod``, and
    the :class:`SdpaMask` made of them.

    The windows are stacked, each padded to the largest one (its padding indices repeat its last
    query and key, and are cut off), and the ``mask_mod`` is evaluated once over all of them, and
    the SDPA tiles made in one pass: a pack's ~8 windows cost one evaluation instead of eight.
    When padding would more than double the work, each window is evaluated alone
    (:func:`~mas.masks.materialize_mask_mod`, the slow twin).
    """
    max_q = max(q1 - q0 for q0, q1, _, _ in windows)
    max_k = max(k1 - k0 for _, _, k0, k1 in windows)
    area = sum((q1 - q0) * (k1 - k0) for q0, q1, k0, k1 in windows)
    if len(windows) * max_q * max_k > 2 * area:
        cpu = torch.device("cpu")
        blocks = [materialize_mask_mod(mask_mod, batch_size, q1 - q0, k1 - k0, cpu, q_offset=q0, kv_offset=k0) for q0, q1, k0, k1 in windows]
        return blocks, _from_tiles(windows, blocks)
    starts = torch.tensor([[q0, k0] for q0, _, k0, _ in windows])  # [t, 2]
    ends = torch.tensor([[q1 - 1, k1 - 1] for _, q1, _, k1 in windows])
    # [t, max_q] and [t, max_k]: each window's query and key positions, padded with its last one.
    q_idx = torch.minimum(starts[:, :1] + torch.arange(max_q), ends[:, :1])
    kv_idx = torch.minimum(starts[:, 1:] + torch.arange(max_k), ends[:, 1:])
    b = torch.arange(batch_size)[:, None, None, None]
    h = torch.zeros((), dtype=torch.long)
    # [b, 1, 1, 1] x [1, t, max_q, 1] x [1, t, 1, max_k] -> [b, t, max_q, max_k]
    stacked = mask_mod(b, h, q_idx[None, :, :, None], kv_idx[None, :, None, :]).expand(batch_size, len(windows), max_q, max_k)
    has_key = stacked.any(-1, keepdim=True)  # [b, t, max_q, 1]
    ready = stacked | ~has_key  # a row without a key allows every key of its tile; zeroed after
    sizes = [(q1 - q0, k1 - k0) for q0, q1, k0, k1 in windows]
    blocks = [stacked[:, t, :tq, :tk] for t, (tq, tk) in enumerate(sizes)]
    tiles = [MaskTile(w, ready[:, t, :tq, :tk][:, None]) for t, (w, (tq, tk)) in enumerate(zip(windows, sizes))]
    row_has_key = torch.cat([has_key[:, t, :tq] for t, (tq, _) in enumerate(sizes)], dim=1)  # [b, q, 1]
    return blocks, SdpaMask(tiles, row_has_key[:, None])


def windowed_mas_mask(
    segment_ids: Tensor,
    document_ids: Optional[Tensor] = None,
    *,
    query_start: int = 0,
    query_len: Optional[int] = None,
    validate: bool = True,
    cut_step: int = CUT_STEP,
    max_work: float = MAX_WINDOWED_WORK,
    key_windows: Optional[Sequence[Window]] = None,
) -> Tensor:
    """The dense MAS mask of :func:`mas.masks.dense_mas_mask`, built window by window on the CPU.

    Equal to ``dense_mas_mask`` (tests), but the rule is evaluated only inside each query tile's
    key window (planned from the ids), and the :class:`SdpaMask` that attention needs is built on
    the way and cached on the returned tensor, so no layer reads the mask again.

    Args:
        segment_ids (Tensor): ``[b, s]`` CPU segment ids (see :mod:`mas.masks`).
        document_ids (Optional[Tensor]): ``[b, s]`` document ids of packed rows, or None.
        query_start (int): key position of the first query.
        query_len (Optional[int]): number of queries; default ``s - query_start``.
        validate (bool): check the ids first (and ``key_windows``, when given, against them).
        cut_step (int): the plan's tile grid (:func:`plan_key_windows`).
        max_work (float): build window by window when the windows cover at most this fraction of
            the scores; else the whole mask at once.
        key_windows (Optional[Sequence[Window]]): windows planned already by
            :func:`plan_key_windows` (on the CPU batch, for the MAS layout of these ids), so the
            build reads no id on the host; default: plan them here.

    Returns:
        Tensor: bool ``[b, query_len, s]``.

    Raises:
        ValueError: ids that are not on the CPU.
    """
    _require_cpu_ids("windowed_mas_mask", segment_ids, document_ids)
    if validate:
        validate_segment_ids(segment_ids, document_ids)
    batch_size, kv_len = segment_ids.shape
    if query_len is None:
        query_len = kv_len - query_start
    if key_windows is None:
        windows = plan_key_windows(segment_ids, document_ids, query_start=query_start, query_len=query_len, cut_step=cut_step)
    else:
        windows = list(key_windows)
        if validate:
            check_key_windows(windows, segment_ids, document_ids, query_start=query_start, query_len=query_len)
    if not _worth_windows(windows, query_len, kv_len, max_work):
        mask = dense_mas_mask(segment_ids, document_ids, query_start=query_start, query_len=query_len, validate=False)
        setattr(mask, _CACHE_ATTRIBUTE, (_version(mask), _whole(mask)))
        return mask
    mask_mod = mas_mask_mod(segment_ids, document_ids, query_start=query_start, validate=False)
    mask = torch.zeros(batch_size, query_len, kv_len, dtype=torch.bool)
    blocks, prepared = _tile_masks(mask_mod, batch_size, windows)
    for (q0, q1, k0, k1), block in zip(windows, blocks):
        mask[:, q0:q1, k0:k1] = block
    setattr(mask, _CACHE_ATTRIBUTE, (_version(mask), prepared))
    return mask


def windowed_sdpa(
    q: Tensor, k: Tensor, v: Tensor, mask: SdpaMask, dropout_p: float = 0.0, enable_gqa: bool = False
) -> Tensor:
    """SDPA under ``mask``, one call per query tile over its key window (or one call in all).

    Args:
        q (Tensor): ``[b, n_h, s_q, h_d]``.
        k (Tensor): ``[b, n_kv, s_kv, h_d]``.
        v (Tensor): ``[b, n_kv, s_kv, h_d]``.
        mask (SdpaMask): from :func:`prepare_sdpa_mask` or :func:`windowed_mas_mask`, for
            ``s_q`` queries and ``s_kv`` keys.
        dropout_p (float): attention dropout.
        enable_gqa (bool): ``n_kv < n_h`` (grouped-query attention without copies).

    Returns:
        Tensor: ``[b, n_h, s_q, h_d]``; rows that allow no key are zero.
    """
    if len(mask.tiles) == 1:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask.tiles[0].attn_mask, dropout_p=dropout_p, enable_gqa=enable_gqa
        )
    else:
        out = torch.cat(
            [
                F.scaled_dot_product_attention(
                    q[:, :, q_start:q_end],
                    k[:, :, k_start:k_end],
                    v[:, :, k_start:k_end],
                    attn_mask=tile.attn_mask,
                    dropout_p=dropout_p,
                    enable_gqa=enable_gqa,
                )
                for tile in mask.tiles
                for q_start, q_end, k_start, k_end in [tile.window]
            ],
            dim=2,
        )
    return out * mask.row_has_key.to(out.dtype)
