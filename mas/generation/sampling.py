"""Next-token choice: greedy, temperature, top-k and top-p (nucleus) sampling.

Two ways to draw from the same filtered distribution:

- :func:`sample_with_noise` takes the randomness as a tensor of ``Exp(1)`` noise and picks
  ``argmax(p / noise)``, a draw from ``p`` (the exponential-race form of the Gumbel-max trick).
  It has no generator argument and no data-dependent shape, so it traces into a compiled decode
  step and never reads the device from the host. ``mas.generate`` draws every token this way.
- :func:`sample_with_generator` is one token choice of ``mas.generate``'s decode loop: one
  :func:`exponential_noise` draw of the logits' shape from a generator, then
  :func:`sample_with_noise`. The serving engine calls it per sequence with that sequence's own
  generator, so a seeded request draws exactly the tokens ``mas.generate`` draws for that prompt
  alone (batch size 1, same seed).
- :func:`sample_next_token` draws with ``torch.multinomial`` (the per-token reference loop in
  tests and benchmarks). Torch 2.13 happens to implement a one-sample multinomial as the same
  exponential race, but nothing here relies on that: generation and serving both draw through
  :func:`sample_with_noise`.

Greedy decoding (``temperature == 0``) is ``argmax`` on both paths.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["exponential_noise", "filtered_probs", "sample_next_token", "sample_with_generator", "sample_with_noise"]


def filtered_probs(logits: Tensor, *, temperature: float, top_k: Optional[int] = None, top_p: Optional[float] = None) -> Tensor:
    """The sampling distribution after temperature, top-k and top-p.

    Args:
        logits (Tensor): ``[b, vocab]`` next-token logits.
        temperature (float): softmax temperature (> 0).
        top_k (Optional[int]): keep the ``k`` most likely tokens.
        top_p (Optional[float]): keep the smallest set of tokens whose probability reaches ``p``.

    Returns:
        Tensor: ``[b, vocab]`` float32 probabilities (zero outside the kept tokens).
    """
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        # Everything below the k-th largest logit is out.
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already reach top_p (the top token always stays).
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


def sample_next_token(
    logits: Tensor,
    *,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Pick one token per row (``torch.multinomial``).

    Args:
        logits (Tensor): ``[b, vocab]`` next-token logits.
        temperature (float): 0 for greedy (argmax, deterministic); else the softmax temperature.
        top_k (Optional[int]): keep the ``k`` most likely tokens.
        top_p (Optional[float]): keep the smallest set of tokens whose probability reaches ``p``.
        generator (Optional[torch.Generator]): RNG for sampling (seeded runs are reproducible).

    Returns:
        Tensor: ``[b]`` token ids (int64).
    """
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    probs = filtered_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sample_with_noise(
    logits: Tensor,
    noise: Optional[Tensor],
    *,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
) -> Tensor:
    """Pick one token per row from pre-drawn noise (traceable, no host read).

    ``P(argmax_i p_i / E_i = j) = p_j`` for independent ``E_i ~ Exp(1)``, so this is a draw from
    the same distribution as :func:`sample_next_token` (not the same draw for a given seed).

    Args:
        logits (Tensor): ``[b, vocab]`` next-token logits.
        noise (Optional[Tensor]): ``[b, vocab]`` ``Exp(1)`` samples (:func:`exponential_noise`);
            unused (may be None) when greedy.
        temperature, top_k, top_p: as in :func:`sample_next_token`.

    Returns:
        Tensor: ``[b]`` token ids (int64).
    """
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    if noise is None:
        raise ValueError("sampling with temperature > 0 needs noise")
    probs = filtered_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    return (probs / noise).argmax(dim=-1)


def exponential_noise(shape: torch.Size, device: torch.device, generator: Optional[torch.Generator] = None) -> Tensor:
    """``Exp(1)`` samples for :func:`sample_with_noise` (a device kernel, no host read)."""
    noise = torch.empty(shape, device=device, dtype=torch.float32).exponential_(generator=generator)
    # A zero would turn a filtered-out token's 0 / 0 into NaN, which argmax could pick.
    return noise.clamp_min_(torch.finfo(torch.float32).tiny)


def sample_with_generator(
    logits: Tensor,
    *,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """One token choice as ``mas.generate``'s decode loop makes it (no host read).

    When sampling, draws exactly one ``exponential_noise(logits.shape)`` from ``generator`` on
    the logits' device, as each step of :func:`mas.generation.decode_tokens` does (prefill's
    first token, then one draw per decode step); greedy draws nothing. So calling it once per
    token with a generator seeded ``s`` on the model's device gives the tokens of
    ``mas.generate(..., seed=s, batch_size=1)`` for that prompt.

    Args:
        logits (Tensor): ``[b, vocab]`` next-token logits (``b == 1`` for one sequence's stream).
        temperature, top_k, top_p: as in :func:`sample_next_token`.
        generator (Optional[torch.Generator]): the noise's RNG (None: the device's default RNG).

    Returns:
        Tensor: ``[b]`` token ids (int64), on the logits' device.
    """
    noise = exponential_noise(logits.shape, logits.device, generator) if temperature > 0.0 else None
    return sample_with_noise(logits, noise, temperature=temperature, top_k=top_k, top_p=top_p)
