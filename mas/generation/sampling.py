"""Next-token choice: greedy, temperature, top-k and top-p (nucleus) sampling."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["sample_next_token"]


def sample_next_token(
    logits: Tensor,
    *,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Pick one token per row.

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
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
