"""Training steps shared by the single-device and distributed recipes.

A batch from :func:`mas.data.collate_segmented` becomes model inputs in two phases:

1. :func:`prepare_host_batch`, on the CPU (in the DataLoader, so in its workers when there are
   any): the ids are checked, the leakage guard is applied to the labels, the targets are
   shifted, counted and their flat positions listed, and the CPU attention's key windows are
   planned. Every value the step needs on the host is read here, where reading costs no device
   sync.
2. :func:`prepare_batch`, on the step's device: a (non-blocking) copy and the attention mask,
   built once from ``segment_ids`` (MAS, or the same layout made causal for the baseline). No
   host read of a device tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Dict, List, Optional, Union

import torch
from torch import Tensor, nn

from mas.attention import AttentionBackend, AttentionMask, build_attention_mask
from mas.masks import PAD, AttentionMode, validate_attention_mode, validate_segment_ids
from mas.segments import IGNORE_INDEX, ignore_leaking_labels
from mas.training.loss import summed_target_rows_loss
from mas.windowed_sdpa import Window, plan_key_windows

__all__ = ["HostBatch", "PreparedBatch", "prepare_batch", "prepare_host_batch", "summed_token_loss"]

_BATCH_KEYS = {"tokens", "labels", "segment_ids", "document_ids", "input_pos"}


@dataclass
class HostBatch:
    """A collated batch checked, shifted and counted on the CPU, ready to copy to the device.

    Attributes:
        tokens (Tensor): ``[b, s]``.
        segment_ids (Tensor): ``[b, s]``.
        document_ids (Optional[Tensor]): ``[b, s]`` for packed rows, else None.
        input_pos (Optional[Tensor]): ``[b, s]`` positions for packed rows, else None.
        targets (Tensor): ``[b, s]``; ``targets[:, i]`` is what position ``i`` predicts
            (``IGNORE_INDEX`` where nothing counts).
        target_index (Tensor): ``[n]`` flat positions (into ``b * s``) whose target counts.
        target_values (Tensor): ``[n]`` those targets, ``targets.flatten()[target_index]``.
        num_targets (int): ``n``, the targets that count in the loss.
        num_tokens (int): real (non-padding) tokens, for throughput.
        key_windows (Optional[List[Window]]): query tiles (cut where documents start, at most
            :data:`mas.windowed_sdpa.MAX_TILE` queries) and the keys each may see, planned by
            :func:`mas.windowed_sdpa.plan_key_windows` for the MAS layout (so also the causal one):
            the CPU dense mask is built and attended only there. None where the step runs
            FlexAttention (its BlockMask has its own tiles); the mask builder then plans itself
            if it needs them.
    """

    tokens: Tensor
    segment_ids: Tensor
    document_ids: Optional[Tensor]
    input_pos: Optional[Tensor]
    targets: Tensor
    target_index: Tensor
    target_values: Tensor
    num_targets: int
    num_tokens: int
    key_windows: Optional[List[Window]] = None

    def pin_memory(self) -> "HostBatch":
        """Page-locked copies (the DataLoader calls this with ``pin_memory=True``)."""
        return replace(self, **{f.name: getattr(self, f.name).pin_memory() for f in fields(self) if _is_tensor(self, f.name)})


def _is_tensor(batch: HostBatch, name: str) -> bool:
    return isinstance(getattr(batch, name), Tensor)


def prepare_host_batch(batch: Union[Dict[str, Tensor], HostBatch], *, plan_windows: bool = True) -> HostBatch:
    """Collated CPU batch -> :class:`HostBatch` (checks, leakage guard, shift, counts, key windows).

    Args:
        batch (Dict[str, Tensor]): ``tokens``, ``labels``, ``segment_ids`` and optionally
            ``document_ids``, ``input_pos`` (each ``[b, s]``, on the CPU). A HostBatch is
            returned as is.
        plan_windows (bool): plan the CPU attention's key windows (False where the step runs
            FlexAttention, which does not use them).

    Raises:
        ValueError: for unknown batch keys or ids that break the segment convention.
    """
    if isinstance(batch, HostBatch):
        return batch
    unknown = set(batch) - _BATCH_KEYS
    if unknown:
        raise ValueError(f"batch has keys the model cannot take: {sorted(unknown)}")
    segment_ids = batch["segment_ids"]
    validate_segment_ids(segment_ids, batch.get("document_ids"))
    labels = ignore_leaking_labels(batch["labels"], segment_ids)
    # [b, s] labels -> [b, s] targets: position i predicts token i + 1.
    targets = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)
    flat_targets = targets.flatten()
    target_index = (flat_targets != IGNORE_INDEX).nonzero().squeeze(1)  # [n]
    return HostBatch(
        tokens=batch["tokens"],
        segment_ids=segment_ids,
        document_ids=batch.get("document_ids"),
        input_pos=batch.get("input_pos"),
        targets=targets,
        target_index=target_index,
        target_values=flat_targets.index_select(0, target_index),
        num_targets=target_index.numel(),
        num_tokens=int((segment_ids != PAD).sum()),
        key_windows=plan_key_windows(segment_ids, batch.get("document_ids")) if plan_windows else None,
    )


@dataclass
class PreparedBatch:
    """Model inputs and shifted targets for one micro-batch, on the step's device.

    Attributes:
        tokens (Tensor): ``[b, s]``.
        mask (AttentionMask): BlockMask or bool ``[b, s, s]``.
        input_pos (Optional[Tensor]): ``[b, s]`` positions (packed rows), else None.
        targets (Tensor): ``[b, s]``; ``targets[:, i]`` is what position ``i`` predicts.
        target_index (Tensor): ``[n]`` flat positions (into ``b * s``) whose target counts.
        target_values (Tensor): ``[n]`` the targets at those positions.
        num_targets (int): ``n``, targets that count in the loss (counted on the CPU).
        num_tokens (int): real (non-padding) tokens, for throughput (counted on the CPU).
    """

    tokens: Tensor
    mask: AttentionMask
    input_pos: Optional[Tensor]
    targets: Tensor
    target_index: Tensor
    target_values: Tensor
    num_targets: int
    num_tokens: int

    def model_kwargs(self) -> Dict[str, Any]:
        kwargs: Dict[str, Any] = {"mask": self.mask}
        if self.input_pos is not None:
            kwargs["input_pos"] = self.input_pos
        return kwargs


def prepare_batch(
    batch: Union[Dict[str, Tensor], HostBatch],
    *,
    attention: AttentionMode,
    device: torch.device,
    backend: AttentionBackend = "auto",
) -> PreparedBatch:
    """Collated batch (or :class:`HostBatch`) -> :class:`PreparedBatch` on ``device``.

    Args:
        batch (Dict[str, Tensor] or HostBatch): a collated CPU batch (``tokens``, ``labels``,
            ``segment_ids``, optionally ``document_ids``, ``input_pos``, each ``[b, s]``), or
            one :func:`prepare_host_batch` already prepared (the recipe's loader does).
        attention (str): ``"mas"`` or ``"causal"`` (the same layout with prompt segments
            made causal: the baseline runs on the same attention path).
        device (torch.device): where the step runs.
        backend (str): attention backend (see :class:`mas.attention.MASAttention`).

    Raises:
        ValueError: for unknown batch keys.
        ConfigError: for an unknown attention mode.
    """
    validate_attention_mode(attention)
    host = prepare_host_batch(batch)

    def to_device(t: Optional[Tensor]) -> Optional[Tensor]:
        # Asynchronous from pinned memory; a plain copy otherwise.
        return None if t is None else t.to(device, non_blocking=True)

    segment_ids = to_device(host.segment_ids)
    # Ids were checked on the CPU batch, so building the mask on the GPU needs no device sync.
    mask = build_attention_mask(
        segment_ids,
        to_device(host.document_ids),
        attention=attention,
        backend=backend,
        validate=False,
        key_windows=host.key_windows,
    )
    return PreparedBatch(
        tokens=to_device(host.tokens),
        mask=mask,
        input_pos=to_device(host.input_pos),
        targets=to_device(host.targets),
        target_index=to_device(host.target_index),
        target_values=to_device(host.target_values),
        num_targets=host.num_targets,
        num_tokens=host.num_tokens,
    )


def summed_token_loss(
    model: nn.Module, loss_fn: nn.Module, prepared: PreparedBatch, *, lm_head_on_targets_only: bool = True
) -> Tensor:
    """Forward pass and the *sum* of per-token losses (the recipe divides by the token count).

    Summing per micro-batch and dividing by the total over all accumulated micro-batches weighs
    every target token equally, however the tokens fall into micro-batches or ranks.

    Args:
        model (nn.Module): a torchtune ``TransformerDecoder``.
        loss_fn (nn.Module): the configured loss; with ``lm_head_on_targets_only`` its
            ``compute_cross_entropy`` (see :mod:`mas.training.loss`).
        prepared (PreparedBatch): the micro-batch.
        lm_head_on_targets_only (bool): apply the output projection and the loss only at the
            positions whose target counts (:func:`mas.training.loss.summed_target_rows_loss`);
            False: full ``[b, s, v]`` logits, then ``loss_fn`` (the slow twin).

    Returns:
        Tensor: scalar, the summed loss.
    """
    if lm_head_on_targets_only:
        return summed_target_rows_loss(model, loss_fn, prepared)
    logits = model(prepared.tokens, **prepared.model_kwargs())
    if prepared.num_targets == 0:
        # Keep the graph connected (DDP/FSDP need every rank to run backward) with a zero loss.
        first = logits[0] if isinstance(logits, list) else logits
        return first.sum() * 0.0
    return loss_fn(logits, prepared.targets) * prepared.num_targets
