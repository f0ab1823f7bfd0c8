"""Log-probabilities in OpenAI's and vLLM's response layouts.

The engine scores tokens (:mod:`mas.generation.logprobs`); this module only writes them out:

- chat (``logprobs: true``, ``top_logprobs: k``): ``{"content": [{"token", "logprob", "bytes",
  "top_logprobs": [...]}]}`` per choice;
- completions (``logprobs: k``): ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``
  per choice, the prompt's tokens first with ``echo`` (its first token has no log-probability:
  ``null``);
- ``prompt_logprobs: k`` (vLLM's field, both endpoints): one entry per prompt token, ``null``
  for the first and for tokens that are not predictions under the served mask (inside a MAS
  segment the position before a token sees it; :func:`mas.generation.logprobs.is_prediction`),
  else ``{id: {"logprob", "rank", "decoded_token"}}`` for the token and its alternatives.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

from mas.generation.logprobs import TokenLogprob

__all__ = ["TokenText", "chat_logprobs", "completion_logprobs", "vllm_prompt_logprobs"]

#: A token id's text (the tokenizer's ``decode([id])``).
TokenText = Callable[[int], str]


def _entry(text: TokenText, token: int, logprob: float) -> Dict[str, Any]:
    piece = text(token)
    return {"token": piece, "logprob": logprob, "bytes": list(piece.encode("utf-8"))}


def chat_logprobs(scores: Sequence[TokenLogprob], text: TokenText) -> Dict[str, Any]:
    """A chat choice's (or chunk's) ``logprobs`` object for generated tokens."""
    content = []
    for s in scores:
        entry = _entry(text, s.token, s.logprob)
        entry["top_logprobs"] = [_entry(text, i, v) for i, v in s.top]
        content.append(entry)
    return {"content": content}


def completion_logprobs(scores: Sequence[Optional[TokenLogprob]], tokens: Sequence[int], text: TokenText, offset: int = 0) -> Dict[str, Any]:
    """A completion choice's (or chunk's) ``logprobs`` object.

    Args:
        scores: per token, its score or None (the prompt's first token, or a prompt token that
            is not a prediction).
        tokens: the tokens, in order.
        text: an id's text.
        offset (int): characters of text before the first token (``text_offset``).
    """
    pieces = [text(t) for t in tokens]
    offsets = []
    for piece in pieces:
        offsets.append(offset)
        offset += len(piece)
    top: List[Optional[Dict[str, float]]] = []
    for s in scores:
        if s is None:
            top.append(None)
            continue
        alternatives: Dict[str, float] = {}
        for i, v in s.top:
            alternatives.setdefault(text(i), v)  # two ids with one text: the likelier one
        top.append(alternatives)
    return {"tokens": pieces, "token_logprobs": [None if s is None else s.logprob for s in scores], "top_logprobs": top, "text_offset": offsets}


def vllm_prompt_logprobs(scores: Sequence[Optional[TokenLogprob]], text: TokenText) -> List[Optional[Dict[str, Dict[str, Any]]]]:
    """vLLM's ``prompt_logprobs``: per prompt token None or ``{id: {logprob, rank, decoded_token}}``
    (the token itself, then its alternatives; ``rank`` 1 is the most likely)."""
    out: List[Optional[Dict[str, Dict[str, Any]]]] = []
    for s in scores:
        if s is None:
            out.append(None)
            continue
        ranked = {i: r + 1 for r, (i, _) in enumerate(s.top)}
        entry = {str(s.token): {"logprob": s.logprob, "rank": ranked.get(s.token), "decoded_token": text(s.token)}}
        for i, v in s.top:
            entry.setdefault(str(i), {"logprob": v, "rank": ranked[i], "decoded_token": text(i)})
        out.append(entry)
    return out
