"""The inference KV cache: independent rows, so sequences can join and leave between steps.

torchtune's ``KVCache`` writes every row of a batch at one shared position, which suits one batch
that starts and ends together. The engine's rows start at different times: row ``r`` holds one
sequence in slots ``[0, length_r)``, slot ``i`` holding the token at position ``i`` (no padding
inside a row). Each forward writes its new keys and values at slots the engine chooses per row::

    row 0: [ s  s  u  u  a  a  a  . ]     length 7: the next token goes to slot 7
    row 1: [ s  s  u  u  u  a  .  . ]     length 6
    row 2: [ .  .  .  .  .  .  .  . ]     free
                                           prefill of a new sequence into row 2: slots [p, P)
                                           after copying a cached prefix into [0, p)

The engine sets a :class:`SlotPlan` (which rows, which slots, how many key slots come back)
before each forward; every layer's :class:`SlotKVCache` reads the same plan. Slots at or beyond
a row's length are never attended (the engine's masks say so), so a freed row needs no clearing
and a prefill's padding queries may write into the row's own unused slots.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Tuple

import torch
from torch import Tensor, nn

__all__ = ["KV", "SlotCaches", "SlotKVCache", "SlotPlan", "install_slot_caches", "remove_caches"]

#: Keys and values of one row's prefix: per layer ``(k, v)``, each ``[n_kv, length, head_dim]``.
KV = List[Tuple[Tensor, Tensor]]


@dataclass
class SlotPlan:
    """Where the next forward writes and what it reads back.

    Attributes:
        rows (Tensor): ``[b]`` long, the cache row of each batch row of the forward.
        slots (Tensor): ``[b, s]`` long, the slot each new token is written to.
        width (int): slots ``[0, width)`` of those rows are returned for attention.
        contiguous_from (int): ``>= 0`` when ``rows`` is ``[c, c + b)``: the rows are then a view
            (no gather); ``-1`` otherwise.
        start (int): ``>= 0`` when every row writes slots ``[start, start + s)`` (a prefill):
            one slice assignment instead of a scatter; ``-1`` otherwise.
    """

    rows: Tensor = field(default_factory=lambda: torch.zeros(1, dtype=torch.long))
    slots: Tensor = field(default_factory=lambda: torch.zeros(1, 1, dtype=torch.long))
    width: int = 1
    contiguous_from: int = 0
    start: int = -1


class SlotKVCache(nn.Module):
    """One attention layer's keys and values for ``rows`` independent sequences.

    Replaces a torchtune ``KVCache`` on a ``MultiHeadAttention`` (same ``update`` contract:
    take the new ``[b, n_kv, s, d]`` keys and values, return the keys and values to attend).

    Args:
        rows (int): sequences held at once.
        max_len (int): slots per row.
        num_kv_heads (int), head_dim (int), dtype, device: cache layout.
        plan (SlotPlan): shared by every layer; set by the engine before each forward.
    """

    def __init__(self, rows: int, max_len: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device, plan: SlotPlan) -> None:
        super().__init__()
        shape = (rows, num_kv_heads, max_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.plan = plan

    @property
    def size(self) -> int:
        """torchtune asks this only of cross-attention caches; rows have no single size."""
        return 0

    def reset(self) -> None:
        """Nothing to clear: a row's stale slots are masked until they are overwritten."""

    def update(self, k_val: Tensor, v_val: Tensor) -> Tuple[Tensor, Tensor]:
        """Write ``k_val``/``v_val`` (``[b, n_kv, s, d]``) at the plan's rows and slots.

        Returns:
            Tuple[Tensor, Tensor]: keys and values ``[b, n_kv, width, d]`` of the plan's rows
            (views of the cache when the rows are contiguous).
        """
        plan = self.plan
        b = k_val.shape[0]
        if plan.start >= 0:  # every row writes the same slots (a prefill chunk)
            written = slice(plan.start, plan.start + k_val.shape[2])
            if plan.contiguous_from >= 0:
                rows = slice(plan.contiguous_from, plan.contiguous_from + b)
                self.k_cache[rows, :, written] = k_val
                self.v_cache[rows, :, written] = v_val
                return self.k_cache[rows, :, : plan.width], self.v_cache[rows, :, : plan.width]
            self.k_cache[plan.rows, :, written] = k_val
            self.v_cache[plan.rows, :, written] = v_val
            return self.k_cache[plan.rows, :, : plan.width], self.v_cache[plan.rows, :, : plan.width]
        if plan.contiguous_from >= 0:
            rows = slice(plan.contiguous_from, plan.contiguous_from + b)
            k_rows, v_rows = self.k_cache[rows], self.v_cache[rows]
            # [b, s] slots -> [b, n_kv, s, d]: a scatter along the slot dimension (about half the
            # time of an index_put with two advanced indices on a CPU).
            index = plan.slots[:, None, :, None].expand(-1, k_val.shape[1], -1, k_val.shape[3])
            k_rows.scatter_(2, index, k_val)
            v_rows.scatter_(2, index, v_val)
            return k_rows[:, :, : plan.width], v_rows[:, :, : plan.width]
        row_index = plan.rows[:, None]
        self.k_cache[row_index, :, plan.slots] = k_val.transpose(1, 2)
        self.v_cache[row_index, :, plan.slots] = v_val.transpose(1, 2)
        return self.k_cache[plan.rows, :, : plan.width], self.v_cache[plan.rows, :, : plan.width]


class SlotCaches:
    """The model's slot caches and their shared plan (what the engine holds).

    Args:
        caches (List[SlotKVCache]): one per attention layer, in layer order.
        plan (SlotPlan): the plan they share.
    """

    def __init__(self, caches: List[SlotKVCache], plan: SlotPlan) -> None:
        self.caches = caches
        self.plan = plan

    @property
    def rows(self) -> int:
        return self.caches[0].k_cache.shape[0]

    @property
    def max_len(self) -> int:
        return self.caches[0].k_cache.shape[2]

    @property
    def device(self) -> torch.device:
        return self.caches[0].k_cache.device

    def bytes_per_token(self) -> int:
        """Bytes one token's keys and values take over all layers."""
        c = self.caches[0]
        return 2 * len(self.caches) * c.k_cache.shape[1] * c.k_cache.shape[3] * c.k_cache.element_size()

    def plan_rows(self, rows: List[int], slots: Tensor, width: int, start: int = -1) -> None:
        """The next forward writes batch row ``i``'s tokens to cache row ``rows[i]`` at
        ``slots[i]`` (``[b, s]``; with ``start >= 0`` they are ``[start, start + s)`` in every row)
        and reads back slots ``[0, width)``."""
        self.plan.slots = slots
        self.plan.width = width
        self.plan.start = start
        first = rows[0]
        self.plan.contiguous_from = first if rows == list(range(first, first + len(rows))) else -1
        self.plan.rows = torch.tensor(rows, dtype=torch.long).to(slots.device)

    def plan_decode(self, slots: Tensor, width: int, first_row: int = 0) -> None:
        """The next forward writes one token per row ``first_row + i`` at ``slots[i]`` (``[b]``)."""
        self.plan.slots = slots[:, None]
        self.plan.width = width
        self.plan.contiguous_from = first_row
        self.plan.start = -1

    def read(self, row: int, length: int) -> KV:
        """Copies of slots ``[0, length)`` of one row: per layer ``(k, v)``, each ``[n_kv, length, d]``."""
        return [(c.k_cache[row, :, :length].clone(), c.v_cache[row, :, :length].clone()) for c in self.caches]

    def write(self, row: int, prefix: KV, length: int) -> None:
        """Copy the first ``length`` slots of a stored prefix into one row's slots ``[0, length)``."""
        for cache, (k, v) in zip(self.caches, prefix):
            cache.k_cache[row, :, :length] = k[:, :length]
            cache.v_cache[row, :, :length] = v[:, :length]


def install_slot_caches(model: nn.Module, rows: int, max_len: int, dtype: torch.dtype) -> SlotCaches:
    """Give every self-attention layer a :class:`SlotKVCache` (in place).

    ``model.setup_caches`` first turns torchtune's inference mode on (masks and positions are then
    required on every forward); its ``KVCache`` modules are then replaced.

    Args:
        model (nn.Module): a torchtune ``TransformerDecoder``.
        rows (int): sequences held at once.
        max_len (int): slots per row (at most the model's ``max_seq_len``).
        dtype (torch.dtype): cache dtype (the model's).

    Returns:
        SlotCaches: the caches, for the engine.
    """
    from torchtune.modules import MultiHeadAttention

    remove_caches(model)
    device = next(model.parameters()).device
    with device:
        model.setup_caches(batch_size=1, dtype=dtype, decoder_max_seq_len=max_len)
    plan = SlotPlan()
    caches = []
    for module in model.modules():
        if isinstance(module, MultiHeadAttention) and module.kv_cache is not None:
            cache = SlotKVCache(rows, max_len, module.num_kv_heads, module.head_dim, dtype, device, plan)
            module.kv_cache = cache
            caches.append(cache)
    if not caches:
        raise ValueError(f"{type(model).__name__} has no self-attention layer with a KV cache")
    return SlotCaches(caches, plan)


def remove_caches(model: nn.Module) -> None:
    """Remove the model's KV caches (if any): plain full-sequence forwards work again."""
    from torchtune.modules.common_utils import delete_kv_caches

    if model.caches_are_setup():
        delete_kv_caches(model)
