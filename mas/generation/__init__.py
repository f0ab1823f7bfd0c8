"""Generation with a MAS prefill and causal decoding over a KV cache."""

from mas.generation.api import GenerationResult, generate, prompt_messages
from mas.generation.generate import (
    DecodeState,
    GenerationSettings,
    SystemPromptCache,
    decode_one_token,
    generate_batch,
    prefill,
    system_prefix,
)
from mas.generation.layout import PromptBatch, layout_prompts
from mas.generation.sampling import sample_next_token

__all__ = [
    "DecodeState",
    "GenerationResult",
    "GenerationSettings",
    "PromptBatch",
    "SystemPromptCache",
    "decode_one_token",
    "generate",
    "generate_batch",
    "layout_prompts",
    "prefill",
    "prompt_messages",
    "sample_next_token",
    "system_prefix",
]
