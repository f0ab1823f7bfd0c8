"""Qwen2.5 QLoRA builders that put every decoder projection in NF4 (see :mod:`mas.models._quantize`)."""

from __future__ import annotations

from typing import List

from torch import nn
from torchtune.models.qwen2_5 import lora_qwen2_5_3b, lora_qwen2_5_7b_base

from mas.models._quantize import quantize_frozen_linears

__all__ = ["qlora_qwen2_5_3b", "qlora_qwen2_5_7b_base"]


def qlora_qwen2_5_3b(
    lora_attn_modules: List[str],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
) -> nn.Module:
    """Qwen2.5-3B QLoRA: torchtune's ``lora_qwen2_5_3b`` with *every* decoder projection in NF4."""
    return quantize_frozen_linears(
        lora_qwen2_5_3b(
            lora_attn_modules=list(lora_attn_modules),
            apply_lora_to_mlp=apply_lora_to_mlp,
            apply_lora_to_output=apply_lora_to_output,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            use_dora=use_dora,
            quantize_base=True,
        )
    )


def qlora_qwen2_5_7b_base(
    lora_attn_modules: List[str],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
) -> nn.Module:
    """Qwen2.5-7B (base) QLoRA: ``lora_qwen2_5_7b_base`` with every decoder projection in NF4."""
    return quantize_frozen_linears(
        lora_qwen2_5_7b_base(
            lora_attn_modules=list(lora_attn_modules),
            apply_lora_to_mlp=apply_lora_to_mlp,
            apply_lora_to_output=apply_lora_to_output,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            use_dora=use_dora,
            quantize_base=True,
        )
    )
