"""Inference: one engine for ``mas.generate``, ``mas_eval`` and ``mas_serve``.

Public names are imported from here (``from mas.generation import generate``);
``mas.generation.generate`` is the function, never a module.

- :class:`InferenceEngine` (``engine.py``; per sequence a :class:`Request`, ``request.py``): continuous batching over a slot KV cache
  (``slot_cache.py``), batched and chunked MAS prefill (``prefill.py``, ``layout.py``), the exact
  segment-prefix cache (``prefix_cache.py``), the decode step with sampling and stops on the
  device (``decode_loop.py``, ``sampling.py``), stop strings (``text_stream.py``);
- :func:`generate` (``api.py``): the offline driver; the server (``mas.serving``) is the other;
- :class:`GenerationSettings` (``settings.py``), built from a recipe's options by
  :func:`mas.generation.options.generation_settings`.
"""

from mas.generation.api import GenerationResult, Prompt, generate, prompt_messages
from mas.generation.decode_loop import compiled_decode_step, decode_step, decode_width
from mas.generation.engine import InferenceEngine
from mas.generation.request import PromptTooLongError, Request, StepOutput
from mas.generation.layout import PromptBatch, chunk_end, layout_chunks
from mas.generation.prefill import prefill
from mas.generation.prefix_cache import CachedPrefix, PrefixCache, PrefixCacheStats, is_cut_point, reusable_ends
from mas.generation.sampling import RowSampling, SamplingParams, choose_tokens
from mas.generation.settings import CompileMode, GenerationSettings, default_cache_len
from mas.generation.slot_cache import SlotCaches, SlotKVCache, SlotPlan, install_slot_caches
from mas.generation.text_stream import TextStream

__all__ = [
    "CachedPrefix",
    "CompileMode",
    "GenerationResult",
    "GenerationSettings",
    "InferenceEngine",
    "Prompt",
    "PrefixCache",
    "PrefixCacheStats",
    "PromptBatch",
    "PromptTooLongError",
    "Request",
    "RowSampling",
    "SamplingParams",
    "SlotCaches",
    "SlotKVCache",
    "SlotPlan",
    "StepOutput",
    "TextStream",
    "choose_tokens",
    "chunk_end",
    "compiled_decode_step",
    "decode_step",
    "decode_width",
    "default_cache_len",
    "generate",
    "install_slot_caches",
    "is_cut_point",
    "layout_chunks",
    "prefill",
    "prompt_messages",
    "reusable_ends",
]
