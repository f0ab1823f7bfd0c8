"""What fine-tuning needs to build its LoRA model: the LoRA settings of the config, and an attention
backend that can train on the device. Loading weights and checking them lives in
:mod:`mas.model_weights`, shared with inference."""

from __future__ import annotations

import logging
from typing import Any, Dict

import torch
from omegaconf import DictConfig

from mas.attention import AttentionBackend, flex_supported
from mas.config import ConfigError

__all__ = [
    "LORA_KEYS",
    "check_attention_backend",
    "lora_settings",
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
