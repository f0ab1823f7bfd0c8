"""Hugging Face model folders: ``config.json`` fields and the torchtune -> HF weight conversion.

torchtune's ``FullModelHFCheckpointer`` loads a downloaded model by reading ``config.json`` and
converting ``model.safetensors`` from HF names (and, for Llama and Mistral, HF's rotary q/k row
order) to its own. This module does the inverse for a model built in-process, so a model written
here loads through exactly the code path of a real download. The embedded demo model
(:mod:`mas.models._tiny`) and the test families (:mod:`mas.testing`) both write through it.

The HF layouts of the paper's families:

===========  ============================  ==================================================
model_type   ``config.json`` architecture  layout
===========  ============================  ==================================================
LLAMA3       LlamaForCausalLM              untied ``lm_head``, rotary q/k rows permuted
LLAMA3_2     LlamaForCausalLM              tied embeddings (no ``lm_head``), ``rope_scaling``
QWEN2        Qwen2ForCausalLM              q/k/v biases, rows not permuted, tied or untied
MISTRAL      MistralForCausalLM            untied ``lm_head``, rotary q/k rows permuted
===========  ============================  ==================================================
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch
from safetensors.torch import save_file
from torchtune.models.convert_weights import tune_to_hf
from torchtune.models.qwen2._convert_weights import qwen2_tune_to_hf

from mas.errors import ConfigError

__all__ = ["HF_WEIGHTS_FILE", "check_replaceable_model_dir", "hf_config", "to_hf_state", "write_hf_model"]

#: The single weights file of a tiny HF model folder.
HF_WEIGHTS_FILE = "model.safetensors"

#: ``config.json`` ``model_type`` and ``architectures`` of each torchtune model type.
_HF_NAMES = {
    "LLAMA3": ("llama", "LlamaForCausalLM"),
    "LLAMA3_2": ("llama", "LlamaForCausalLM"),
    "QWEN2": ("qwen2", "Qwen2ForCausalLM"),
    "MISTRAL": ("mistral", "MistralForCausalLM"),
}


def hf_config(model_type: str, dims: Mapping[str, Any], tie_word_embeddings: bool) -> Dict[str, Any]:
    """The ``config.json`` of a model built with torchtune's component builder arguments ``dims``.

    Args:
        model_type (str): torchtune ``ModelType`` name: ``LLAMA3``, ``LLAMA3_2``, ``QWEN2``, ``MISTRAL``.
        dims (Mapping[str, Any]): builder arguments (``vocab_size``, ``num_layers``, ``num_heads``,
            ``num_kv_heads``, ``embed_dim``, ``intermediate_dim``, ``max_seq_len``, ``norm_eps``,
            ``rope_base``; ``scale_factor`` for Llama 3.2's scaled RoPE).
        tie_word_embeddings (bool): whether the output projection is the embedding.

    Returns:
        Dict[str, Any]: the fields torchtune's checkpointer and HF transformers read.
    """
    hf_model_type, architecture = _HF_NAMES[model_type]
    config: Dict[str, Any] = {
        "architectures": [architecture],
        "model_type": hf_model_type,
        "hidden_size": dims["embed_dim"],
        "intermediate_size": dims["intermediate_dim"],
        "num_hidden_layers": dims["num_layers"],
        "num_attention_heads": dims["num_heads"],
        "num_key_value_heads": dims["num_kv_heads"],
        "head_dim": dims["embed_dim"] // dims["num_heads"],
        "vocab_size": dims["vocab_size"],
        "max_position_embeddings": dims["max_seq_len"],
        "rms_norm_eps": dims["norm_eps"],
        "rope_theta": dims["rope_base"],
        "tie_word_embeddings": tie_word_embeddings,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }
    if model_type == "LLAMA3_2":
        config["rope_scaling"] = {
            "factor": dims["scale_factor"],
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        }
    if hf_model_type == "qwen2":
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=dims["num_layers"])
    if hf_model_type == "mistral":
        config["sliding_window"] = None
    return config


def to_hf_state(
    state: Mapping[str, torch.Tensor], model_type: str, dims: Mapping[str, Any], tie_word_embeddings: bool
) -> Dict[str, torch.Tensor]:
    """torchtune parameter names and layout -> HF's: the inverse of what the checkpointer loads.

    Llama and Mistral permute each head's q/k rows from torchtune's interleaved rotary layout to
    HF's half-split one; Qwen2 does not. A tied model has no ``lm_head.weight``.

    Args:
        state (Mapping[str, torch.Tensor]): a torchtune model's ``state_dict()``.
        model_type (str), dims (Mapping[str, Any]), tie_word_embeddings (bool): as :func:`hf_config`.

    Returns:
        Dict[str, torch.Tensor]: contiguous tensors under HF names, ready for safetensors.
    """
    heads = dict(num_heads=dims["num_heads"], num_kv_heads=dims["num_kv_heads"], dim=dims["embed_dim"])
    if model_type == "QWEN2":
        hf = qwen2_tune_to_hf(dict(state), **heads, tie_word_embeddings=tie_word_embeddings)
    else:
        hf = tune_to_hf(dict(state), **heads)
    if tie_word_embeddings:
        hf.pop("lm_head.weight", None)
    return {k: v.contiguous() for k, v in hf.items()}


def write_hf_model(
    out_dir: Path,
    state: Mapping[str, torch.Tensor],
    model_type: str,
    dims: Mapping[str, Any],
    tie_word_embeddings: bool,
    extra_config: Optional[Mapping[str, Any]] = None,
) -> None:
    """Write ``config.json`` and ``model.safetensors`` of a torchtune model into ``out_dir``.

    Args:
        out_dir (Path): an existing folder.
        state, model_type, dims, tie_word_embeddings: as :func:`to_hf_state`.
        extra_config (Optional[Mapping[str, Any]]): more ``config.json`` fields (token ids).
    """
    hf_state = to_hf_state(state, model_type, dims, tie_word_embeddings)
    save_file(hf_state, str(Path(out_dir) / HF_WEIGHTS_FILE), metadata={"format": "pt"})
    config = {**hf_config(model_type, dims, tie_word_embeddings), **(extra_config or {})}
    (Path(out_dir) / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def check_replaceable_model_dir(folder: Path, *, marker: str, writer: str, key: str) -> None:
    """Refuse to replace ``folder`` unless it is absent, empty, or a model folder ``writer`` made.

    A folder this project made holds ``marker`` (the recipe file it writes) and nothing but the
    files :func:`write_hf_model` writes beside it; anything else there is the user's and must
    survive, so the caller stops before deleting or overwriting.

    Raises:
        ConfigError: one line naming the folder, the first foreign file and ``key`` to change.
    """
    folder = Path(folder)
    if not folder.exists():
        return
    if not folder.is_dir():
        raise ConfigError(f"{key}={folder} is a file, not a folder; set {key} to a new or empty folder")
    names = sorted(p.name for p in folder.iterdir())
    if not names:
        return
    ours = {marker, HF_WEIGHTS_FILE, "config.json"}
    foreign = [n for n in names if n not in ours] if marker in names else names
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise ConfigError(
            f"{key}={folder} holds {foreign[0]!r}{more}, which {writer} did not write; it replaces only a "
            f"folder it made (marked by {marker}): set {key} to a new or empty folder"
        )
