"""The LM head and the loss only where a label counts.

Under MAS a prompt token never has a target (the leakage guard), and padding has none, so on
instruction data ~90% of the positions carry no loss. The full-logits path still projects every
one of them to the vocabulary (``[b, s, v]``: the largest matmul and activation of a small model)
and runs cross-entropy over them. Here the final hidden states of the counted positions are
gathered first (``[b, s, d] -> [n, d]``), then normed, projected (tied or untied head, LoRA or
not) and scored: the same loss and gradients for a fraction of the FLOPs and memory.

The gather happens inside the model's own forward (its ``unembed`` step,
:func:`mas.lm_head.lm_head_on_rows`), so a sharded model's parameters are in the state its
forward expects, and the head is whatever ``model.output`` is. The slow twin is :func:`mas.training.steps.summed_token_loss` with
``lm_head_on_targets_only=False``; tests/unit/training/test_training_step.py compares them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mas.config import ConfigError
from mas.lm_head import has_unembed, lm_head_on_rows

__all__ = ["check_target_rows_loss", "summed_target_rows_loss"]


def check_target_rows_loss(model: nn.Module, loss_fn: nn.Module) -> None:
    """Refuse, with one line, a model or loss the targets-only path cannot serve.

    Raises:
        ConfigError: the model has no torchtune ``unembed`` step, or the loss no summed
            ``compute_cross_entropy(logits, targets)`` (as ``CEWithChunkedOutputLoss`` has).
    """
    if not has_unembed(model):
        raise ConfigError(
            f"lm_head_on_targets_only=True needs a torchtune TransformerDecoder (norm, unembed, output); "
            f"{type(model).__name__} has none: set lm_head_on_targets_only=False"
        )
    if not callable(getattr(loss_fn, "compute_cross_entropy", None)):
        raise ConfigError(
            f"lm_head_on_targets_only=True needs a loss with compute_cross_entropy(logits, targets) "
            f"(torchtune.modules.loss.CEWithChunkedOutputLoss); {type(loss_fn).__name__} has none: "
            "set lm_head_on_targets_only=False to use it on full logits"
        )


def summed_target_rows_loss(model: nn.Module, loss_fn: nn.Module, prepared: Any) -> Tensor:
    """Forward pass and the summed cross-entropy over the targets that count.

    Args:
        model (nn.Module): a torchtune ``TransformerDecoder``.
        loss_fn (nn.Module): provides ``compute_cross_entropy(logits [n, v], targets [n])``, the
            fp32 summed cross-entropy (``CEWithChunkedOutputLoss``; compiled by
            ``torchtune.training.compile_loss`` when ``compile: True``).
        prepared (PreparedBatch): a :class:`mas.training.steps.PreparedBatch` (``tokens``,
            ``model_kwargs()``, ``num_targets``, ``target_index`` and ``target_values``, ``[n]``
            each); not imported here, as ``steps`` imports this module.

    Returns:
        Tensor: scalar, the sum over the ``n`` counted targets.
    """
    with lm_head_on_rows(model, prepared.target_index):
        logits = model(prepared.tokens, **prepared.model_kwargs())
    if isinstance(logits, list):
        logits = logits[-1]
    if prepared.num_targets == 0:
        # Keep the graph connected (DDP/FSDP need every rank to run backward) with a zero loss;
        # the count is a host int, so this costs no sync.
        return logits.sum() * 0.0
    # The number of counted rows changes every batch: one dynamic dimension, not a recompile each.
    torch._dynamo.maybe_mark_dynamic(logits, 0)
    torch._dynamo.maybe_mark_dynamic(prepared.target_values, 0)
    return loss_fn.compute_cross_entropy(logits, prepared.target_values)
