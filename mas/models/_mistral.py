"""Mistral-7B-v0.3: the one paper model torchtune 0.6.1 has no builder for.

torchtune builds Mistral-7B-v0.1; v0.3 is the same architecture with a 32768-token vocabulary and
``rope_theta`` 1e6, so these builders call torchtune's own Mistral component builders with v0.3's
dimensions.
"""

from __future__ import annotations

from typing import Any, Dict, List

from torch import nn
from torchtune.models.mistral import lora_mistral, mistral

__all__ = ["MISTRAL_7B_V0_3", "lora_mistral_7b_v0_3", "mistral_7b_v0_3", "qlora_mistral_7b_v0_3"]

#: Mistral-7B-v0.3 (``config.json`` of mistralai/Mistral-7B-v0.3): the v0.1 architecture with a
#: 32768-token vocabulary and ``rope_theta`` 1e6 (v0.1: 32000 and 1e4).
MISTRAL_7B_V0_3: Dict[str, Any] = dict(
    vocab_size=32_768,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    embed_dim=4096,
    intermediate_dim=14336,
    max_seq_len=32768,
    attn_dropout=0.0,
    norm_eps=1e-5,
    rope_base=1_000_000,
)


def mistral_7b_v0_3() -> nn.Module:
    """Mistral-7B-v0.3 (base) as a torchtune ``TransformerDecoder``."""
    return mistral(**MISTRAL_7B_V0_3)


def lora_mistral_7b_v0_3(
    lora_attn_modules: List[str],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
) -> nn.Module:
    """Mistral-7B-v0.3 with LoRA adapters (arguments as torchtune's ``lora_mistral_7b``).

    Args:
        lora_attn_modules (List[str]): attention projections to adapt (``q_proj``, ``k_proj``,
            ``v_proj``, ``output_proj``).
        apply_lora_to_mlp (bool): adapt the MLP (gate, up and down projections).
        apply_lora_to_output (bool): adapt the output projection.
        lora_rank (int), lora_alpha (float), lora_dropout (float): LoRA hyper-parameters.
        use_dora (bool): DoRA instead of LoRA.
        quantize_base (bool): NF4 base weights (QLoRA); torchtune's builder then registers the
            state-dict hook that restores them to bf16 when saving.
    """
    return lora_mistral(
        lora_attn_modules=list(lora_attn_modules),
        apply_lora_to_mlp=apply_lora_to_mlp,
        apply_lora_to_output=apply_lora_to_output,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
        **MISTRAL_7B_V0_3,
    )


def qlora_mistral_7b_v0_3(
    lora_attn_modules: List[str],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
) -> nn.Module:
    """Mistral-7B-v0.3 with LoRA adapters over NF4 base weights (QLoRA); see :func:`lora_mistral_7b_v0_3`."""
    return lora_mistral_7b_v0_3(
        lora_attn_modules,
        apply_lora_to_mlp=apply_lora_to_mlp,
        apply_lora_to_output=apply_lora_to_output,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=True,
    )
