"""Serving MAS models over an OpenAI-compatible HTTP API (``tune run mas_serve``).

- :class:`Engine`: one thread owns the model; continuous batching over a slot KV cache;
- :class:`PrefixCache`: exact reuse of prompt prefixes that end at a segment boundary;
- :func:`create_app`: the FastAPI app (``/v1/chat/completions``, ``/v1/completions``,
  ``/v1/models``, ``/health``, ``/metrics``);
- :class:`ServeOptions`: the recipe's keys.
"""

from mas.serving._app import ServerState, create_app
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
from mas.serving._setup import PromptSettings, build_server, prompt_settings, run_server
from mas.serving._text import TextStream
from mas.serving.options import ServeOptions

__all__ = [
    "CachedPrefix",
    "Engine",
    "EngineStoppedError",
    "Event",
    "PrefixCache",
    "PrefixCacheStats",
    "PromptSettings",
    "PromptTooLongError",
    "QueueFullError",
    "SamplingParams",
    "SequenceHandle",
    "ServeOptions",
    "ServerState",
    "SlotCaches",
    "SlotKVCache",
    "SlotPlan",
    "TextStream",
    "build_server",
    "create_app",
    "install_slot_caches",
    "is_cut_point",
    "prompt_settings",
    "reusable_ends",
    "run_server",
]
