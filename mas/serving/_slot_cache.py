"""A KV cache of independent rows, so requests can join and leave between decode steps.

torchtune's ``KVCache`` writes every row of a batch at one shared position, which suits one batch
that starts and ends together (``mas.generate``). A server's rows start at different times: row
``r`` holds one sequence in slots ``[0, length_r)``, slot ``i`` holding the token at position
``i``. Each forward writes its new keys/values at per-row slots chosen by the engine::

    row 0: [ s  s  u  u  a  a  a  . ]     length 7: the next token goes to slot 7
    row 1: [ s  s  u  u  u  a  .  . ]     length 6
    row 2: [ .  .  .  .  .  .  .  . ]     free
                                           prefill of a new request into row 2: slots [p, P)
                                           after copying a cached prefix into [0, p)

The engine sets a :class:`SlotPlan` (which rows, which slots, how wide the attended window is)
before each forward; every layer's :class:`SlotKVCache` reads the same plan. Slots beyond a row's
length are never attended (:func:`slot_decode_mask` says so), so a freed row needs no clearing.

A decode forward is :func:`slot_decode_forward`: one token per row, the mask built on the
device from the rows' slots. :func:`compiled_slot_decode_forward` is the same function under
``torch.compile``; the engine calls it over every row (free rows attend nothing) with the width
rounded up to :func:`mas.generation.decode_loop.decode_width`'s power-of-two buckets, so the plan's
python ints (``first_row`` 0, ``width`` a bucket) and the tensors' shapes take one value per
bucket: one compiled graph per width bucket, however long the server runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Tuple

import torch
from torch import Tensor, nn

from mas.compile_budget import CompiledWithBudget, compile_with_budget
from mas.generation.decode_loop import DECODE_SHAPE_BUDGET, forward_one_token

__all__ = [
    "SlotCaches",
    "SlotKVCache",
    "SlotPlan",
    "compiled_slot_decode_forward",
    "install_slot_caches",
    "slot_decode_forward",
    "slot_decode_mask",
]


@dataclass
class SlotPlan:
    """Where the next forward writes and what it reads back.

    Attributes:
        first_row (int): rows ``[first_row, first_row + b)`` take part in the forward (``b`` is
            the forward's batch size).
        slots (Tensor): ``[b, s]`` long, the slot each new token is written to, per row.
        width (int): slots ``[0, width)`` are returned for attention (the mask's key length).
    """

    first_row: int = 0
    slots: Tensor = field(default_factory=lambda: torch.zeros(1, 1, dtype=torch.long))
    width: int = 1


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
        """Write ``k_val``/``v_val`` (``[b, n_kv, s, d]``) at the plan's slots.

        Returns:
            Tuple[Tensor, Tensor]: keys and values ``[b, n_kv, width, d]`` of the plan's rows
            (views of the cache, no copy).
        """
        plan = self.plan
        b = k_val.shape[0]
        rows = slice(plan.first_row, plan.first_row + b)
        k_rows, v_rows = self.k_cache[rows], self.v_cache[rows]
        # Advanced indices [b, 1] and [b, s] around the head slice put the new dims first:
        # the target is [b, s, n_kv, d], so the values are transposed to match.
        batch_index = torch.arange(b, device=k_val.device)[:, None]
        k_rows[batch_index, :, plan.slots] = k_val.transpose(1, 2)
        v_rows[batch_index, :, plan.slots] = v_val.transpose(1, 2)
        return k_rows[:, :, : plan.width], v_rows[:, :, : plan.width]


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

    def bytes_per_token(self) -> int:
        """Bytes one token's keys and values take over all layers."""
        c = self.caches[0]
        return 2 * len(self.caches) * c.k_cache.shape[1] * c.k_cache.shape[3] * c.k_cache.element_size()

    def plan_prefill(self, row: int, start: int, length: int) -> None:
        """The next forward writes one row's tokens ``[start, length)`` at their own slots."""
        device = self.caches[0].k_cache.device
        self.plan.first_row = row
        self.plan.slots = torch.arange(start, length, device=device)[None]
        self.plan.width = length

    def plan_decode(self, slots: Tensor, width: int, first_row: int = 0) -> None:
        """The next forward writes one token per row ``first_row + i`` at ``slots[i]`` (``[b]``)."""
        self.plan.first_row = first_row
        self.plan.slots = slots[:, None]
        self.plan.width = width

    def read(self, row: int, length: int) -> List[Tuple[Tensor, Tensor]]:
        """Copies of slots ``[0, length)`` of one row: per layer ``(k, v)``, each ``[n_kv, length, d]``."""
        return [(c.k_cache[row, :, :length].clone(), c.v_cache[row, :, :length].clone()) for c in self.caches]

    def write(self, row: int, prefix: List[Tuple[Tensor, Tensor]], length: int) -> None:
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
    from torchtune.modules.common_utils import delete_kv_caches

    device = next(model.parameters()).device
    if model.caches_are_setup():
        delete_kv_caches(model)
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


def slot_decode_mask(slots: Tensor, busy: Tensor, width: int) -> Tensor:
    """What each row's new token attends: its row's written slots and itself; a free row nothing.

    Example, ``slots = [3, 1, 0]``, ``busy = [True, True, False]``, ``width = 5``::

        row 0: [1 1 1 1 0]     slots 0-2 written, the new token at slot 3
        row 1: [1 1 0 0 0]
        row 2: [0 0 0 0 0]     free: attends nothing (its attention output is zero)

    Args:
        slots (Tensor): ``[b]`` or ``[b, 1]`` long, the slot each row's new token is written to
            (= the row's length).
        busy (Tensor): ``[b]`` bool, rows that hold a sequence.
        width (int): key slots of the mask (``> slots.max()``).

    Returns:
        Tensor: ``[b, 1, width]`` bool, on ``slots``' device.
    """
    columns = torch.arange(width, device=slots.device)
    # [b] -> [b, 1] against [width] -> [b, width] -> [b, 1, width]
    return ((columns[None, :] <= slots.reshape(-1, 1)) & busy[:, None])[:, None, :]


def slot_decode_forward(model: nn.Module, tokens: Tensor, slots: Tensor, busy: Tensor, *, width: int) -> Tensor:
    """One decode forward over slot rows: each row's token is written at its slot and attends
    :func:`slot_decode_mask`. The caches' plan must already name these rows, ``slots`` and ``width``
    (:meth:`SlotCaches.plan_decode`).

    Args:
        model (nn.Module): a model with :class:`SlotKVCache` caches.
        tokens (Tensor): ``[b, 1]`` long, each row's new token.
        slots (Tensor): ``[b, 1]`` long, its slot and RoPE position (the plan's ``slots``).
        busy (Tensor): ``[b]`` bool, rows that hold a sequence.
        width (int): key slots attended (the plan's ``width``).

    Returns:
        Tensor: ``[b, vocab]`` next-token logits (a free row's are meaningless).
    """
    return forward_one_token(model, tokens, slot_decode_mask(slots, busy, width), slots)


def compiled_slot_decode_forward(mode: str = "default", **compile_kwargs: Any) -> CompiledWithBudget[Tensor]:
    """:func:`slot_decode_forward` under ``torch.compile`` (static shapes), with the decode step's
    budget of compiled shapes (:data:`~mas.generation.decode_loop.DECODE_SHAPE_BUDGET`): one shape
    per width bucket (and per model, rows and cache length), past which it warns once and runs
    uncompiled (:mod:`mas.compile_budget`).

    Args:
        mode (str): the ``torch.compile`` mode.
        **compile_kwargs: more ``torch.compile`` arguments (tests pass a counting ``backend``).
    """
    return compile_with_budget(
        slot_decode_forward,
        name=f"serving decode forward (mode {mode})",
        max_shapes=DECODE_SHAPE_BUDGET,
        fix="serve with one batch_size and max_cache_len per process",
        mode=mode,
        **compile_kwargs,
    )
