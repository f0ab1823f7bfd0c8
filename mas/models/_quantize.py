"""QLoRA with every decoder projection in NF4, not only the adapted ones.

torchtune 0.6.1's Qwen2 LoRA builders quantize only the projections that carry an adapter: with
LoRA on q and v, k, o and the whole MLP stay bf16 and QLoRA saves little. Its Llama and Mistral
QLoRA builders quantize all of them; :func:`quantize_frozen_linears` does the same for any model.
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn
from torchtune.modules.low_precision import FrozenNF4Linear

__all__ = ["lora_with_nf4_base", "quantize_frozen_linears"]

_BASE_PROJECTIONS = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.output_proj", "mlp.w1", "mlp.w2", "mlp.w3")


def quantize_frozen_linears(model: nn.Module) -> nn.Module:
    """Turn every plain (non-LoRA) projection of the decoder layers into an NF4 ``FrozenNF4Linear``.

    The replacements have the same shapes, bias and parameter names, so HF checkpoints load
    unchanged. The bf16 weights exist until swapped, layer by layer after the model is built, so
    building needs about the bf16 model's memory once.
    """
    for layer in model.layers:
        for path in _BASE_PROJECTIONS:
            parent_path, _, leaf = path.rpartition(".")
            parent = layer.get_submodule(parent_path)
            linear = getattr(parent, leaf)
            if type(linear) is not nn.Linear:  # a LoRALinear (already NF4) or already swapped
                continue
            setattr(
                parent,
                leaf,
                FrozenNF4Linear(
                    linear.in_features,
                    linear.out_features,
                    bias=linear.bias is not None,
                    device=linear.weight.device,
                    dtype=linear.weight.dtype,
                ),
            )
    model._mas_quantized_after_build = True  # for tools/estimate_memory.py: bf16 existed while building
    return model


def lora_with_nf4_base(builder: str, **builder_kwargs: Any) -> nn.Module:
    """Any torchtune LoRA builder (a dotpath) as QLoRA, every decoder projection in NF4.

    Args:
        builder (str): e.g. ``torchtune.models.qwen2.lora_qwen2``.
        **builder_kwargs: its arguments (``quantize_base`` is set to True).
    """
    module, _, name = builder.rpartition(".")
    build = getattr(importlib.import_module(module), name)
    return quantize_frozen_linears(build(**{**builder_kwargs, "quantize_base": True}))
