"""The decode step: one token per row over the slot KV cache, as tensors in, tensors out.

:func:`decode_step` is the whole step: the forward (each row's last token written at its own
slot, attending its row's written slots), the token choice (greedy or sampled from pre-drawn
noise, per row), the stop bookkeeping and the next slots. It never reads the device from the
host, so the engine runs several steps between host reads, and ``compile_decode`` compiles
exactly this function: sampling and stops run inside the compiled graph (and inside the CUDA
graph with ``compile_mode="reduce-overhead"``).

Each step attends over the written slots rounded up to a power of two (:func:`decode_width`),
not over the whole cache: a compiled step recompiles once per width bucket
(``log2(cache_len / 64)`` at most), and a 4,096-slot cache with a 300-token prompt reads 512
slots, not 4,096.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Tuple

import torch
from torch import Tensor, nn

from mas.compile_budget import compile_with_budget
from mas.generation.logprobs import score_tokens
from mas.generation.penalties import RowPenalties, apply_penalties
from mas.generation.sampling import RowSampling, choose_tokens, suppress_stops

__all__ = ["DECODE_SHAPE_BUDGET", "compiled_decode_step", "decode_mask", "decode_step", "decode_width", "forward_one_token"]

#: Narrowest attention width of a decode step (smaller buckets would only add recompiles).
MIN_DECODE_WIDTH = 64


def forward_one_token(model: nn.Module, tokens: Tensor, mask: Tensor, input_pos: Tensor) -> Tensor:
    """The model part of a decode step.

    Args:
        tokens (Tensor): ``[b, 1]``; mask (Tensor): ``[b, 1, width]``; input_pos (Tensor): ``[b, 1]``.

    Returns:
        Tensor: ``[b, vocab]`` logits.
    """
    output = model(tokens, mask=mask, input_pos=input_pos)
    # A model set up for the chunked training loss returns a list of sequence chunks.
    return (torch.cat(output, dim=1) if isinstance(output, list) else output)[:, -1]


def decode_width(written: int, cache_len: int) -> int:
    """Key slots a decode step attends over: ``written`` rounded up to a power of two (at least
    :data:`MIN_DECODE_WIDTH`), at most the cache.

    Example: ``decode_width(300, 4096) == 512``; ``decode_width(300, 320) == 320``.
    """
    width = MIN_DECODE_WIDTH
    while width < written:
        width *= 2
    return min(width, cache_len)


def decode_mask(slot: Tensor, decoding: Tensor, width: int) -> Tensor:
    """What each row's new token attends: its row's written slots and itself; other rows nothing.

    A generated token is causal, so in either attention mode it sees every earlier token: the
    row of :func:`mas.attention.build_attention_mask` for the query at ``slot`` (rows hold their
    tokens at slots ``[0, length)``, no padding). Example, ``slot = [3, 1, 0]``,
    ``decoding = [True, True, False]``, ``width = 5``::

        row 0: [1 1 1 1 0]     slots 0-2 written, the new token at slot 3
        row 1: [1 1 0 0 0]
        row 2: [0 0 0 0 0]     not decoding: attends nothing (its attention output is zero)

    Args:
        slot (Tensor): ``[b]`` long, the slot each row's new token is written to.
        decoding (Tensor): ``[b]`` bool, rows that decode.
        width (int): key slots of the mask (``> slot`` of every decoding row).

    Returns:
        Tensor: ``[b, 1, width]`` bool.
    """
    columns = torch.arange(width, device=slot.device)
    # [b] -> [b, 1] against [width] -> [b, width] -> [b, 1, width]
    return ((columns[None, :] <= slot[:, None]) & decoding[:, None])[:, None, :]


def decode_step(
    model: nn.Module,
    token: Tensor,
    done: Tensor,
    slot: Tensor,
    decoding: Tensor,
    row_stops: Tensor,
    min_left: Tensor,
    noise: Optional[Tensor],
    sampling: RowSampling,
    penalties: Optional[RowPenalties] = None,
    *,
    width: int,
    suppress: bool = False,
    top_logprobs: int = -1,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Optional[Tuple[Tensor, Tensor, Tensor]]]:
    """Write each decoding row's ``token`` at its ``slot``, choose the next token, update stops.

    The caches' plan must name rows ``[0, b)`` and these slots
    (:meth:`~mas.generation.slot_cache.SlotCaches.plan_decode`). Pure tensors in and out (``width``
    and the sampling flags are static), so it compiles to one graph per width bucket.

    Args:
        model (nn.Module): the model with slot caches.
        token (Tensor): ``[b]`` each row's last chosen token.
        done (Tensor): ``[b]`` bool, rows that have chosen a stop token.
        slot (Tensor): ``[b]`` long, where ``token`` goes (its RoPE position too: slot = position).
        decoding (Tensor): ``[b]`` bool, rows that decode (others attend nothing and keep their slot).
        row_stops (Tensor): ``[b, S]`` long, each row's stop ids (``-1`` pads).
        min_left (Tensor): ``[b]`` long, tokens each row must generate before it may stop.
        noise (Optional[Tensor]): ``[b, vocab]`` ``Exp(1)`` noise when a row samples, else None.
        sampling (RowSampling): ``[b]`` token-choice settings.
        penalties (Optional[RowPenalties]): ``[b]`` presence/frequency/repetition penalties and
            their counts (updated in place with the chosen tokens); None: no row has one.
        width (int): key slots attended (:func:`decode_width`).
        suppress (bool): some row has ``min_left > 0`` (its stop ids are made impossible).
        top_logprobs (int): ``>= 0``: also score the chosen tokens with this many alternatives
            (:func:`mas.generation.logprobs.score_tokens`, on the raw logits); ``-1``: no scores.

    Returns:
        Tuple: the next token ``[b]``, the same with ``-1`` on rows that are done ``[b]``, the
        updated ``done``, the next ``slot`` and ``min_left``, and the scores (``[b]``,
        ``[b, top_logprobs]`` ids, ``[b, top_logprobs]`` values) or None.
    """
    logits = forward_one_token(model, token[:, None], decode_mask(slot, decoding, width), slot[:, None])
    raw = logits
    if penalties is not None:
        logits = apply_penalties(logits, penalties)
    if suppress:
        logits = suppress_stops(logits, row_stops, min_left)
    next_token = choose_tokens(logits, noise, sampling)
    if penalties is not None:
        penalties.count(next_token, decoding & ~done)
    done = done | (next_token[:, None] == row_stops).any(-1)
    emitted = torch.where(done, torch.full_like(next_token, -1), next_token)
    step = decoding.long()
    scores = score_tokens(raw, next_token, top_logprobs) if top_logprobs >= 0 else None
    return next_token, emitted, done, slot + step, min_left - step, scores


#: Compiled decode-step signatures per mode and process (dynamo's default limit is 8): at most 12
#: widths (64 to 131,072 slots) times a few sampling-flag combinations.
DECODE_SHAPE_BUDGET = 64


@functools.lru_cache(maxsize=None)
def compiled_decode_step(mode: str = "default") -> Callable[..., Tuple[Any, ...]]:
    """:func:`decode_step` under ``torch.compile`` (static shapes, one graph), one wrapper per mode.

    Past :data:`DECODE_SHAPE_BUDGET` signatures (widths x rows x cache lengths x sampling flags)
    it warns once and decodes uncompiled (:mod:`mas.compile_budget`), never silently.
    """
    return compile_with_budget(
        decode_step,
        name=f"compiled decode step (mode {mode})",
        max_shapes=DECODE_SHAPE_BUDGET,
        fix="use one max_cache_len and batch_size per process",
        mode=mode,
    )
