"""Build a LoRA model from a config, load base weights, and check it against the tokenizer."""

from __future__ import annotations

import logging
from typing import Any, Dict

import torch
from omegaconf import DictConfig
from torch import nn

from mas.attention import AttentionBackend, flex_supported
from mas.config import ConfigError

__all__ = [
    "LORA_KEYS",
    "check_lora_values",
    "check_vocab",
    "lora_settings",
    "tokenizer_vocab_size",
]

log = logging.getLogger(__name__)

LORA_KEYS = (
    "lora_attn_modules",
    "apply_lora_to_mlp",
    "apply_lora_to_output",
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "use_dora",
)
_LORA_DEFAULTS = {"apply_lora_to_mlp": False, "apply_lora_to_output": False, "lora_dropout": 0.0, "use_dora": False}


def check_attention_backend(backend: AttentionBackend, device: torch.device) -> None:
    """Fail fast when the asked-for backend cannot train on ``device``."""
    if backend not in ("auto", "flex", "sdpa"):
        raise ConfigError(f"attention_backend must be auto, flex or sdpa, got {backend!r}")
    if backend == "flex" and not flex_supported(device):
        raise ConfigError(
            f"attention_backend=flex cannot train on {device}: FlexAttention needs CUDA with compute "
            "capability >= 7.5 for its backward pass (torch 2.13 has no CPU backward). Use "
            "attention_backend=auto, which falls back to SDPA with the dense MAS mask."
        )


def check_lora_values(model_cfg: Any) -> None:
    """The LoRA numbers of a model node, checked before anything is built (a rank of 0 would
    divide by zero inside the builder).

    Raises:
        ConfigError: naming ``model.<key>`` and its allowed range.
    """
    rules = (
        ("lora_rank", lambda v: v >= 1, ">= 1"),
        ("lora_alpha", lambda v: v > 0, "> 0"),
        ("lora_dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    )
    for key, ok, allowed in rules:
        value = model_cfg.get(key) if model_cfg is not None else None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not ok(value):
            raise ConfigError(f"model.{key} must be {allowed}, got {value!r}")


def lora_settings(model_cfg: DictConfig) -> Dict[str, Any]:
    """The LoRA hyper-parameters of a LoRA model config (for the PEFT adapter config)."""
    missing = [k for k in ("lora_attn_modules", "lora_rank", "lora_alpha") if k not in model_cfg]
    if missing:
        raise ConfigError(
            f"model: {model_cfg.get('_component_')} is not configured as a LoRA model (missing {missing}); "
            "use a lora_* builder"
        )
    settings = {k: model_cfg.get(k, _LORA_DEFAULTS.get(k)) for k in LORA_KEYS}
    settings["lora_attn_modules"] = list(settings["lora_attn_modules"])
    return settings


def tokenizer_vocab_size(tokenizer: Any) -> int:
    """The number of ids the tokenizer can emit (largest id + 1), across tokenizer families."""
    for attr in ("vocab_size",):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    ids = []
    encoder = getattr(tokenizer, "encoder", None)
    if encoder:
        ids.append(max(encoder.values()))
    special = getattr(tokenizer, "special_tokens", None)
    if special:
        ids.append(max(special.values()))
    if not ids:
        raise ConfigError(f"cannot tell the vocabulary size of {type(tokenizer).__name__}")
    return max(ids) + 1


def check_vocab(tokenizer: Any, model: nn.Module) -> None:
    """Every id the tokenizer emits must have an embedding row."""
    embedding = getattr(model, "tok_embeddings", None)
    if embedding is None:
        return
    needed = tokenizer_vocab_size(tokenizer)
    have = embedding.num_embeddings
    if needed > have:
        raise ConfigError(
            f"vocab size mismatch: the tokenizer emits ids up to {needed - 1} but the model has only "
            f"{have} embedding rows; the tokenizer and model checkpoint do not belong together"
        )


def load_adapter_state(model: nn.Module, adapter_state: Dict[str, torch.Tensor]) -> None:
    """Load LoRA weights (torchtune names), requiring an exact match with the model's adapters."""
    from torchtune.modules.peft import get_adapter_params

    expected = set(get_adapter_params(model))
    given = set(adapter_state)
    if given != expected:
        raise ConfigError(
            "the adapter does not fit the model: "
            f"missing {sorted(expected - given)[:4]}, unexpected {sorted(given - expected)[:4]}"
        )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in adapter_state.items():
            if params[name].shape != value.shape:
                raise ConfigError(
                    f"the adapter does not fit the model: {name} has shape {tuple(value.shape)}, "
                    f"the model expects {tuple(params[name].shape)} (different base model or LoRA rank?)"
                )
            params[name].copy_(value)
