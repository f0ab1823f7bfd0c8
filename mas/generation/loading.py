"""Load a model for inference: base HF checkpoint + optional PEFT adapter written by fine-tuning."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from omegaconf import DictConfig
from torch import nn

from mas.attention import use_mas_attention
from mas.config import instantiate
from mas.devices import resolve_device
from mas.errors import ConfigError
from mas.generation.options import InferenceOptions
from mas.model_weights import BaseWeights, check_vocab, load_adapter, load_base_state, read_base_state

__all__ = [
    "InferenceSetup",
    "load_adapter_beside",
    "load_for_inference",
    "InferenceModel",
    "load_inference_model",
]

log = logging.getLogger(__name__)

@dataclass
class InferenceModel:
    """A model ready to generate.

    Attributes:
        model (nn.Module): in eval mode, MAS attention installed.
        adapter_config (Optional[dict]): the PEFT adapter config (with ``"mas"``), if one was loaded.
        adapter_path (Optional[Path]): where the adapter came from.
        base (Optional[BaseWeights]): the base weights in the model (what another adapter of
            a checkpoint sweep is checked against).
    """

    model: nn.Module
    adapter_config: Optional[Dict[str, Any]]
    adapter_path: Optional[Path]
    base: Optional[BaseWeights] = None

    @property
    def trained_attention(self) -> Optional[str]:
        return (self.adapter_config or {}).get("mas", {}).get("attention")


def load_inference_model(
    model_cfg: DictConfig,
    checkpointer_cfg: DictConfig,
    *,
    adapter_checkpoint: Optional[str],
    device: torch.device,
    dtype: torch.dtype,
    attention_backend: str = "auto",
    allow_other_base: bool = False,
) -> InferenceModel:
    """Build the model, load base weights, then (optionally) a fine-tuning checkpoint's adapter.

    Args:
        model_cfg (DictConfig): model builder node (a LoRA builder when an adapter is given).
        checkpointer_cfg (DictConfig): a ``FullModelHFCheckpointer`` node for the base (or merged)
            weights.
        adapter_checkpoint (Optional[str]): a checkpoint folder (``.../checkpoints/step_N``) or a
            run's ``output_dir`` (its latest checkpoint); None for base or merged weights.
        device, dtype: where and in what precision.
        attention_backend (str): see :class:`mas.attention.MASAttention`.
        allow_other_base (bool): warn instead of refusing an adapter trained on another base.

    Raises:
        ConfigError: a missing adapter file, an adapter trained on another base (as its run's
            ``run.json`` records it), or one for a different base shape.
    """
    from torchtune import training

    checkpointer = instantiate(checkpointer_cfg)
    base = BaseWeights.from_checkpointer(checkpointer, checkpointer_cfg)
    base_state = read_base_state(checkpointer)
    with training.set_default_dtype(dtype), device:
        model = instantiate(model_cfg)
    load_base_state(model, base_state)
    adapter_config, adapter_path = None, None
    if adapter_checkpoint:
        adapter = load_adapter(model, adapter_checkpoint, base, model_cfg=model_cfg, allow_other_base=allow_other_base)
        adapter_config, adapter_path = adapter.config, adapter.path
    use_mas_attention(model, attention_backend)  # type: ignore[arg-type]
    model.eval()
    return InferenceModel(model, adapter_config, adapter_path, base)


def load_adapter_beside(
    first: InferenceModel,
    model_cfg: DictConfig,
    adapter_checkpoint: str,
    *,
    device: torch.device,
    dtype: torch.dtype,
    attention_backend: str = "auto",
    allow_other_base: bool = False,
) -> InferenceModel:
    """Another adapter over ``first``'s base weights, which the two models share (not copied):
    several adapters by name in one server cost one base plus their LoRA weights.

    Args:
        first (InferenceModel): a loaded LoRA model (its ``base`` recorded).
        model_cfg (DictConfig): the same LoRA model node (the adapter must have its rank and targets).
        adapter_checkpoint (str): the other adapter's folder (or run folder).
        device, dtype, attention_backend, allow_other_base: as :func:`load_inference_model`.

    Raises:
        ConfigError: as :func:`mas.model_weights.load_adapter` (another base, another LoRA shape).
    """
    from torchtune import training
    from torchtune.modules.peft import get_adapter_params

    with training.set_default_dtype(dtype), device:
        model = instantiate(model_cfg)
    adapter_names = set(get_adapter_params(model))
    shared = {name: value for name, value in first.model.state_dict().items() if name not in adapter_names}
    # assign=True: the new model's base parameters become the first model's tensors (the
    # freshly built ones are freed); only its LoRA weights are its own.
    missing, unexpected = model.load_state_dict(shared, strict=False, assign=True)
    if set(missing) != adapter_names or unexpected:
        raise RuntimeError(f"sharing base weights failed: missing {sorted(set(missing) - adapter_names)[:4]}, unexpected {unexpected[:4]}")
    assert first.base is not None, "the first model records its base"
    adapter = load_adapter(model, adapter_checkpoint, first.base, model_cfg=model_cfg, allow_other_base=allow_other_base)
    use_mas_attention(model, attention_backend)  # type: ignore[arg-type]
    model.eval()
    return InferenceModel(model, adapter.config, adapter.path, first.base)


@dataclass
class InferenceSetup:
    """What every inference recipe starts from: a tokenizer and a model that belong together.

    Attributes:
        tokenizer: the configured tokenizer.
        loaded (InferenceModel): base (+ adapter), eval mode, MAS attention installed.
        device (torch.device): where the model is.
        dtype (torch.dtype): its weights' dtype.
    """

    tokenizer: Any
    loaded: InferenceModel
    device: torch.device
    dtype: torch.dtype


def load_for_inference(options: InferenceOptions, *, adapter_checkpoint: Optional[str]) -> InferenceSetup:
    """Resolve device and dtype, build the tokenizer, load the model and check that they fit.

    The one loading step of ``mas_generate``, ``mas_eval`` and ``mas_serve``.

    Args:
        options (InferenceOptions): the recipe's typed options.
        adapter_checkpoint (Optional[str]): the adapter to load (a sweep passes each checkpoint).

    Raises:
        ConfigError: a missing or mismatched adapter, or a tokenizer larger than the model's vocabulary.
    """
    from torchtune import training

    device = resolve_device(options.device)
    dtype = training.get_dtype(options.dtype, device=device)
    tokenizer = instantiate(options.tokenizer)
    loaded = load_inference_model(
        options.model,
        options.checkpointer,
        adapter_checkpoint=adapter_checkpoint,
        device=device,
        dtype=dtype,
        attention_backend=options.attention_backend,
        allow_other_base=options.allow_other_base,
    )
    check_vocab(tokenizer, loaded.model)
    positions = getattr(loaded.model, "max_seq_len", None)
    if options.max_cache_len is not None and positions is not None and options.max_cache_len > positions:
        raise ConfigError(f"max_cache_len={options.max_cache_len} is more than the model's max_seq_len {positions}; set max_cache_len <= {positions}")
    return InferenceSetup(tokenizer, loaded, device, dtype)
