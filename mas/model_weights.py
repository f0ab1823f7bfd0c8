"""Weights into a model: base checkpoints, LoRA adapters, and the checks that they belong together.

Fine-tuning and inference load through here, so both refuse the same mistakes with the same
messages: a base checkpoint that does not cover the model, an adapter for another LoRA shape, a
tokenizer larger than the embedding. :func:`load_adapter` is the one way to put an adapter
folder's weights into a model (``mas_generate``, ``mas_eval`` and its checkpoint sweep,
``mas_serve``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import nn

from mas.checkpointing import (
    ADAPTER_WEIGHTS_FILE,
    HFModelInfo,
    latest_checkpoint,
    load_peft_adapter,
    peft_target_modules,
    peft_to_adapter,
)
from mas.errors import ConfigError

__all__ = [
    "LoadedAdapter",
    "check_lora_values",
    "check_vocab",
    "load_adapter",
    "load_adapter_state",
    "load_base_state",
    "resolve_adapter_folder",
    "tokenizer_vocab_size",
]

log = logging.getLogger(__name__)


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


def load_base_state(model: nn.Module, base_state: Dict[str, torch.Tensor]) -> None:
    """Load base weights; every non-adapter parameter must be covered, nothing may be left over."""
    from torchtune.modules.peft import get_adapter_params

    missing, unexpected = model.load_state_dict(base_state, strict=False)
    adapter_names = set(get_adapter_params(model))
    missing_base = [k for k in missing if k not in adapter_names]
    if missing_base or unexpected:
        raise ConfigError(
            "the base checkpoint does not fit the model: "
            f"missing {missing_base[:5]}{'...' if len(missing_base) > 5 else ''}, "
            f"unexpected {list(unexpected)[:5]}{'...' if len(unexpected) > 5 else ''}"
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


def resolve_adapter_folder(path: str | os.PathLike) -> Path:
    """The adapter folder ``path`` names: a checkpoint folder itself, or a run folder's latest
    complete checkpoint.

    Raises:
        ConfigError: neither holds an adapter.
    """
    path = Path(path)
    if (path / ADAPTER_WEIGHTS_FILE).exists():
        return path
    latest = latest_checkpoint(path) if path.exists() else None
    if latest is not None:
        return latest
    raise ConfigError(f"adapter file not found: {path / ADAPTER_WEIGHTS_FILE} (nor a run folder with checkpoints/latest)")


def _check_lora_shape(adapter_config: Dict[str, Any], model_cfg: Any, path: Path) -> None:
    mismatches = []
    for key, cfg_key in (("r", "lora_rank"), ("lora_alpha", "lora_alpha")):
        if cfg_key in model_cfg and float(adapter_config.get(key, -1)) != float(model_cfg[cfg_key]):
            mismatches.append(f"{key}={adapter_config.get(key)} (config {cfg_key}={model_cfg[cfg_key]})")
    if "lora_attn_modules" in model_cfg:
        wanted = peft_target_modules(
            list(model_cfg.lora_attn_modules),
            model_cfg.get("apply_lora_to_mlp", False),
            model_cfg.get("apply_lora_to_output", False),
        )
        if sorted(wanted) != sorted(adapter_config.get("target_modules", [])):
            mismatches.append(f"target_modules={adapter_config.get('target_modules')} (config gives {wanted})")
    if mismatches:
        raise ConfigError(f"adapter {path} does not match the model config: " + "; ".join(mismatches))


@dataclass(frozen=True)
class LoadedAdapter:
    """An adapter now in the model.

    Attributes:
        path (Path): the checkpoint folder it came from.
        config (dict): its PEFT ``adapter_config.json`` (with the ``"mas"`` settings of training).
    """

    path: Path
    config: Dict[str, Any]


def load_adapter(
    model: nn.Module,
    adapter_checkpoint: str | os.PathLike,
    info: HFModelInfo,
    *,
    model_cfg: Optional[Any] = None,
) -> LoadedAdapter:
    """Put an adapter folder's LoRA weights into a model that holds its base weights.

    Args:
        model (nn.Module): a LoRA model (``lora_*`` builder) with the base weights loaded.
        adapter_checkpoint: a checkpoint folder (``.../checkpoints/step_N``), a PEFT adapter
            folder, or a run's ``output_dir`` (its latest checkpoint).
        info (HFModelInfo): the base checkpoint's architecture (PEFT names are converted for it).
        model_cfg: the model node; when given, the adapter's rank, alpha and target modules must
            equal its LoRA keys.

    Raises:
        ConfigError: a missing adapter file, a model without LoRA layers, or an adapter of
            another LoRA shape or base architecture.
    """
    from torchtune.modules.peft import get_adapter_params

    path = resolve_adapter_folder(adapter_checkpoint)
    try:
        peft_weights, adapter_config = load_peft_adapter(path)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    if not get_adapter_params(model):
        raise ConfigError(f"adapter_checkpoint={adapter_checkpoint} needs a LoRA model builder (lora_*)")
    if model_cfg is not None:
        _check_lora_shape(adapter_config, model_cfg, path)
    try:
        adapter_state = peft_to_adapter(peft_weights, info)
    except ValueError as e:
        raise ConfigError(f"adapter {path} does not fit the base model: {e}") from None
    load_adapter_state(model, adapter_state)
    return LoadedAdapter(path, adapter_config)
