"""Generation with a MAS prefill and causal decoding.

Public names are imported from here (``from mas.generation import prefill``); the modules that
define them are private (``_decoding``) or helpers, so ``mas.generation.generate`` is the
function, never a module.
"""

from mas.generation._decoding import (
    BatchOutput,
    CompileMode,
    DecodeState,
    GenerationSettings,
    SystemPromptCache,
    decode_one_token,
    default_cache_len,
    forward_one_token,
    generate_batch,
    prefill,
    system_prefix,
)
from mas.generation.api import GenerationResult, Prompt, generate, prompt_messages
from mas.generation.layout import PromptBatch, layout_prompts
from mas.generation.decode_loop import DecodeOutput, compiled_decode_step, decode_step, decode_tokens, decode_width
from mas.generation.sampling import sample_next_token, sample_with_noise

__all__ = [
    "BatchOutput",
    "CompileMode",
    "DecodeOutput",
    "DecodeState",
    "GenerationResult",
    "GenerationSettings",
    "Prompt",
    "PromptBatch",
    "SystemPromptCache",
    "compiled_decode_step",
    "decode_one_token",
    "decode_step",
    "decode_tokens",
    "decode_width",
    "default_cache_len",
    "forward_one_token",
    "generate",
    "generate_batch",
    "layout_prompts",
    "prefill",
    "prompt_messages",
    "sample_next_token",
    "sample_with_noise",
    "system_prefix",
]
