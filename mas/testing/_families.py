"""Tiny stand-ins of the paper's model families, written as Hugging Face model folders.

Real weights cannot be downloaded in tests, so :func:`write_tiny_checkpoint` writes a tiny,
randomly initialised model of each family in that family's Hugging Face layout (``config.json``,
``model.safetensors`` and the family's tokenizer files), built with torchtune's component
builder and converted by :mod:`mas.models._hf_layout` (the inverse of what torchtune's
``FullModelHFCheckpointer`` applies when loading):

=============  ===========  ====================================================================
family         model_type   HF layout
=============  ===========  ====================================================================
llama3         LLAMA3       untied ``lm_head``, rotary q/k rows permuted, tiktoken tokenizer
llama3_2       LLAMA3_2     tied embeddings (no ``lm_head``), scaled RoPE, tiktoken tokenizer
qwen2_tied     QWEN2        q/k/v biases, tied embeddings (like Qwen2.5-3B), GPT-2 BPE tokenizer
qwen2_untied   QWEN2        q/k/v biases, untied ``lm_head`` (like Qwen2.5-7B)
mistral        MISTRAL      untied ``lm_head``, rotary q/k rows permuted, SentencePiece tokenizer
=============  ===========  ====================================================================

Every family has the embedded demo model's shapes (:data:`mas.models.TINY_LLAMA3_2`); the
``llama3_2`` family *is* the demo model's architecture. The returned :class:`TinyCheckpoint`
gives the config nodes (model, LoRA model, tokenizer, checkpointer) that make a recipe run on it.
"""

from __future__ import annotations

import functools
import importlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from mas.assets import TINY_TOKENIZER_DIR
from mas.models import TINY_LLAMA3_2, write_hf_model
from mas.testing._tokenizers import write_mistral_sentencepiece, write_qwen2_bpe

__all__ = ["TINY_FAMILIES", "TinyCheckpoint", "TinyFamily", "write_tiny_checkpoint"]

# Shared tiny shapes (the demo model's): 2 layers, 64 dims, 4 query heads over 2 KV heads (GQA),
# a 1024-id vocabulary that holds every tiny tokenizer's ids (base vocabulary + special tokens).
_SHAPE_KEYS = ("vocab_size", "num_layers", "num_heads", "num_kv_heads", "embed_dim", "intermediate_dim", "max_seq_len")
_TINY_DIMS: Dict[str, Any] = {k: TINY_LLAMA3_2[k] for k in _SHAPE_KEYS}


@dataclass(frozen=True)
class TinyFamily:
    """One model family's tiny stand-in.

    Attributes:
        name (str): ``llama3``, ``llama3_2``, ``qwen2_tied``, ``qwen2_untied`` or ``mistral``.
        model_type (str): torchtune ``ModelType`` for the HF checkpointer.
        builder (str): dotpath of torchtune's component builder of the plain model.
        lora_builder (str): dotpath of its LoRA component builder (same dims).
        dims (Dict[str, Any]): the builders' keyword arguments.
        tokenizer (str): tokenizer family: ``llama3``, ``qwen2`` or ``mistral``.
        tie_word_embeddings (bool): whether the output projection is the embedding.
        real_models (List[str]): the paper's models of this family.
    """

    name: str
    model_type: str
    builder: str
    lora_builder: str
    dims: Dict[str, Any]
    tokenizer: str
    tie_word_embeddings: bool
    real_models: List[str] = field(default_factory=list)


TINY_FAMILIES: Dict[str, TinyFamily] = {
    f.name: f
    for f in (
        TinyFamily(
            "llama3", "LLAMA3", "torchtune.models.llama3.llama3", "torchtune.models.llama3.lora_llama3",
            {**_TINY_DIMS, "rope_base": 500_000, "norm_eps": 1e-5}, "llama3", False,
            ["Llama-3-8B", "Llama-3.1-8B"],
        ),
        TinyFamily(
            "llama3_2", "LLAMA3_2", "torchtune.models.llama3_2.llama3_2", "torchtune.models.llama3_2.lora_llama3_2",
            {**TINY_LLAMA3_2, "tie_word_embeddings": True}, "llama3", True, ["Llama-3.2-1B", "Llama-3.2-3B"],
        ),
        TinyFamily(
            "qwen2_tied", "QWEN2", "torchtune.models.qwen2.qwen2", "torchtune.models.qwen2.lora_qwen2",
            {**_TINY_DIMS, "rope_base": 1_000_000.0, "norm_eps": 1e-6, "tie_word_embeddings": True},
            "qwen2", True, ["Qwen2.5-3B"],
        ),
        TinyFamily(
            "qwen2_untied", "QWEN2", "torchtune.models.qwen2.qwen2", "torchtune.models.qwen2.lora_qwen2",
            {**_TINY_DIMS, "rope_base": 1_000_000.0, "norm_eps": 1e-6, "tie_word_embeddings": False},
            "qwen2", False, ["Qwen2.5-7B"],
        ),
        TinyFamily(
            "mistral", "MISTRAL", "torchtune.models.mistral.mistral", "torchtune.models.mistral.lora_mistral",
            {**_TINY_DIMS, "rope_base": 10_000, "norm_eps": 1e-5}, "mistral", False,
            ["Mistral-7B-v0.1", "Mistral-7B-v0.3"],
        ),
    )
}


def _import(dotpath: str) -> Any:
    module, _, name = dotpath.rpartition(".")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class TinyCheckpoint:
    """A tiny HF-layout checkpoint of one family, and the config nodes that use it.

    Attributes:
        family (TinyFamily): what it is.
        checkpoint_dir (Path): the HF model folder.
        dims (Dict[str, Any]): the builder arguments it was written with.
    """

    family: TinyFamily
    checkpoint_dir: Path
    dims: Dict[str, Any]

    @property
    def checkpoint_files(self) -> List[str]:
        return ["model.safetensors"]

    def build_model(self) -> nn.Module:
        """The plain (non-LoRA) model, randomly initialised."""
        return _import(self.family.builder)(**self.dims)

    def model_node(self) -> Dict[str, Any]:
        """Config node of the plain model."""
        return {"_component_": self.family.builder, **self.dims}

    def lora_model_node(
        self,
        lora_attn_modules: Optional[List[str]] = None,
        *,
        apply_lora_to_mlp: bool = False,
        lora_rank: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        **kwargs: Any,
    ) -> Dict[str, Any]:
        """Config node of the LoRA model (torchtune's LoRA component builder with these dims)."""
        return {
            "_component_": self.family.lora_builder,
            "lora_attn_modules": list(lora_attn_modules or ["q_proj", "v_proj"]),
            "apply_lora_to_mlp": apply_lora_to_mlp,
            "apply_lora_to_output": False,
            "lora_rank": lora_rank,
            "lora_alpha": lora_alpha,
            "lora_dropout": lora_dropout,
            **self.dims,
            **kwargs,
        }

    def tokenizer_node(self, max_seq_len: Optional[int] = 256) -> Dict[str, Any]:
        """Config node of the family's torchtune tokenizer over the tiny tokenizer files."""
        d = self.checkpoint_dir
        if self.family.tokenizer == "llama3":
            return {
                "_component_": "torchtune.models.llama3.llama3_tokenizer",
                "path": str(d / "original" / "tokenizer.model"),
                "special_tokens_path": str(d / "tokenizer.json"),
                "max_seq_len": max_seq_len,
            }
        if self.family.tokenizer == "qwen2":
            return {
                "_component_": "torchtune.models.qwen2_5.qwen2_5_tokenizer",
                "path": str(d / "vocab.json"),
                "merges_file": str(d / "merges.txt"),
                "special_tokens_path": str(d / "tokenizer.json"),
                "max_seq_len": max_seq_len,
            }
        return {
            "_component_": "torchtune.models.mistral.mistral_tokenizer",
            "path": str(d / "tokenizer.model"),
            "max_seq_len": max_seq_len,
            "prompt_template": None,
        }

    def checkpointer_node(self, output_dir: str) -> Dict[str, Any]:
        """Config node of torchtune's ``FullModelHFCheckpointer`` over this checkpoint."""
        return {
            "_component_": "torchtune.training.FullModelHFCheckpointer",
            "checkpoint_dir": str(self.checkpoint_dir),
            "checkpoint_files": self.checkpoint_files,
            "model_type": self.family.model_type,
            "output_dir": output_dir,
        }


def _write_tokenizer(family: TinyFamily, out_dir: Path) -> None:
    # The family's tokenizer files, where the real HF repository keeps them.
    if family.tokenizer == "llama3":
        (out_dir / "original").mkdir()
        shutil.copy2(TINY_TOKENIZER_DIR / "tokenizer.model", out_dir / "original" / "tokenizer.model")
        # HF's tokenizer.json lists the special tokens under "added_tokens", as this file does.
        shutil.copy2(TINY_TOKENIZER_DIR / "special_tokens.json", out_dir / "tokenizer.json")
    else:
        shutil.copytree(_trained_tokenizer(family.tokenizer), out_dir, dirs_exist_ok=True)


@functools.lru_cache(maxsize=None)
def _trained_tokenizer(kind: str) -> Path:
    # Training the tiny BPE takes seconds: once per process, then copied into each checkpoint.
    out = Path(tempfile.mkdtemp(prefix=f"mas_tiny_{kind}_tokenizer."))
    return (write_qwen2_bpe if kind == "qwen2" else write_mistral_sentencepiece)(out)


def _init_tiny_weights(model: nn.Module) -> None:
    # torchtune leaves embeddings at N(0, 1), which saturates a 64-dim model; norm scales get a
    # spread so that a conversion mixing them up would show in the logits.
    with torch.no_grad():
        model.tok_embeddings.weight.mul_(0.02)
        for name, p in model.named_parameters():
            if name.endswith(".scale"):
                p.normal_(1.0, 0.1)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.05)


def write_tiny_checkpoint(
    family: str, checkpoint_dir: str | os.PathLike, *, seed: int = 0, **dim_overrides: Any
) -> TinyCheckpoint:
    """Write a tiny random model of ``family`` as a Hugging Face model folder.

    The folder holds ``config.json``, ``model.safetensors`` (fp32) and the family's tokenizer
    files (Llama 3: ``original/tokenizer.model`` + ``tokenizer.json`` special tokens; Qwen2:
    ``vocab.json``, ``merges.txt``, ``tokenizer.json``; Mistral: ``tokenizer.model``).

    Args:
        family (str): a key of :data:`TINY_FAMILIES`.
        checkpoint_dir: folder to create (must not exist or be empty).
        seed (int): weight seed.
        **dim_overrides: builder dimension overrides (e.g. ``embed_dim=256`` for NF4, whose
            blocks need weights of at least 16384 elements).

    Returns:
        TinyCheckpoint: the folder and the config nodes that use it.
    """
    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {sorted(TINY_FAMILIES)}")
    spec = TINY_FAMILIES[family]
    dims = {**spec.dims, **dim_overrides}
    out = Path(checkpoint_dir)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _import(spec.builder)(**dims)
        _init_tiny_weights(model)
    write_hf_model(out, model.state_dict(), spec.model_type, dims, spec.tie_word_embeddings)
    _write_tokenizer(spec, out)
    return TinyCheckpoint(spec, out, dims)
