"""Keys every inference recipe (``mas_generate``, ``mas_eval``, ``mas_serve``) shares, once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Literal, Optional

from mas.attention import AttentionBackend
from mas.config import component, option
from mas.generation._decoding import CompileMode
from mas.masks import AttentionMode
from mas.segments import PromptFormat
from mas.model_weights import check_lora_values

__all__ = ["GenerateOptions", "InferenceOptions"]


@dataclass(kw_only=True)
class InferenceOptions:
    """Loading a model and prompting it as it was trained."""

    model: Any = component("the model builder (a lora_* builder to load an adapter)")
    checkpointer: Any = component("base (or merged) weights: a torchtune FullModelHFCheckpointer")
    tokenizer: Any = component("the tokenizer builder")
    adapter_checkpoint: Optional[str] = option(None, "a mas_lora_finetune checkpoint folder or run folder (null: base model)")
    attention: AttentionMode = option("mas", "the prompt mask, independent of how the model was trained")
    attention_backend: AttentionBackend = option("auto", "auto: FlexAttention on CUDA, SDPA otherwise")
    prompt_format: PromptFormat = option("text", "as in training: plain text or the tokenizer's chat headers")
    merge_system_and_user: bool = option(False, "as in training: one prompt segment (Appendix C.2 ablation)")
    device: str = option("auto", "cpu | cuda | cuda:N | auto")
    dtype: Literal["bf16", "fp32"] = option("bf16", "weights dtype")
    seed: Optional[int] = option(0, "sampling seed (null: nondeterministic)", min=0)
    max_new_tokens: int = option(64, "tokens to generate per prompt", min=1)
    batch_size: int = option(8, "prompts per batch", min=1)
    reuse_system_cache: bool = option(True, "prefill each system prompt once (exact under MAS: it never sees the user turn)")
    compile_decode: bool = option(False, "torch.compile the decode step (generate/eval: forward, sampling and stop checks in one graph; serve: the batched forward)")
    compile_mode: CompileMode = option("default", "torch.compile mode of the decode step (reduce-overhead: CUDA graphs on GPU)")
    stop_check_every: int = option(8, "decoded tokens between host checks of 'every row stopped' (1: every token)", min=1)
    max_cache_len: Optional[int] = option(None, "KV cache slots per sequence (null: generate/eval: longest prompt + max_new_tokens rounded up to 256; serve: the model's max_seq_len)", min=1)

    def check(self) -> None:
        """Rules across keys (subclasses extend them)."""
        check_lora_values(self.model)


@dataclass(kw_only=True)
class GenerateOptions(InferenceOptions):
    """Keys of ``mas_generate``."""

    output_dir: Optional[str] = option(None, "where output_file defaults to")
    prompt: Any = option(None, "{system: ..., user: ...} or a string (used when prompts_file is null)")
    prompts_file: Optional[str] = option(None, "JSONL of prompts (README: prompts-file formats)")
    output_file: Optional[str] = option(None, "JSONL of completions (null: print only)")
    temperature: float = option(0.0, "0: greedy", min=0.0)
    top_k: Optional[int] = option(None, "sample from the k most likely tokens (null: all)", min=1)
    top_p: Optional[float] = option(None, "nucleus sampling mass (null: off)", min=0.0, max=1.0)
    stop_tokens: Optional[List[int]] = option(None, "token ids that end generation (null: the tokenizer's)")
