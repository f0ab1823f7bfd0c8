"""The embedded default: a tiny Llama-3.2-architecture model, its tokenizer and HF checkpoint.

Everything here runs offline. The tokenizer ships in ``mas/assets/tiny_tokenizer`` (a byte-level
BPE trained by ``tools/make_tiny_tokenizer.py`` on the bundled commonsense rows, with Llama 3's
special tokens after the base vocabulary). The model weights are random but deterministic: the
first use writes them as a Hugging Face layout checkpoint (``config.json`` +
``model.safetensors``), which torchtune's ``FullModelHFCheckpointer`` then loads exactly as it
loads a downloaded Llama 3.2, so the tiny runs exercise the real-model code path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torchtune.models.llama3 import Llama3Tokenizer, llama3_tokenizer
from torchtune.models.llama3_2 import llama3_2, lora_llama3_2
from torchtune.modules import TransformerDecoder

__all__ = [
    "TINY_LLAMA3_2",
    "ASSETS_DIR",
    "lora_tiny_llama3_2",
    "tiny_hf_checkpointer",
    "tiny_llama3_2",
    "tiny_llama3_tokenizer",
    "write_tiny_hf_checkpoint",
]

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
TINY_TOKENIZER_DIR = ASSETS_DIR / "tiny_tokenizer"

#: Dimensions of the tiny model (a Llama 3.2 with GQA, tied embeddings, scaled RoPE).
TINY_LLAMA3_2: Dict[str, Any] = dict(
    vocab_size=1024,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    embed_dim=64,
    intermediate_dim=192,
    max_seq_len=1024,
    rope_base=500_000,
    norm_eps=1e-5,
    scale_factor=32,
)


def tiny_llama3_tokenizer(
    max_seq_len: Optional[int] = None, prompt_template: Optional[Any] = None
) -> Llama3Tokenizer:
    """The bundled tiny Llama 3 tokenizer (1024 ids: 992 BPE tokens, 32 special tokens)."""
    return llama3_tokenizer(
        str(TINY_TOKENIZER_DIR / "tokenizer.model"),
        special_tokens_path=str(TINY_TOKENIZER_DIR / "special_tokens.json"),
        max_seq_len=max_seq_len,
        prompt_template=prompt_template,
    )


def tiny_llama3_2(**overrides: Any) -> TransformerDecoder:
    """The tiny Llama 3.2 model; ``overrides`` change any of :data:`TINY_LLAMA3_2`."""
    return llama3_2(**{**TINY_LLAMA3_2, **overrides})


def lora_tiny_llama3_2(
    lora_attn_modules: List[str],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
    **overrides: Any,
) -> TransformerDecoder:
    """The tiny Llama 3.2 model with LoRA adapters (same arguments as torchtune's builders)."""
    return lora_llama3_2(
        lora_attn_modules=list(lora_attn_modules),
        apply_lora_to_mlp=apply_lora_to_mlp,
        apply_lora_to_output=apply_lora_to_output,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
        **{**TINY_LLAMA3_2, **overrides},
    )


def _hf_llama_config(dims: Dict[str, Any]) -> Dict[str, Any]:
    head_dim = dims["embed_dim"] // dims["num_heads"]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": dims["embed_dim"],
        "intermediate_size": dims["intermediate_dim"],
        "num_hidden_layers": dims["num_layers"],
        "num_attention_heads": dims["num_heads"],
        "num_key_value_heads": dims["num_kv_heads"],
        "head_dim": head_dim,
        "vocab_size": dims["vocab_size"],
        "max_position_embeddings": dims["max_seq_len"],
        "rms_norm_eps": dims["norm_eps"],
        "rope_theta": dims["rope_base"],
        "rope_scaling": {
            "factor": dims["scale_factor"],
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "tie_word_embeddings": True,
        "bos_token_id": 992,
        "eos_token_id": 993,
        "torch_dtype": "float32",
    }


def write_tiny_hf_checkpoint(checkpoint_dir: str | os.PathLike, seed: int = 0, **overrides: Any) -> Path:
    """Write the tiny model's deterministic random weights in the HF Llama layout.

    Args:
        checkpoint_dir: folder to create (``config.json``, ``model.safetensors``).
        seed (int): weight seed; the same seed always gives the same weights.
        **overrides: dimension overrides (see :data:`TINY_LLAMA3_2`).

    Returns:
        Path: ``checkpoint_dir``.
    """
    from safetensors.torch import save_file
    from torchtune.models.convert_weights import tune_to_hf

    dims = {**TINY_LLAMA3_2, **overrides}
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = tiny_llama3_2(**overrides)
        # torchtune's builders leave most Linear layers at PyTorch's default init, whose scale
        # is fine; embeddings are N(0, 1), which saturates a tiny model, so shrink them.
        with torch.no_grad():
            model.tok_embeddings.weight.mul_(0.02)
    hf_state = tune_to_hf(
        model.state_dict(),
        num_heads=dims["num_heads"],
        num_kv_heads=dims["num_kv_heads"],
        dim=dims["embed_dim"],
    )
    hf_state = {k: v.contiguous() for k, v in hf_state.items() if k != "lm_head.weight"}
    tmp = checkpoint_dir / "model.safetensors.tmp"
    save_file(hf_state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, checkpoint_dir / "model.safetensors")
    (checkpoint_dir / "config.json").write_text(json.dumps(_hf_llama_config(dims), indent=2) + "\n")
    return checkpoint_dir


def tiny_hf_checkpointer(checkpoint_dir: str, output_dir: str, seed: int = 0, **overrides: Any):
    """torchtune's ``FullModelHFCheckpointer`` over the tiny checkpoint, written on first use.

    Args:
        checkpoint_dir (str): where the tiny HF checkpoint lives (created if missing).
        output_dir (str): the run's output folder (torchtune's checkpointer requires one).
        seed (int): weight seed.
        **overrides: dimension overrides; must match the model builder's.
    """
    from torchtune.training import FullModelHFCheckpointer

    if not (Path(checkpoint_dir) / "model.safetensors").exists():
        write_tiny_hf_checkpoint(checkpoint_dir, seed=seed, **overrides)
    return FullModelHFCheckpointer(
        checkpoint_dir=checkpoint_dir,
        checkpoint_files=["model.safetensors"],
        model_type="LLAMA3_2",
        output_dir=output_dir,
    )
