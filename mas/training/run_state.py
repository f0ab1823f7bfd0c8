"""What a fine-tuning run saves and restores: adapter payloads, MAS settings, RNG, data position."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import Tensor

from mas._version import __version__
from mas.checkpointing import (
    RECIPE_STATE_FILE,
    CheckpointWriter,
    HFModelInfo,
    adapter_to_peft,
    load_peft_adapter,
    merged_hf_state,
    peft_adapter_config,
    peft_to_adapter,
)
from mas.masks import AttentionMode, validate_attention_mode
from mas.segments import SegmentSettings

__all__ = [
    "DataPosition",
    "capture_rng",
    "load_run_checkpoint",
    "mas_settings",
    "MAS_ARCHITECTURE_PREFIX",
    "merged_hf_config",
    "restore_rng",
    "save_run_checkpoint",
]

MAS_RULE = "q attends k iff k is not padding, same document, and (k <= q or seg(q) == seg(k) >= 0)"


def mas_settings(attention: AttentionMode, segments: SegmentSettings) -> Dict[str, Any]:
    """The MAS settings recorded in the adapter config, so inference can prompt the same way.

    Args:
        attention (AttentionMode): the training mask, ``"mas"`` or ``"causal"``.
        segments (SegmentSettings): the settings of the builder that made the training data
            (``SegmentedDataset.segment_settings``), recorded as they were, not re-read from
            the config.

    Returns:
        Dict[str, Any]: the ``mas`` entry of ``adapter_config.json``.
    """
    return {
        "attention": validate_attention_mode(attention),
        **asdict(segments),
        "segment_rules": {
            "system": "one bidirectional segment per message",
            "user": "one bidirectional segment per message",
            "ipython": "one bidirectional segment per message",
            "assistant": "causal",
            "generated": "causal",
        },
        "mask": MAS_RULE,
        "paper": "arXiv:2412.18487",
        "mas_version": __version__,
    }


#: How the vLLM plugin (``integrations/vllm``) names its class of a vLLM architecture.
MAS_ARCHITECTURE_PREFIX = "Mas"


def merged_hf_config(hf_config: Dict[str, Any], mas: Dict[str, Any]) -> Dict[str, Any]:
    """The ``config.json`` of a run's merged weights: the base's, plus the MAS settings.

    A merged model has no adapter to carry ``adapter_config.json``, so the settings it was
    trained with (attention mode, prompt format, merged system and user: :func:`mas_settings`)
    ride in its ``config.json`` under ``"mas"``, where a server that loads the folder (the vLLM
    plugin in ``integrations/vllm``) reads them. Hugging Face ``transformers`` keeps an unknown
    key as a config attribute, so the folder still loads as a plain model.

    Weights trained with ``attention: mas`` also name the plugin's architecture
    (``MasLlamaForCausalLM`` for ``LlamaForCausalLM``): vLLM serves them with the MAS mask with no
    ``--hf-overrides``, and a vLLM without the plugin refuses them by name rather than serving
    them causally without a word. (``transformers`` picks its class by ``model_type``, not by
    ``architectures``, so the folder still loads there.)

    Args:
        hf_config (Dict[str, Any]): the base checkpoint's ``config.json``.
        mas (Dict[str, Any]): the run's MAS settings (:func:`mas_settings`).

    Returns:
        Dict[str, Any]: a new dict; ``hf_config`` is left unchanged.
    """
    config = {**hf_config, "mas": mas}
    if mas.get("attention") == "mas" and isinstance(hf_config.get("architectures"), list):
        config["architectures"] = [
            name if name.startswith(MAS_ARCHITECTURE_PREFIX) else MAS_ARCHITECTURE_PREFIX + name for name in hf_config["architectures"]
        ]
    return config


@dataclass
class DataPosition:
    """Where training stands: ``steps_in_epoch`` optimizer steps done in ``epoch``."""

    global_step: int = 0
    epoch: int = 0
    steps_in_epoch: int = 0


def capture_rng() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_run_checkpoint(
    writer: CheckpointWriter,
    *,
    position: DataPosition,
    adapter_state: Dict[str, Tensor],
    info: HFModelInfo,
    lora: Dict[str, Any],
    mas: Dict[str, Any],
    optimizer_state: Dict[str, Any],
    scheduler_state: Dict[str, Any],
    epoch_end: bool,
    model_state: Optional[Dict[str, Tensor]] = None,
    base_checkpoint_dir: Optional[str] = None,
    extra: Optional[Dict[str, Any]] = None,
) -> Path:
    """Write adapter (PEFT), optional merged weights (HF) and recipe state as one checkpoint."""
    adapter_state = {k: v.detach().to("cpu") for k, v in adapter_state.items()}
    config = peft_adapter_config(**lora, mas=mas, base_model_name_or_path=base_checkpoint_dir)
    merged = None
    if model_state is not None:
        cpu_state = {k: v.detach().to("cpu") for k, v in model_state.items()}
        merged = merged_hf_state(cpu_state, lora["lora_rank"], lora["lora_alpha"], info)
    recipe_state = {
        **asdict(position),
        "epoch_end": epoch_end,
        "optimizer": optimizer_state,
        "lr_scheduler": scheduler_state,
        "rng": capture_rng(),
        "model_type": info.model_type,
        **(extra or {}),
    }
    return writer.save(
        f"step_{position.global_step:07d}",
        peft_weights=adapter_to_peft(adapter_state, info),
        adapter_config=config,
        recipe_state=recipe_state,
        merged_weights=merged,
        hf_config=merged_hf_config(info.hf_config, mas),
        base_checkpoint_dir=base_checkpoint_dir,
    )


def load_run_checkpoint(folder: Path, info: HFModelInfo) -> tuple[Dict[str, Tensor], Dict[str, Any], Dict[str, Any]]:
    """(torchtune adapter weights, adapter config, recipe state) of a checkpoint folder."""
    peft_weights, adapter_config = load_peft_adapter(folder)
    recipe_state = torch.load(folder / RECIPE_STATE_FILE, map_location="cpu", weights_only=False)
    return peft_to_adapter(peft_weights, info), adapter_config, recipe_state
