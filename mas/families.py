"""The paper's model families: a missing real-size builder, and tiny HF checkpoints for tests.

The paper fine-tunes Llama 3 / 3.1 / 3.2, Mistral 7B v0.1 / v0.3 and Qwen2.5 base models.
torchtune 0.6.1 builds all of them except Mistral-7B-v0.3 (vocabulary 32768, RoPE base 1e6),
which :func:`lora_mistral_7b_v0_3` adds from torchtune's own Mistral component builders. Its
Qwen2 builders quantize only the adapted projections under QLoRA; :func:`qlora_qwen2_5_3b` and
:func:`qlora_qwen2_5_7b_base` put every decoder projection in NF4, as its Llama and Mistral
QLoRA builders do.

Real weights cannot be downloaded in tests, so :func:`write_tiny_checkpoint` writes a tiny,
randomly initialised model of each family in that family's Hugging Face layout (``config.json``,
``model.safetensors`` and the family's tokenizer files), built with torchtune's component
builder and converted with the converter torchtune's ``FullModelHFCheckpointer`` inverts:

=============  ===========  ====================================================================
family         model_type   HF layout
=============  ===========  ====================================================================
llama3         LLAMA3       untied ``lm_head``, rotary q/k rows permuted, tiktoken tokenizer
llama3_2       LLAMA3_2     tied embeddings (no ``lm_head``), scaled RoPE, tiktoken tokenizer
qwen2_tied     QWEN2        q/k/v biases, tied embeddings (like Qwen2.5-3B), GPT-2 BPE tokenizer
qwen2_untied   QWEN2        q/k/v biases, untied ``lm_head`` (like Qwen2.5-7B)
mistral        MISTRAL      untied ``lm_head``, rotary q/k rows permuted, SentencePiece tokenizer
=============  ===========  ====================================================================

The returned :class:`TinyCheckpoint` gives the config nodes (model, LoRA model, tokenizer,
checkpointer) that make a recipe run on it.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn

__all__ = [
    "TINY_FAMILIES",
    "lora_with_nf4_base",
    "quantize_frozen_linears",
    "qlora_qwen2_5_3b",
    "qlora_qwen2_5_7b_base",
    "TinyCheckpoint",
    "TinyFamily",
    "lora_mistral_7b_v0_3",
    "mistral_7b_v0_3",
    "qlora_mistral_7b_v0_3",
    "write_tiny_checkpoint",
]

# --------------------------------------------------------------------------- real-size builders

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
    from torchtune.models.mistral import mistral

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
    from torchtune.models.mistral import lora_mistral

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


_BASE_PROJECTIONS = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.output_proj", "mlp.w1", "mlp.w2", "mlp.w3")


def quantize_frozen_linears(model: nn.Module) -> nn.Module:
    """Turn every plain (non-LoRA) projection of the decoder layers into an NF4 ``FrozenNF4Linear``.

    torchtune 0.6.1's Qwen2 LoRA builder quantizes only the projections that carry an adapter:
    with LoRA on q and v, k, o and the whole MLP stay bf16 and QLoRA saves little. This swaps
    the rest for torchtune's ``FrozenNF4Linear`` (same shapes, bias and parameter names, so HF
    checkpoints load unchanged). The bf16 weights exist until swapped, layer by layer after the
    model is built, so building needs about the bf16 model's memory once.
    """
    from torchtune.modules.low_precision import FrozenNF4Linear

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
    return quantize_frozen_linears(_import(builder)(**{**builder_kwargs, "quantize_base": True}))


def qlora_qwen2_5_3b(
    lora_attn_modules: List[str],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
) -> nn.Module:
    """Qwen2.5-3B QLoRA: torchtune's ``lora_qwen2_5_3b`` with *every* decoder projection in NF4."""
    from torchtune.models.qwen2_5 import lora_qwen2_5_3b

    return quantize_frozen_linears(
        lora_qwen2_5_3b(
            lora_attn_modules=list(lora_attn_modules),
            apply_lora_to_mlp=apply_lora_to_mlp,
            apply_lora_to_output=apply_lora_to_output,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            use_dora=use_dora,
            quantize_base=True,
        )
    )


def qlora_qwen2_5_7b_base(
    lora_attn_modules: List[str],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
) -> nn.Module:
    """Qwen2.5-7B (base) QLoRA: ``lora_qwen2_5_7b_base`` with every decoder projection in NF4."""
    from torchtune.models.qwen2_5 import lora_qwen2_5_7b_base

    return quantize_frozen_linears(
        lora_qwen2_5_7b_base(
            lora_attn_modules=list(lora_attn_modules),
            apply_lora_to_mlp=apply_lora_to_mlp,
            apply_lora_to_output=apply_lora_to_output,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            use_dora=use_dora,
            quantize_base=True,
        )
    )


# --------------------------------------------------------------------------- tiny checkpoints

# Shared tiny shapes: 2 layers, 64 dims, 4 query heads over 2 KV heads (GQA), a 1024-id
# vocabulary that holds every tiny tokenizer's ids (base vocabulary + special tokens).
_TINY_DIMS: Dict[str, Any] = dict(
    vocab_size=1024,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    embed_dim=64,
    intermediate_dim=192,
    max_seq_len=1024,
)


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
        hf_architecture (str), hf_model_type (str): ``config.json`` fields.
        real_models (List[str]): the paper's models of this family.
    """

    name: str
    model_type: str
    builder: str
    lora_builder: str
    dims: Dict[str, Any]
    tokenizer: str
    tie_word_embeddings: bool
    hf_architecture: str
    hf_model_type: str
    real_models: List[str] = field(default_factory=list)


TINY_FAMILIES: Dict[str, TinyFamily] = {
    f.name: f
    for f in (
        TinyFamily(
            "llama3", "LLAMA3", "torchtune.models.llama3.llama3", "torchtune.models.llama3.lora_llama3",
            {**_TINY_DIMS, "rope_base": 500_000, "norm_eps": 1e-5}, "llama3", False,
            "LlamaForCausalLM", "llama", ["Llama-3-8B", "Llama-3.1-8B"],
        ),
        TinyFamily(
            "llama3_2", "LLAMA3_2", "torchtune.models.llama3_2.llama3_2", "torchtune.models.llama3_2.lora_llama3_2",
            {**_TINY_DIMS, "rope_base": 500_000, "norm_eps": 1e-5, "scale_factor": 32, "tie_word_embeddings": True},
            "llama3", True, "LlamaForCausalLM", "llama", ["Llama-3.2-1B", "Llama-3.2-3B"],
        ),
        TinyFamily(
            "qwen2_tied", "QWEN2", "torchtune.models.qwen2.qwen2", "torchtune.models.qwen2.lora_qwen2",
            {**_TINY_DIMS, "rope_base": 1_000_000.0, "norm_eps": 1e-6, "tie_word_embeddings": True},
            "qwen2", True, "Qwen2ForCausalLM", "qwen2", ["Qwen2.5-3B"],
        ),
        TinyFamily(
            "qwen2_untied", "QWEN2", "torchtune.models.qwen2.qwen2", "torchtune.models.qwen2.lora_qwen2",
            {**_TINY_DIMS, "rope_base": 1_000_000.0, "norm_eps": 1e-6, "tie_word_embeddings": False},
            "qwen2", False, "Qwen2ForCausalLM", "qwen2", ["Qwen2.5-7B"],
        ),
        TinyFamily(
            "mistral", "MISTRAL", "torchtune.models.mistral.mistral", "torchtune.models.mistral.lora_mistral",
            {**_TINY_DIMS, "rope_base": 10_000, "norm_eps": 1e-5}, "mistral", False,
            "MistralForCausalLM", "mistral", ["Mistral-7B-v0.1", "Mistral-7B-v0.3"],
        ),
    )
}


def _import(dotpath: str) -> Any:
    import importlib

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


def _hf_config(family: TinyFamily, dims: Dict[str, Any]) -> Dict[str, Any]:
    config: Dict[str, Any] = {
        "architectures": [family.hf_architecture],
        "model_type": family.hf_model_type,
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
        "tie_word_embeddings": family.tie_word_embeddings,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }
    if family.name == "llama3_2":
        config["rope_scaling"] = {
            "factor": dims["scale_factor"],
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        }
    if family.hf_model_type == "qwen2":
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=dims["num_layers"])
    if family.hf_model_type == "mistral":
        config["sliding_window"] = None
    return config


def _to_hf(state: Dict[str, torch.Tensor], family: TinyFamily, dims: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    # The inverse of what FullModelHFCheckpointer applies when loading this model_type.
    heads = dict(num_heads=dims["num_heads"], num_kv_heads=dims["num_kv_heads"], dim=dims["embed_dim"])
    if family.model_type == "QWEN2":
        from torchtune.models.qwen2._convert_weights import qwen2_tune_to_hf

        hf = qwen2_tune_to_hf(state, **heads, tie_word_embeddings=family.tie_word_embeddings)
    else:
        from torchtune.models.convert_weights import tune_to_hf

        hf = tune_to_hf(state, **heads)
    if family.tie_word_embeddings:
        hf.pop("lm_head.weight", None)
    return {k: v.contiguous() for k, v in hf.items()}


def _write_tokenizer(family: TinyFamily, out_dir: Path) -> None:
    # The family's tokenizer files, where the real HF repository keeps them.
    if family.tokenizer == "llama3":
        from mas.models import TINY_TOKENIZER_DIR

        (out_dir / "original").mkdir()
        shutil.copy2(TINY_TOKENIZER_DIR / "tokenizer.model", out_dir / "original" / "tokenizer.model")
        # HF's tokenizer.json lists the special tokens under "added_tokens", as this file does.
        shutil.copy2(TINY_TOKENIZER_DIR / "special_tokens.json", out_dir / "tokenizer.json")
    else:
        shutil.copytree(_trained_tokenizer(family.tokenizer), out_dir, dirs_exist_ok=True)


@functools.lru_cache(maxsize=None)
def _trained_tokenizer(kind: str) -> Path:
    # Training the tiny BPE takes seconds: once per process, then copied into each checkpoint.
    import tempfile

    from mas.tiny_tokenizers import write_mistral_sentencepiece, write_qwen2_bpe

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
    from safetensors.torch import save_file

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
    save_file(_to_hf(model.state_dict(), spec, dims), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(_hf_config(spec, dims), indent=2) + "\n")
    _write_tokenizer(spec, out)
    return TinyCheckpoint(spec, out, dims)
