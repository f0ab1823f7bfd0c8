"""The MAS prefill: prompt chunks of several rows in one forward, written to the slot cache.

The prompt is known whole at prefill, so each prompt segment attends bidirectionally (the mask
comes from :func:`mas.attention.build_attention_mask`, the one mask entry point, as in training
and scoring). Only the slots whose next-token logits are used reach the LM head.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from mas.attention import AttentionBackend, build_attention_mask
from mas.generation.layout import PromptBatch
from mas.lm_head import has_unembed, logits_at_positions
from mas.masks import AttentionMode

__all__ = ["prefill"]


def prefill(
    model: nn.Module,
    batch: PromptBatch,
    *,
    attention: AttentionMode = "mas",
    backend: AttentionBackend = "auto",
    logits_at: Optional[Tensor] = None,
    rows_at: Optional[Tensor] = None,
) -> Tensor:
    """Run the query slots ``[batch.prefix_len, P)`` of every row in one pass and fill the cache.

    The caches' plan must name the batch's rows and slots (the engine sets it).

    Args:
        model (nn.Module): a torchtune decoder with MAS attention and slot caches.
        batch (PromptBatch): the rows (on the model's device).
        attention (str): ``"mas"`` or ``"causal"``.
        backend (str): attention backend for the prefill mask.
        logits_at (Optional[Tensor]): ``[b]`` long, on the model's device: per row, the query slot
            (0 is slot ``prefix_len``) whose next-token logits are wanted, e.g. its last prompt
            token. The LM head then runs on those ``b`` positions only
            (:func:`mas.lm_head.logits_at_positions`). None: every query slot.
        rows_at (Optional[Tensor]): ``[n]`` long: the row of each entry of ``logits_at``, which
            is then ``[n]`` too (several slots of a row); None: ``logits_at`` has one slot per row.

    Returns:
        Tensor: with ``logits_at``, ``[b, vocab]`` (``[n, vocab]`` with ``rows_at``) fp32
        logits; else ``[b, P - prefix_len, vocab]``.
    """
    start = batch.prefix_len
    # Prompt widths change every batch: compiling the block tables per shape would not pay.
    mask = build_attention_mask(
        batch.segment_ids,
        attention=attention,
        backend=backend,
        query_start=start,
        query_len=batch.num_slots - start,
        compile_block_tables=False,
    )
    tokens, positions = batch.tokens[:, start:], batch.positions[:, start:]
    if logits_at is None:
        return _as_logits(model(tokens, mask=mask, input_pos=positions))
    rows = torch.arange(tokens.shape[0], device=tokens.device) if rows_at is None else rows_at
    if not has_unembed(model):  # every slot, then the chosen ones (the slow twin)
        return _as_logits(model(tokens, mask=mask, input_pos=positions))[rows, logits_at].float()
    return logits_at_positions(model, tokens, rows, logits_at, mask=mask, input_pos=positions)


def _as_logits(output: Any) -> Tensor:
    """Model output as one ``[b, s, vocab]`` tensor (a model set up for the chunked training loss
    returns a list of sequence chunks)."""
    return torch.cat(output, dim=1) if isinstance(output, list) else output
