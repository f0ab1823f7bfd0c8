"""The MAS attention rule as small composable FlexAttention ``mask_mod`` functions.

Every attention path in this project (FlexAttention BlockMask, dense SDPA mask, KV-cache
prefill and decode) derives from :func:`mas_mask_mod`. The rule (Eq. 14 of Katz et al.,
"Segment-Based Attention Masking for GPTs", arXiv 2412.18487, extended with padding and
packed documents)::

    q may attend k  iff  k is not padding
                    and  doc(q) == doc(k)
                    and  (k <= q  or  seg(q) == seg(k) >= 0)

Per-token ``segment_ids`` (``LongTensor [b, s]``) follow one public convention:

- ``>= 0``: a bidirectional prompt segment (system prompt, user turn), ids distinct per sequence;
- :data:`CAUSAL` (-1): attended causally only (answers, generated tokens);
- :data:`PAD` (-2): padding, never attended.

Example, a system segment (0), a user segment (1) and a two-token answer (``CAUSAL``)::

    segment_ids = [0, 0, 1, 1, 1, -1, -1]

    mask =  k: 0 1 2 3 4 5 6
      q=0     [1 1 0 0 0 0 0]   system tokens see the whole system prompt
      q=1     [1 1 0 0 0 0 0]
      q=2     [1 1 1 1 1 0 0]   user tokens see the past and the whole user turn
      q=3     [1 1 1 1 1 0 0]
      q=4     [1 1 1 1 1 0 0]
      q=5     [1 1 1 1 1 1 0]   answer tokens are causal
      q=6     [1 1 1 1 1 1 1]
"""

from __future__ import annotations

from typing import Callable, Literal, Optional, get_args

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import and_masks, or_masks

from mas.errors import ConfigError

__all__ = [
    "CAUSAL",
    "PAD",
    "AttentionMode",
    "MaskMod",
    "as_causal",
    "causal",
    "dense_mas_mask",
    "key_not_padding",
    "mas_mask_mod",
    "materialize_mask_mod",
    "same_document",
    "same_prompt_segment",
    "validate_attention_mode",
    "validate_segment_ids",
]

#: Segment id of tokens attended causally only (assistant answers, generated tokens).
CAUSAL: int = -1
#: Segment id of padding tokens: never attended as keys.
PAD: int = -2

#: How prompt segments attend: ``"mas"`` (each prompt segment bidirectional, Eq. 14) or
#: ``"causal"`` (the baseline: the same layout with every prompt segment made causal).
AttentionMode = Literal["mas", "causal"]

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def validate_attention_mode(value: object, *, key: str = "attention") -> AttentionMode:
    """Return ``value`` if it is an :data:`AttentionMode`, else raise a one-line ``ConfigError``.

    Args:
        value (object): the requested mode.
        key (str): the config key or argument it came from, named in the error.

    Raises:
        ConfigError: for anything but ``"mas"`` or ``"causal"``.
    """
    modes = get_args(AttentionMode)
    if value not in modes:
        raise ConfigError(f"{key} must be 'mas' or 'causal', got {value!r}")
    return value  # type: ignore[return-value]


def as_causal(segment_ids: Tensor) -> Tensor:
    """The same layout with every prompt segment made causal (the causal baseline's mask).

    Padding and documents are kept, so causal and MAS runs share one attention path::

        segment_ids            = [0, 0, 1, 1, -1, -2]
        as_causal(segment_ids) = [-1, -1, -1, -1, -1, -2]

    Args:
        segment_ids (Tensor): ``[b, s]`` segment ids.

    Returns:
        Tensor: ``[b, s]``, ``CAUSAL`` wherever ``segment_ids >= 0``.
    """
    return torch.where(segment_ids >= 0, torch.full_like(segment_ids, CAUSAL), segment_ids)


def causal(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    """A query attends to itself and every earlier position."""
    return kv_idx <= q_idx


def _named(mask_mod: MaskMod, name: str) -> MaskMod:
    mask_mod.__name__ = name
    return mask_mod


def _with_query_offset(query_start: int) -> Callable[[Tensor], Tensor]:
    # Queries may be a window of the key positions (KV-cache prefill after a cached prefix):
    # query index i is key position query_start + i.
    if query_start == 0:
        return lambda q_idx: q_idx
    return lambda q_idx: q_idx + query_start


def causal_from(query_start: int = 0) -> MaskMod:
    """Causal mask for queries that start at key position ``query_start``."""
    if query_start == 0:
        return causal
    to_position = _with_query_offset(query_start)

    def causal_offset(b, h, q_idx, kv_idx):
        return kv_idx <= to_position(q_idx)

    return causal_offset


def same_prompt_segment(segment_ids: Tensor, query_start: int = 0) -> MaskMod:
    """Query and key lie in the same bidirectional prompt segment (id >= 0)."""
    to_position = _with_query_offset(query_start)

    def same_prompt_segment(b, h, q_idx, kv_idx):
        q_segment = segment_ids[b, to_position(q_idx)]
        return (q_segment == segment_ids[b, kv_idx]) & (q_segment >= 0)

    return same_prompt_segment


def same_document(document_ids: Tensor, query_start: int = 0) -> MaskMod:
    """Query and key lie in the same packed document."""
    to_position = _with_query_offset(query_start)

    def same_document(b, h, q_idx, kv_idx):
        return document_ids[b, to_position(q_idx)] == document_ids[b, kv_idx]

    return same_document


def key_not_padding(segment_ids: Tensor) -> MaskMod:
    """The key is a real token, not padding (or an unwritten KV-cache slot)."""

    def key_not_padding(b, h, q_idx, kv_idx):
        return segment_ids[b, kv_idx] != PAD

    return key_not_padding


def validate_segment_ids(
    segment_ids: Tensor, document_ids: Optional[Tensor] = None, *, name: str = "segment_ids"
) -> None:
    """Raise ``ValueError`` unless ``segment_ids`` (and ``document_ids``) follow the convention.

    Args:
        segment_ids (Tensor): ``[b, s]`` integer tensor.
        document_ids (Optional[Tensor]): ``[b, s]`` integer tensor, or None.
        name (str): how to call the tensor in the error message.
    """
    if segment_ids.dim() != 2:
        raise ValueError(f"{name} must be [batch, seq], got shape {tuple(segment_ids.shape)}")
    if segment_ids.dtype.is_floating_point or segment_ids.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {segment_ids.dtype}")
    if segment_ids.numel() and int(segment_ids.min()) < PAD:
        raise ValueError(
            f"{name} holds {int(segment_ids.min())}; valid ids are >= 0 (prompt segment), "
            f"{CAUSAL} (CAUSAL) and {PAD} (PAD)"
        )
    if document_ids is not None and document_ids.shape != segment_ids.shape:
        raise ValueError(
            f"document_ids shape {tuple(document_ids.shape)} != {name} shape "
            f"{tuple(segment_ids.shape)}"
        )


def mas_mask_mod(
    segment_ids: Tensor,
    document_ids: Optional[Tensor] = None,
    *,
    query_start: int = 0,
    validate: bool = True,
) -> MaskMod:
    """The MAS ``mask_mod``: not_padding AND same_document AND (causal OR same_prompt_segment).

    Args:
        segment_ids (Tensor): ``[b, s_kv]`` segment id of every key position.
        document_ids (Optional[Tensor]): ``[b, s_kv]`` document id of every key position, for
            packed sequences. None means one document per row.
        query_start (int): key position of query 0. Non-zero when the queries are a window of a
            longer key sequence (prefill after a cached system prompt). Default 0.
        validate (bool): check the ids (:func:`validate_segment_ids`; one device sync on CUDA).
            Callers that validated the CPU batch already pass False.

    Returns:
        MaskMod: a ``(b, h, q_idx, kv_idx) -> bool`` function for FlexAttention.
    """
    if validate:
        validate_segment_ids(segment_ids, document_ids)
    allowed = or_masks(causal_from(query_start), same_prompt_segment(segment_ids, query_start))
    parts = [key_not_padding(segment_ids)]
    if document_ids is not None:
        parts.append(same_document(document_ids, query_start))
    return _named(and_masks(*parts, allowed), "mas")


def materialize_mask_mod(
    mask_mod: MaskMod,
    batch_size: int,
    q_len: int,
    kv_len: int,
    device: torch.device,
    *,
    q_offset: int = 0,
    kv_offset: int = 0,
) -> Tensor:
    """Evaluate a ``mask_mod`` on every (query, key) pair by broadcasting.

    This is the slow, obviously correct twin of a BlockMask: it builds the full matrix (or the
    block of it at ``q_offset``, ``kv_offset``).

    Returns:
        Tensor: bool ``[b, q_len, kv_len]``: queries ``q_offset + i``, keys ``kv_offset + j``.
    """
    b = torch.arange(batch_size, device=device)[:, None, None]
    h = torch.zeros((), dtype=torch.long, device=device)
    q_idx = torch.arange(q_offset, q_offset + q_len, device=device)[None, :, None]
    kv_idx = torch.arange(kv_offset, kv_offset + kv_len, device=device)[None, None, :]
    dense = mask_mod(b, h, q_idx, kv_idx)
    # [b, q_len, kv_len]: a mask_mod that ignores some indices broadcasts to fewer dims.
    return dense.expand(batch_size, q_len, kv_len).clone()


def dense_mas_mask(
    segment_ids: Tensor,
    document_ids: Optional[Tensor] = None,
    *,
    query_start: int = 0,
    query_len: Optional[int] = None,
    validate: bool = True,
) -> Tensor:
    """The MAS mask as a dense boolean tensor, built from :func:`mas_mask_mod`.

    ``True`` at ``[b, i, j]`` means query ``i`` may attend key ``j``. Used as the reference for
    the BlockMask and as the SDPA mask where FlexAttention cannot run (CPU backward).

    Args:
        segment_ids (Tensor): ``[b, s]`` segment ids (see module docstring).
        document_ids (Optional[Tensor]): ``[b, s]`` document ids, or None.
        query_start (int): key position of the first query. Default 0.
        query_len (Optional[int]): number of queries; default ``s - query_start``.
        validate (bool): check the ids (:func:`validate_segment_ids`). Default True.

    Returns:
        Tensor: bool ``[b, query_len, s]``.
    """
    batch_size, kv_len = segment_ids.shape
    if query_len is None:
        query_len = kv_len - query_start
    mask_mod = mas_mask_mod(segment_ids, document_ids, query_start=query_start, validate=validate)
    return materialize_mask_mod(mask_mod, batch_size, query_len, kv_len, segment_ids.device)
