"""Training steps shared by the single-device and distributed recipes.

A batch from :func:`mas.data.collate_segmented` becomes model inputs in one place:
the leakage guard is applied to the labels, the attention mask is built once from
``segment_ids`` (MAS, or the same layout made causal for the baseline), and keys the model does
not accept are removed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
from torch import Tensor, nn

from mas.attention import AttentionBackend, AttentionMask, build_attention_mask
from mas.masks import PAD, AttentionMode, validate_attention_mode, validate_segment_ids
from mas.segments import IGNORE_INDEX, ignore_leaking_labels

__all__ = ["PreparedBatch", "prepare_batch", "summed_token_loss"]

_BATCH_KEYS = {"tokens", "labels", "segment_ids", "document_ids", "input_pos"}


@dataclass
class PreparedBatch:
    """Model inputs and shifted targets for one micro-batch.

    Attributes:
        tokens (Tensor): ``[b, s]``.
        mask (AttentionMask): BlockMask or bool ``[b, s, s]``.
        input_pos (Optional[Tensor]): ``[b, s]`` positions (packed rows), else None.
        targets (Tensor): ``[b, s]``; ``targets[:, i]`` is what position ``i`` predicts.
        num_targets (int): targets that count in the loss.
        num_tokens (int): real (non-padding) tokens, for throughput.
    """

    tokens: Tensor
    mask: AttentionMask
    input_pos: Optional[Tensor]
    targets: Tensor
    num_targets: int
    num_tokens: int

    def model_kwargs(self) -> Dict[str, Any]:
        kwargs: Dict[str, Any] = {"mask": self.mask}
        if self.input_pos is not None:
            kwargs["input_pos"] = self.input_pos
        return kwargs


def prepare_batch(
    batch: Dict[str, Tensor],
    *,
    attention: AttentionMode,
    device: torch.device,
    backend: AttentionBackend = "auto",
) -> PreparedBatch:
    """Collated batch -> :class:`PreparedBatch` on ``device``.

    Args:
        batch (Dict[str, Tensor]): ``tokens``, ``labels``, ``segment_ids`` and optionally
            ``document_ids``, ``input_pos`` (each ``[b, s]``).
        attention (str): ``"mas"`` or ``"causal"`` (the same layout with prompt segments
            made causal: the baseline runs on the same attention path).
        device (torch.device): where the step runs.
        backend (str): attention backend (see :class:`mas.attention.MASAttention`).

    Raises:
        ValueError: for unknown batch keys.
        ConfigError: for an unknown attention mode.
    """
    unknown = set(batch) - _BATCH_KEYS
    if unknown:
        raise ValueError(f"batch has keys the model cannot take: {sorted(unknown)}")
    validate_attention_mode(attention)
    # Checked on the CPU batch, so building the mask on the GPU needs no device sync.
    validate_segment_ids(batch["segment_ids"], batch.get("document_ids"))
    segment_ids = batch["segment_ids"].to(device)
    labels = ignore_leaking_labels(batch["labels"].to(device), segment_ids)
    document_ids = batch.get("document_ids")
    document_ids = document_ids.to(device) if document_ids is not None else None
    mask = build_attention_mask(segment_ids, document_ids, attention=attention, backend=backend, validate=False)
    # [b, s] labels -> [b, s] targets: position i predicts token i + 1.
    targets = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)
    input_pos = batch.get("input_pos")
    return PreparedBatch(
        tokens=batch["tokens"].to(device),
        mask=mask,
        input_pos=input_pos.to(device) if input_pos is not None else None,
        targets=targets,
        num_targets=int((targets != IGNORE_INDEX).sum()),
        num_tokens=int((segment_ids != PAD).sum()),
    )


def summed_token_loss(model: nn.Module, loss_fn: nn.Module, prepared: PreparedBatch) -> Tensor:
    """Forward pass and the *sum* of per-token losses (the recipe divides by the token count).

    Summing per micro-batch and dividing by the total over all accumulated micro-batches weighs
    every target token equally, however the tokens fall into micro-batches or ranks.
    """
    logits = model(prepared.tokens, **prepared.model_kwargs())
    if prepared.num_targets == 0:
        # Keep the graph connected (DDP/FSDP need every rank to run backward) with a zero loss.
        first = logits[0] if isinstance(logits, list) else logits
        return first.sum() * 0.0
    return loss_fn(logits, prepared.targets) * prepared.num_targets
