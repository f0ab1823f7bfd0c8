"""The LM head on chosen rows only.

Most positions of a forward never need next-token logits: under MAS a prompt token has no
training target (the leakage guard), a scored candidate needs only the positions that predict its
answer tokens, and a prefill needs only each row's last prompt token. Projecting every position
instead costs the largest matmul of a small model and a ``[b, s, vocab]`` activation (at Llama 3's
128,256 tokens, 0.25 MiB per position in bf16, twice that in fp32).

:func:`lm_head_on_rows` makes a torchtune ``TransformerDecoder`` gather the final hidden states
of the chosen rows before its norm and output projection (tied or untied, LoRA or not). The
gather happens inside the model's own forward (its ``unembed`` step), so a sharded model's
parameters are in the state its forward expects. Used by the training loss
(:mod:`mas.training.loss`), log-likelihood scoring (:mod:`mas.evaluation.loglik`) and prefill
(:func:`mas.generation.prefill`); each keeps the full-logits path as its slow twin.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from torch import Tensor, nn

__all__ = ["has_unembed", "lm_head_on_rows", "logits_at_positions"]


def has_unembed(model: nn.Module) -> bool:
    """Whether ``model`` is a decoder :func:`lm_head_on_rows` can serve (torchtune's ``unembed``
    step, a final ``norm`` and an ``output`` projection)."""
    return callable(getattr(type(model), "unembed", None)) and hasattr(model, "output") and hasattr(model, "norm")


@contextmanager
def lm_head_on_rows(model: nn.Module, rows: Tensor) -> Iterator[None]:
    """Within the block, ``model(tokens, ...)`` returns logits of ``rows`` only.

    The decoder's ``unembed`` (final norm, then output projection) is replaced for the call by
    one that first gathers the rows; chunked output is skipped (the few gathered rows need no
    chunking). The instance attribute is removed on exit, leaving the model as it was.

    Args:
        model (nn.Module): a torchtune ``TransformerDecoder`` (:func:`has_unembed`).
        rows (Tensor): ``[n]`` flat positions into ``b * s``, on the model's device.

    Yields:
        None. Inside, the forward returns fp32 logits ``[n, v]`` (or a list ending with them
        when the model outputs hidden states).
    """

    def unembed_rows(h: Tensor) -> Tensor:
        # [b, s, d] -> [b * s, d] -> [n, d]: norm and head are per position, so gathering first
        # gives the same rows of the full [b, s, v] logits.
        h = h.flatten(0, 1).index_select(0, rows)
        return model.output(model.norm(h)).float()

    model.unembed = unembed_rows
    try:
        yield
    finally:
        del model.unembed


def logits_at_positions(model: nn.Module, tokens: Tensor, row: Tensor, position: Tensor, **forward_kwargs: Any) -> Tensor:
    """``model(tokens, **forward_kwargs)``'s next-token logits at ``(row, position)`` pairs only.

    Args:
        model (nn.Module): a torchtune ``TransformerDecoder`` (:func:`has_unembed`).
        tokens (Tensor): ``[b, s]`` input ids, on the model's device.
        row (Tensor), position (Tensor): ``[n]`` long each, on the model's device.
        **forward_kwargs: the rest of the forward (``mask``, ``input_pos``).

    Returns:
        Tensor: ``[n, vocab]`` fp32, equal to ``model(tokens)[row, position]``.
    """
    with lm_head_on_rows(model, row * tokens.shape[1] + position):
        out = model(tokens, **forward_kwargs)
    return out[-1] if isinstance(out, list) else out
