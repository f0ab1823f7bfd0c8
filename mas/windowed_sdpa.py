"""Dense-mask SDPA that skips the keys no query of a tile may see (the CPU twin of flex's tile skipping).

Where FlexAttention cannot run (CPU training: no flex backward), attention is
``scaled_dot_product_attention`` over the dense ``[b, q, kv]`` mask, which costs every query
every key. A packed row makes most of that work masked: a 1024-token pack of eight ~130-token
examples lets a query see at most its own example, so ~85% of the score matrix is masked.

:func:`windowed_sdpa` cuts the queries into tiles of :data:`QUERY_TILE` and gives each tile only
the contiguous key window that some query of the tile may attend (over the whole batch)::

    packed mask (two documents)        query tile 0 -> keys [0, 5)
      k: 0 1 2 3 4 5 6 7               query tile 1 -> keys [4, 8)
      [1 1 0 0 0 0 0 0]  tile 0
      [1 1 1 0 0 0 0 0]
      [1 1 1 1 1 0 0 0]  (MAS: a prompt segment may reach ahead)
      [1 1 1 1 1 0 0 0]
      [0 0 0 0 1 1 0 0]  tile 1
      [0 0 0 0 1 1 1 0]
      [0 0 0 0 1 1 1 1]
      [0 0 0 0 1 1 1 1]

Keys outside a tile's window are masked for every query of the tile, so leaving them out is
exact: the softmax over the window equals the softmax over the row (tests compare with one SDPA
call over the whole mask, outputs and gradients). The window plan is computed once per mask from
the CPU tensor (no device sync) and cached on it, so the layers of a forward pass and their
backward share it. When the windows would save little (a padded batch whose padding queries see
every key) one call over the whole mask runs, as before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["QUERY_TILE", "SdpaMask", "key_windows", "prepare_sdpa_mask", "windowed_sdpa"]

#: Queries per tile. 128 (the flex tile) measured best on CPU for 1024-2048-token packs of
#: ~130-token examples (32 and 64 give less work but more calls).
QUERY_TILE: int = 128

#: Windows are used when they cover at most this fraction of the ``[q, kv]`` score matrix
#: (a causal 1024-token row: 0.56, 1.5x faster; a padded batch: ~1.0, one call).
MAX_WINDOWED_WORK: float = 0.85

#: One query tile and its key window: ``(q_start, q_end, k_start, k_end)``, ends exclusive.
Window = Tuple[int, int, int, int]


@dataclass(frozen=True)
class SdpaMask:
    """A dense mask made ready for SDPA, built once per batch and shared by every layer.

    Attributes:
        attn_mask (Tensor): bool ``[b, 1, q, kv]``; rows that allow no key allow every key
            (a finite softmax) and are zeroed through ``row_has_key``.
        row_has_key (Tensor): bool ``[b, 1, q, 1]``.
        windows (Optional[List[Window]]): the query tiles and their key windows, or None for
            one call over the whole mask.
    """

    attn_mask: Tensor
    row_has_key: Tensor
    windows: Optional[List[Window]]


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
    any_query = mask.any(0)  # [q, kv]
    per_tile = F.pad(any_query, (0, 0, 0, n_tiles * tile - q_len)).view(n_tiles, tile, kv_len).any(1)
    key_index = torch.arange(kv_len, device=mask.device)
    first = torch.where(per_tile, key_index, kv_len).amin(1).tolist()
    last = torch.where(per_tile, key_index, -1).amax(1).tolist()
    windows = []
    for t in range(n_tiles):
        q_start, q_end = t * tile, min(q_len, (t + 1) * tile)
        k_start, k_end = (first[t], last[t] + 1) if last[t] >= 0 else (0, 1)
        windows.append((q_start, q_end, k_start, k_end))
    return windows


def _worth_windows(windows: List[Window], q_len: int, kv_len: int) -> bool:
    if len(windows) < 2:
        return False
    work = sum((q_end - q_start) * (k_end - k_start) for q_start, q_end, k_start, k_end in windows)
    return work <= MAX_WINDOWED_WORK * q_len * kv_len


def prepare_sdpa_mask(mask: Tensor, *, windowed: bool = True) -> SdpaMask:
    """Turn a dense mask into an :class:`SdpaMask` (plan the key windows on a CPU mask).

    Args:
        mask (Tensor): bool ``[b, q, kv]``.
        windowed (bool): plan key windows; only for a CPU mask outside ``torch.compile`` (the
            plan reads the mask on the host). Default True.

    Returns:
        SdpaMask: the SDPA-ready mask, with windows where they save work.
    """
    row_has_key = mask.any(-1, keepdim=True)  # [b, q, 1]
    attn_mask = (mask | ~row_has_key)[:, None]
    windows = None
    if windowed and mask.device.type == "cpu" and not torch.compiler.is_compiling():
        planned = key_windows(mask)
        if _worth_windows(planned, mask.shape[1], mask.shape[2]):
            windows = planned
    return SdpaMask(attn_mask, row_has_key[:, None], windows)


def windowed_sdpa(
    q: Tensor, k: Tensor, v: Tensor, mask: SdpaMask, dropout_p: float = 0.0, enable_gqa: bool = False
) -> Tensor:
    """SDPA under ``mask``, one call per query tile over its key window (or one call in all).

    Args:
        q (Tensor): ``[b, n_h, s_q, h_d]``.
        k (Tensor): ``[b, n_kv, s_kv, h_d]``.
        v (Tensor): ``[b, n_kv, s_kv, h_d]``.
        mask (SdpaMask): from :func:`prepare_sdpa_mask`, with ``[b, 1, s_q, s_kv]`` masks.
        dropout_p (float): attention dropout.
        enable_gqa (bool): ``n_kv < n_h`` (grouped-query attention without copies).

    Returns:
        Tensor: ``[b, n_h, s_q, h_d]``; rows that allow no key are zero.
    """
    if mask.windows is None:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask.attn_mask, dropout_p=dropout_p, enable_gqa=enable_gqa
        )
    else:
        out = torch.cat(
            [
                F.scaled_dot_product_attention(
                    q[:, :, q_start:q_end],
                    k[:, :, k_start:k_end],
                    v[:, :, k_start:k_end],
                    attn_mask=mask.attn_mask[:, :, q_start:q_end, k_start:k_end],
                    dropout_p=dropout_p,
                    enable_gqa=enable_gqa,
                )
                for q_start, q_end, k_start, k_end in mask.windows
            ],
            dim=2,
        )
    return out * mask.row_has_key.to(out.dtype)
