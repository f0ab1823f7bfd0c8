"""Serving MAS models over an OpenAI-compatible HTTP API (``tune run mas_serve``).

- :class:`Engine`: one thread owns the model; continuous batching over a slot KV cache;
- :class:`PrefixCache`: exact reuse of prompt prefixes that end at a segment boundary;
- :func:`create_app`: the FastAPI app (``/v1/chat/completions``, ``/v1/completions``,
  ``/v1/models``, ``/health``, ``/metrics``);
- :class:`ServeOptions`: the recipe's keys.
"""

from mas.serving._engine import (
    Engine,
    EngineStoppedError,
    Event,
    PromptTooLongError,
    QueueFullError,
    SamplingParams,
    SequenceHandle,
)
from mas.serving._prefix_cache import CachedPrefix, PrefixCache, PrefixCacheStats, is_cut_point, reusable_ends
from mas.serving._slot_cache import SlotCaches, SlotKVCache, SlotPlan, install_slot_caches
from mas.serving._text import TextStream

__all__ = [
    "CachedPrefix",
    "Engine",
    "EngineStoppedError",
    "Event",
    "PrefixCache",
    "PrefixCacheStats",
    "PromptTooLongError",
    "QueueFullError",
    "SamplingParams",
    "SequenceHandle",
    "SlotCaches",
    "SlotKVCache",
    "SlotPlan",
    "TextStream",
    "install_slot_caches",
    "is_cut_point",
    "reusable_ends",
]
