"""Log-probabilities of chosen tokens and their most likely alternatives (OpenAI's ``logprobs``).

The values are the model's own next-token distribution, ``log_softmax`` of the raw logits,
before penalties, temperature and top-k/top-p (vLLM's default, ``raw_logprobs``): what the model
thinks of a token, whatever the sampler then did. The same function serves the three places that
score a token: the first token (from the prefill's logits), every decode step (inside the
compiled step, so no extra host read), and the prompt's own tokens (``echo``: the prefill's
logits at every prompt slot, the LM head run on those rows only, as ``mas_eval`` scores a
candidate answer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["MAX_LOGPROBS", "TokenLogprob", "is_prediction", "score_tokens", "token_logprobs"]

#: Most alternatives per token a request may ask for (OpenAI's ``top_logprobs`` limit).
MAX_LOGPROBS = 20


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability and the most likely tokens at its position.

    Attributes:
        token (int): the token's id.
        logprob (float): ``log p(token | everything before)``.
        top (Tuple[Tuple[int, float], ...]): ``(id, logprob)`` of the most likely tokens, most
            likely first (as many as the request asked for; may include ``token``).
    """

    token: int
    logprob: float
    top: Tuple[Tuple[int, float], ...] = ()


def score_tokens(logits: Tensor, tokens: Tensor, top: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Each row's log-probability of its token and its ``top`` most likely tokens.

    Traceable (no host read, static ``top``), so it runs inside the compiled decode step.

    Args:
        logits (Tensor): ``[n, vocab]`` raw next-token logits.
        tokens (Tensor): ``[n]`` long, the token each row chose (or the prompt's next token).
        top (int): alternatives per row (0: none).

    Returns:
        Tuple[Tensor, Tensor, Tensor]: ``[n]`` fp32 log-probabilities of ``tokens``, ``[n, top]``
        long ids and ``[n, top]`` fp32 log-probabilities of the most likely tokens.
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(-1, tokens[:, None]).squeeze(-1)
    values, ids = logprobs.topk(top, dim=-1)
    return chosen, ids, values


def token_logprobs(tokens: Sequence[int], chosen: Sequence[float], ids: Sequence[Sequence[int]], values: Sequence[Sequence[float]], top: Optional[int]) -> List[TokenLogprob]:
    """Host lists from :func:`score_tokens` as :class:`TokenLogprob` s, ``top`` alternatives each.

    Args:
        tokens, chosen: per token, its id and log-probability.
        ids, values: per token, at least ``top`` alternatives (more are dropped).
        top (Optional[int]): alternatives kept (None or 0: none).
    """
    keep = top or 0
    return [TokenLogprob(int(t), float(c), tuple(zip(map(int, i[:keep]), map(float, v[:keep])))) for t, c, i, v in zip(tokens, chosen, ids, values)]


def is_prediction(segment_ids: Sequence[int], attention: str) -> List[bool]:
    """For prompt tokens ``1 .. s-1``: whether the position before a token does not see it, so
    that its log-probability is a prediction.

    Under MAS a prompt token attends every token of its own segment, later ones included: inside
    a segment, position ``p - 1`` has seen token ``p``, and its "log-probability" of ``p`` is not
    a prediction (it is near 0 after fine-tuning). A segment's first token, causal tokens and
    every token under ``attention="causal"`` are predictions. Example (MAS), segments
    ``[0, 0, 1, 1, CAUSAL]`` -> ``[False, True, False, True]``.

    Args:
        segment_ids (Sequence[int]): ``[s]`` (``>= 0`` prompt segment, negative: causal).
        attention (str): ``"mas"`` or ``"causal"``.

    Returns:
        List[bool]: ``[s - 1]``.
    """
    if attention != "mas":
        return [True] * max(len(segment_ids) - 1, 0)
    return [not (cur >= 0 and cur == prev) for prev, cur in zip(segment_ids[:-1], segment_ids[1:])]
