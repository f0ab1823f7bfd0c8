"""Tiny models for generation tests."""

from __future__ import annotations

import torch
from torch import nn

import mas


def varied_tiny_model(seed: int = 0) -> nn.Module:
    """The tiny Llama 3.2 with MAS attention, eval mode, weights spread so that greedy decoding
    does not collapse onto one repeated token (a weak check of "same tokens")."""
    from mas.models import tiny_llama3_2

    torch.manual_seed(seed)
    model = tiny_llama3_2()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0 if p.dim() > 1 else 1.0)
        model.tok_embeddings.weight.mul_(0.05)
    mas.use_mas_attention(model)
    return model.eval()
