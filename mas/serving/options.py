"""Keys of ``mas_serve``: the shared inference keys plus the server's own."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from mas.config import option
from mas.generation.options import InferenceOptions

__all__ = ["ServeOptions"]


@dataclass(kw_only=True)
class ServeOptions(InferenceOptions):
    """Keys of ``mas_serve``.

    Inherited keys read as follows when serving: ``batch_size`` is the number of sequences
    decoded together (KV-cache rows); ``max_new_tokens`` is the ``max_tokens`` of a request that
    sets none; ``max_cache_len`` is one sequence's context (prompt + answer);
    ``reuse_system_cache`` turns the segment-prefix cache on; ``seed`` seeds the process RNG that
    requests without a ``seed`` of their own sample from; ``attention``, ``prompt_format``
    and ``merge_system_and_user`` apply when the adapter does not record how it was trained;
    ``compile_decode`` compiles the batched decode forward (every row, one graph per power-of-two
    attention width; sampling stays per sequence, outside the graph) with ``compile_mode``.
    """

    host: str = option("127.0.0.1", "interface to listen on (0.0.0.0: every interface; there is no authentication)")
    port: int = option(8000, "TCP port", min=1, max=65535)
    served_model_name: Optional[str] = option(None, "the model id clients send (null: the adapter's run folder name, else 'mas-base')")
    max_queue: int = option(64, "sequences that may wait for a free row; more get HTTP 429", min=0)
    prefix_cache_max_tokens: int = option(65536, "tokens of prompt prefixes the prefix cache keeps (LRU)", min=1)
    prefix_cache_max_mib: float = option(1024.0, "memory of the prefix cache's keys and values, MiB (LRU)", min=0.0)
    max_n: int = option(8, "largest `n` (choices per request) accepted", min=1)
    shutdown_timeout_s: float = option(10.0, "on SIGTERM/SIGINT, time in-flight requests get to finish before they are cancelled", min=0.0)
    log_level: Literal["debug", "info", "warning", "error"] = option("info", "server log level (one JSON line per request at info)")
