"""The decode loop: a step that never reads the device from the host, and a loop that looks only
every few tokens.

:func:`decode_step` is one whole decode step as tensors in, tensors out: the forward over the KV
cache, the token choice (greedy, or sampling from pre-drawn noise), the stop bookkeeping and the
next slot and position. ``compile_decode`` compiles exactly this function, so sampling and stops
run inside the compiled graph (and inside the CUDA graph with ``compile_mode="reduce-overhead"``).

:func:`decode_tokens` drives it. The only host read is ``bool(done.all())`` once every
``stop_check_every`` tokens; a row that stopped in between keeps decoding, but what it
generates after its stop token is emitted as ``-1`` and trimmed, so the output is the same as
checking after every token.

Each step attends over the written cache slots rounded up to a power of two
(:func:`decode_width`), not over the whole cache: a compiled step recompiles once per width
bucket (``log2(cache_len / 64)`` at most), and a 4,096-slot cache with a 300-token prompt reads
512 slots, not 4,096.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from mas.compile_budget import compile_with_budget
from mas.generation.layout import PromptBatch
from mas.generation.sampling import exponential_noise, sample_with_noise
from mas.masks import PAD

__all__ = ["DecodeOutput", "compiled_decode_step", "decode_step", "decode_tokens", "decode_width", "forward_one_token"]

#: Narrowest attention width of a decode step (smaller buckets would only add recompiles).
MIN_DECODE_WIDTH = 64


def forward_one_token(model: nn.Module, tokens: Tensor, mask: Tensor, input_pos: Tensor) -> Tensor:
    """The model part of a decode step (also the serving engine's decode forward).

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


def decode_step(
    model: nn.Module,
    token: Tensor,
    done: Tensor,
    slot: Tensor,
    position: Tensor,
    attendable: Tensor,
    stop: Tensor,
    noise: Optional[Tensor],
    *,
    width: int,
    temperature: float,
    top_k: Optional[int],
    top_p: Optional[float],
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Write ``token`` to cache slot ``slot``, choose the next token and update the stops.

    Pure tensors in and out (the keyword arguments are static), so it compiles to one graph per
    width bucket and never reads the device from the host.

    Args:
        model (nn.Module): the model with filled caches (the caches write at their own position,
            which equals ``slot``).
        token (Tensor): ``[b]`` the last chosen token.
        done (Tensor): ``[b]`` bool, rows that have chosen a stop token.
        slot (Tensor): ``[]`` int64, the cache slot ``token`` goes to.
        position (Tensor): ``[b]`` RoPE position of ``token``.
        attendable (Tensor): ``[b, L]`` bool, prompt slots holding a token and every slot from
            the first generated one on (see :func:`decode_tokens`).
        stop (Tensor): ``[n]`` stop token ids (may be empty).
        noise (Optional[Tensor]): ``[b, vocab]`` ``Exp(1)`` noise when sampling, else None.
        width (int): key slots attended (``> slot``; :func:`decode_width`).
        temperature, top_k, top_p: the token choice (:func:`~mas.generation.sampling.sample_with_noise`).

    Returns:
        Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]: the next token ``[b]``, the same with
        ``-1`` on rows that are done ``[b]``, the updated ``done``, ``slot + 1`` and
        ``position + 1``.
    """
    columns = torch.arange(width, device=token.device)
    # [b, L] -> [b, 1, width]: the generated token is causal, so in either attention mode it
    # sees every written slot, itself included (the row of build_attention_mask for query
    # ``slot``: tests/unit/generation/test_generation.py).
    mask = (attendable[:, :width] & (columns <= slot))[:, None, :]
    logits = forward_one_token(model, token[:, None], mask, position[:, None])
    next_token = sample_with_noise(logits, noise, temperature=temperature, top_k=top_k, top_p=top_p)
    done = done | torch.isin(next_token, stop)
    emitted = torch.where(done, torch.full_like(next_token, -1), next_token)
    return next_token, emitted, done, slot + 1, position + 1


#: Compiled decode-step signatures per mode and process (dynamo's default limit is 8): at most 12
#: widths (64 to 131,072 slots) for a full and a last, smaller batch of one cache length is 24.
DECODE_SHAPE_BUDGET = 64


@functools.lru_cache(maxsize=None)
def compiled_decode_step(mode: str = "default") -> Callable[..., Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]]:
    """:func:`decode_step` under ``torch.compile`` (static shapes, one graph), one wrapper per mode.

    Past :data:`DECODE_SHAPE_BUDGET` signatures (widths x batch sizes x cache lengths x sampling
    settings) it warns once and decodes uncompiled (:mod:`mas.compile_budget`), never silently.
    """
    return compile_with_budget(
        decode_step,
        name=f"compiled decode step (mode {mode})",
        max_shapes=DECODE_SHAPE_BUDGET,
        fix="use one max_cache_len, batch_size and sampling setting for every generate call in a process",
        mode=mode,
    )


@dataclass
class DecodeOutput:
    """What :func:`decode_tokens` returns.

    Attributes:
        emitted (Tensor): ``[b, n]`` chosen tokens, ``-1`` from a row's stop token on.
        done (Tensor): ``[b]`` bool, rows that chose a stop token.
        steps (int): decode steps run (``n - 1``: the first token comes from the prefill).
    """

    emitted: Tensor
    done: Tensor
    steps: int

    def rows(self) -> List[List[int]]:
        """Each row's tokens up to (not including) its stop token: one host read."""
        return [[t for t in row if t >= 0] for row in self.emitted.tolist()]


def decode_tokens(
    model: nn.Module,
    first_logits: Tensor,
    batch: PromptBatch,
    *,
    cache_len: int,
    max_new_tokens: int,
    stop_tokens: Sequence[int] = (),
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    stop_check_every: int = 8,
    step: Callable[..., Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]] = decode_step,
    keep_outputs: bool = False,
    generator: Optional[torch.Generator] = None,
    on_first_token: Optional[Callable[[], None]] = None,
) -> DecodeOutput:
    """Choose the first token from the prefill's logits, then decode up to ``max_new_tokens``.

    Args:
        model (nn.Module): the model, caches filled with the prompt (``batch.num_slots`` slots).
        first_logits (Tensor): ``[b, vocab]`` the prefill's last logits.
        batch (PromptBatch): the prompts (on the model's device).
        cache_len (int): cache slots.
        max_new_tokens (int): tokens to choose per row at most.
        stop_tokens (Sequence[int]): ids that end a row.
        temperature, top_k, top_p: the token choice.
        stop_check_every (int): read "every row stopped?" from the device every this many tokens.
        step: :func:`decode_step` or :func:`compiled_decode_step`.
        keep_outputs (bool): clone what ``step`` returns (CUDA graphs overwrite their outputs at
            the next replay).
        generator (Optional[torch.Generator]): the sampling noise's RNG.
        on_first_token (Optional[Callable]): called once the first token is chosen (timing).

    Returns:
        DecodeOutput: the emitted tokens.
    """
    device = first_logits.device
    choice = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    sampling = temperature > 0.0

    def noise() -> Optional[Tensor]:
        return exponential_noise(first_logits.shape, device, generator) if sampling else None

    def kept(t: Tensor) -> Tensor:
        return t.clone() if keep_outputs else t

    stop = torch.tensor(list(stop_tokens), device=device, dtype=torch.long)
    token = sample_with_noise(first_logits, noise(), **choice)
    done = torch.isin(token, stop)
    emitted = [torch.where(done, torch.full_like(token, -1), token)]
    if on_first_token is not None:
        on_first_token()
    # Prompt slots that hold a token, and every slot from the first generated one on (the step
    # cuts those at the slot it writes).
    prompt_slots = batch.num_slots
    attendable = torch.ones((first_logits.shape[0], cache_len), dtype=torch.bool, device=device)
    attendable[:, :prompt_slots] = batch.segment_ids != PAD
    slot = torch.tensor(prompt_slots, device=device)  # one copy per batch, not per token
    position = batch.lengths.clone()
    steps = 0
    for index in range(1, max_new_tokens):
        if index % stop_check_every == 0 and bool(done.all()):  # the loop's only host read
            break
        width = decode_width(prompt_slots + index, cache_len)
        token, out, done, slot, position = step(model, token, done, slot, position, attendable, stop, noise(), width=width, **choice)
        token, done, slot, position = kept(token), kept(done), kept(slot), kept(position)
        emitted.append(kept(out))
        steps += 1
    return DecodeOutput(torch.stack(emitted, dim=1), done, steps)
