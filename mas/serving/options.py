"""Keys of ``mas_serve``: the shared inference keys plus the server's own."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Dict, List, Literal, Optional

from mas.config import option
from mas.generation.options import InferenceOptions

__all__ = ["ServeOptions"]


@dataclass(kw_only=True)
class ServeOptions(InferenceOptions):
    """Keys of ``mas_serve``.

    The shared keys mean what they mean in ``mas_generate`` and ``mas_eval`` (one engine);
    ``max_new_tokens`` is the ``max_tokens`` of a request that sets none, and ``seed`` seeds the
    process RNG that requests without a ``seed`` of their own sample from.
    """

    #: Keys other inference recipes have under another name (named in the error).
    RENAMED_KEYS: ClassVar[Dict[str, str]] = {"batch_size": "max_num_seqs"}

    max_num_seqs: int = option(8, "sequences decoded together (KV-cache rows); more wait in the queue", min=1)
    host: str = option("127.0.0.1", "interface to listen on (0.0.0.0: every interface; set api_key and allowed_hosts then)")
    port: int = option(8000, "TCP port (checked free before the model loads)", min=1, max=65535)
    api_key: Optional[str] = option(None, "require 'Authorization: Bearer <key>' on the /v1 routes (null: the MAS_SERVE_API_KEY environment variable if set, else no key)")
    allowed_hosts: Optional[List[str]] = option(None, "Host header values accepted, against DNS rebinding (null: the bind address, localhost, 127.0.0.1 and ::1; ['*']: any)")
    max_request_bytes: int = option(4 * 2**20, "largest request body, bytes (larger: HTTP 413, read no further)", min=1)
    served_model_name: Optional[str] = option(None, "the model id clients send (null: the adapter's run folder name, else 'mas-base'); not with adapters")
    adapters: Optional[Dict[str, str]] = option(
        None,
        "several adapters over one base, by the name clients send as `model`: {name: adapter or run folder}; each prompted as it was trained, "
        "each with max_num_seqs rows of its own, the base weights shared (null: adapter_checkpoint alone)",
    )
    max_queue: int = option(64, "sequences that may wait for a free row; more get HTTP 429", min=0)
    max_n: int = option(8, "largest `n` (choices per request) accepted", min=1)
    shutdown_timeout_s: float = option(10.0, "on SIGTERM/SIGINT, time in-flight requests get to finish before they are cancelled", min=0.0)
    log_level: Literal["debug", "info", "warning", "error"] = option("info", "server log level (one JSON line per request at info)")
