"""Tiny models, adapters and ``mas.generate`` references for the plugin's tests.

The models are the project's tiny families (``mas.testing``) with head_dim 32 (vLLM's attention
needs at least 32; the project's own tiny shapes have 16), written as Hugging Face folders. An
adapter is a LoRA of one of them with random weights, saved by the project's own checkpoint
writer, so its ``adapter_config.json`` records the attention mode and prompt format as
``mas_lora_finetune`` would.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from omegaconf import OmegaConf

#: head_dim 128 / 4 = 32; GQA as the project's tiny shapes (4 query heads over 2 KV heads).
DIMS = {"embed_dim": 128, "num_heads": 4, "num_kv_heads": 2, "intermediate_dim": 256}
#: family -> (tiny family, vLLM architecture of the plugin, prompt format the family supports)
FAMILIES = {
    "llama": ("llama3_2", "MasLlamaForCausalLM", "chat"),
    "qwen2": ("qwen2_untied", "MasQwen2ForCausalLM", "chat"),
    "mistral": ("mistral", "MasMistralForCausalLM", "text"),
}
LORA = {
    "lora_rank": 8, "lora_alpha": 16.0, "lora_dropout": 0.0, "lora_attn_modules": ["q_proj", "v_proj"],
    "apply_lora_to_mlp": True, "apply_lora_to_output": False, "use_dora": False,
}
SYSTEM = "You are a helpful assistant. Answer every question briefly and with care."
CHATS: List[List[Dict[str, str]]] = [
    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Is the sky blue on a clear day?"}],
    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Name three animals that live in the sea."}],
    [{"role": "user", "content": "What colour is fresh grass in spring?"}],
    [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Count to three."},
        {"role": "assistant", "content": "One, two, three."},
        {"role": "user", "content": "And now backwards?"},
    ],
]
COMPLETION = "Once upon a time, in a small village by the sea,"


@dataclass
class TinyModel:
    """A tiny HF folder, its torchtune config nodes and (optionally) an adapter folder."""

    family: str
    checkpoint: Any  # mas.testing TinyCheckpoint
    architecture: str
    prompt_format: str
    adapter: Optional[Path] = None

    @property
    def path(self) -> Path:
        return self.checkpoint.checkpoint_dir


def write_model(family: str, root: Path, *, adapter_attention: Optional[str] = None) -> TinyModel:
    """Write the tiny ``family`` model under ``root`` (and an adapter trained, as recorded, with
    ``adapter_attention``)."""
    from mas.testing import write_tiny_checkpoint

    tiny, architecture, prompt_format = FAMILIES[family]
    # The model's vocabulary is the tokenizer's: a random model must not sample ids the tokenizer
    # cannot decode (the tiny SentencePiece has 1000 pieces, the shared tiny shape 1024 ids).
    vocab = {"vocab_size": 1000} if family == "mistral" else {}
    checkpoint = write_tiny_checkpoint(tiny, root / family, seed=1, **DIMS, **vocab)
    model = TinyModel(family, checkpoint, architecture, prompt_format)
    if adapter_attention is not None:
        model.adapter = write_adapter(model, root / f"{family}_adapter_{adapter_attention}", adapter_attention)
    return model


def _load(model: TinyModel, *, lora: bool, adapter: Optional[Path]) -> torch.nn.Module:
    from mas.generation.loading import load_inference_model

    node = model.checkpoint.lora_model_node(LORA["lora_attn_modules"], apply_lora_to_mlp=LORA["apply_lora_to_mlp"], lora_rank=LORA["lora_rank"], lora_alpha=LORA["lora_alpha"]) if lora else model.checkpoint.model_node()
    loaded = load_inference_model(
        OmegaConf.create(node), OmegaConf.create(model.checkpoint.checkpointer_node(str(model.path.parent / "tt_out"))),
        adapter_checkpoint=str(adapter) if adapter else None, device=torch.device("cpu"), dtype=torch.float32,
    )
    return loaded.model


def write_adapter(model: TinyModel, run_dir: Path, attention: str, *, prompt_format: Optional[str] = None) -> Path:
    """A random LoRA of ``model`` saved as a ``mas_lora_finetune`` checkpoint; its folder.

    Every adapter of one model has the same weights (one seed): adapters written with different
    settings differ only in what they record."""
    from torchtune.modules.peft import get_adapter_params

    from mas.checkpointing import CheckpointWriter, HFModelInfo
    from mas.segments import SegmentSettings
    from mas.training.run_state import DataPosition, mas_settings, save_run_checkpoint

    lora_model = _load(model, lora=True, adapter=None)
    params = get_adapter_params(lora_model)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in params.values():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    info = HFModelInfo.from_checkpoint_dir(model.path, model.checkpoint.family.model_type)
    return save_run_checkpoint(
        CheckpointWriter(run_dir), position=DataPosition(global_step=1), adapter_state=params, info=info, lora=LORA,
        mas=mas_settings(attention, SegmentSettings(prompt_format=prompt_format or model.prompt_format)), optimizer_state={},
        scheduler_state={}, epoch_end=False, base_checkpoint_dir=str(model.path),
    )


def tokenizer_of(model: TinyModel) -> Any:
    from mas.config import instantiate

    return instantiate(OmegaConf.create(model.checkpoint.tokenizer_node(None)))


def mas_reference(model: TinyModel, prompts: List[Any], *, attention: str, adapter: bool, max_new_tokens: int) -> Any:
    """``mas.generate`` greedy, no stop tokens: the tokens vLLM must reproduce."""
    import mas

    torch_model = _load(model, lora=adapter, adapter=model.adapter if adapter else None)
    return mas.generate(
        torch_model, tokenizer_of(model), prompts, prompt_format=model.prompt_format, attention=attention,
        max_new_tokens=max_new_tokens, temperature=0.0, stop_tokens=[],
    )


def llm_kwargs(model: TinyModel, *, mas_entry: Any, lora: bool, max_loras: int = 1) -> Dict[str, Any]:
    """``vllm.LLM`` arguments for the tiny model under the plugin (eager, fp32, a small cache)."""
    return dict(
        model=str(model.path), tokenizer_mode="mas", dtype="float32", enforce_eager=True, seed=0,
        hf_overrides={"architectures": [model.architecture], "mas": mas_entry},
        max_model_len=256, max_num_seqs=4, block_size=16, enable_prefix_caching=True,
        # Chunked prefill and a budget below the context are asked for on purpose: the plugin's
        # config hook turns chunking off and raises the budget (a segment is never split).
        max_num_batched_tokens=64, enable_chunked_prefill=True,
        kv_cache_memory_bytes=2 << 20,
        **(dict(enable_lora=True, max_lora_rank=LORA["lora_rank"], max_loras=max_loras) if lora else {}),
    )
