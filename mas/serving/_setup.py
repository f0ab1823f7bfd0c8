"""From typed options to a running server: load the model as ``mas_generate`` does, decide how
to prompt it, build the engine, the app, and run uvicorn.

How to prompt: an adapter records how it was trained (``adapter_config.json`` ``"mas"``:
attention, prompt format, merged system and user). Those are used; a config that says otherwise
gets a warning at start-up (and, for the attention mode, in every response), as
``mas.generation.loading.prompt_mismatch_warnings`` does for generation. Without an adapter
(base or merged weights) the config decides.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from mas.checkpointing import ADAPTER_WEIGHTS_FILE
from mas.errors import ConfigError
from mas.fingerprint import file_sha256
from mas.generation.loading import InferenceModel, load_for_inference
from mas.segments import SegmentBuilder
from mas.serving._app import ServerState, create_app
from mas.serving._engine import Engine
from mas.serving._metrics import ServeMetrics
from mas.serving._prefix_cache import PrefixCache
from mas.serving.options import ServeOptions

__all__ = ["PromptSettings", "build_server", "prompt_settings", "run_server"]

log = logging.getLogger("mas_serve")


@dataclass
class PromptSettings:
    """How requests are segmented and masked, and what was noted while deciding it.

    Attributes:
        attention (str), prompt_format (str), merge_system_and_user (bool): what is used.
        response_warnings (List[str]): notes every response carries.
        notes (List[str]): start-up notes (logged, shown by ``/health``).
    """

    attention: str
    prompt_format: str
    merge_system_and_user: bool
    response_warnings: List[str]
    notes: List[str]


def prompt_settings(recorded: Optional[Dict[str, Any]], opts: ServeOptions) -> PromptSettings:
    """The adapter's recorded settings where present, else the config's (see module docstring).

    Args:
        recorded (Optional[Dict[str, Any]]): the adapter config's ``"mas"`` entry, or None.
        opts (ServeOptions): the config.
    """
    recorded = recorded or {}
    chosen: Dict[str, Any] = {}
    response_warnings: List[str] = []
    notes: List[str] = []
    for key in ("attention", "prompt_format", "merge_system_and_user"):
        configured = getattr(opts, key)
        trained = recorded.get(key)
        chosen[key] = configured if trained is None else trained
        if trained is not None and trained != configured:
            note = f"the config says {key}={configured}, but the adapter was trained with {key}={trained}: serving with {key}={trained}"
            notes.append(note)
            if key == "attention":
                response_warnings.append(note)
    if chosen["merge_system_and_user"]:
        notes.append(
            "merge_system_and_user=True: the system prompt and the user turn are one segment, so no prefix before the end "
            "of a user turn is reusable (the prefix cache only helps later turns of a chat)"
        )
    if not opts.reuse_system_cache:
        notes.append("reuse_system_cache=False: the prefix cache is off; every prompt is prefilled whole")
    return PromptSettings(chosen["attention"], chosen["prompt_format"], bool(chosen["merge_system_and_user"]), response_warnings, notes)


def _adapter_identity(loaded: InferenceModel, opts: ServeOptions) -> str:
    """Names the weights in the prefix cache's keys: base checkpoint plus adapter file hash."""
    parts = [str(getattr(opts.checkpointer, "checkpoint_dir", "")), str(opts.model.get("_component_", ""))]
    if loaded.adapter_path is not None:

        digest = file_sha256(loaded.adapter_path / ADAPTER_WEIGHTS_FILE)[:16]
        parts.append(f"{loaded.adapter_path}@{digest}")
    return "|".join(parts)


def _model_name(loaded: InferenceModel, opts: ServeOptions) -> str:
    if opts.served_model_name:
        return opts.served_model_name
    path = loaded.adapter_path
    if path is None:
        return "mas-base"
    # <run>/checkpoints/step_N -> <run>'s name
    return path.parents[1].name if path.parent.name == "checkpoints" else path.name


def build_server(opts: ServeOptions) -> ServerState:
    """Load the model and tokenizer, and build the engine (started) and the server state."""
    import torch

    if opts.seed is not None:
        torch.manual_seed(opts.seed)  # requests without a seed of their own draw from this RNG
    setup = load_for_inference(opts, adapter_checkpoint=opts.adapter_checkpoint)
    tokenizer, loaded, device, dtype = setup.tokenizer, setup.loaded, setup.device, setup.dtype
    settings = prompt_settings((loaded.adapter_config or {}).get("mas"), opts)
    for note in settings.notes:
        log.warning(note)
    max_len = opts.max_cache_len or loaded.model.max_seq_len
    prefix_cache = None
    if opts.reuse_system_cache:
        prefix_cache = PrefixCache(max_tokens=opts.prefix_cache_max_tokens, max_bytes=int(opts.prefix_cache_max_mib * 2**20))
    model = loaded.model
    kv_bytes = 2 * sum(m.num_kv_heads * m.head_dim for m in _attention_layers(model)) * dtype.itemsize * max_len * opts.batch_size
    log.warning(
        "KV cache: %d rows x %d tokens = %.2f GiB (lower batch_size or max_cache_len to shrink it)", opts.batch_size, max_len, kv_bytes / 2**30
    )
    try:
        engine = _build_engine(opts, settings, loaded, tokenizer, max_len, prefix_cache)
    except (torch.OutOfMemoryError, MemoryError):
        raise ConfigError(
            f"the KV cache ({opts.batch_size} rows x {max_len} tokens, {kv_bytes / 2**30:.1f} GiB) does not fit on {device}; "
            "lower batch_size or max_cache_len"
        ) from None
    cache = engine.prefix_cache
    return _state(opts, settings, loaded, tokenizer, engine, cache)


def _attention_layers(model: Any) -> List[Any]:
    from torchtune.modules import MultiHeadAttention

    return [m for m in model.modules() if isinstance(m, MultiHeadAttention)]


def _build_engine(opts: ServeOptions, settings: PromptSettings, loaded: InferenceModel, tokenizer: Any, max_len: int, prefix_cache: Optional[PrefixCache]) -> Engine:
    return Engine(
        loaded.model,
        tokenizer,
        attention=settings.attention,  # type: ignore[arg-type]
        attention_backend=opts.attention_backend,
        rows=opts.batch_size,
        max_len=max_len,
        max_queue=opts.max_queue,
        prefix_cache=prefix_cache,
        namespace=_adapter_identity(loaded, opts),
        pad_id=getattr(tokenizer, "pad_id", None) or 0,
        compile_decode=opts.compile_decode,
        compile_mode=opts.compile_mode,
    )


def _state(opts: ServeOptions, settings: PromptSettings, loaded: InferenceModel, tokenizer: Any, engine: Engine, cache: Optional[PrefixCache]) -> ServerState:
    metrics = ServeMetrics(
        queue_depth=engine.queue_depth,
        active_slots=engine.active_slots,
        cached_tokens=lambda: cache.tokens if cache else 0,
        cached_bytes=lambda: cache.bytes if cache else 0,
        prefix_hits=lambda: cache.stats.hits if cache else 0,
        prefix_misses=lambda: cache.stats.misses if cache else 0,
        prefix_saved_tokens=lambda: cache.stats.saved_tokens if cache else 0,
    )
    engine.metrics = metrics
    builder = SegmentBuilder(tokenizer, prompt_format=settings.prompt_format, merge_system_and_user=settings.merge_system_and_user)  # type: ignore[arg-type]
    engine.start()
    return ServerState(
        engine=engine,
        builder=builder,
        metrics=metrics,
        model_name=_model_name(loaded, opts),
        attention=settings.attention,  # type: ignore[arg-type]
        default_max_tokens=opts.max_new_tokens,
        max_n=opts.max_n,
        warnings=settings.response_warnings,
        notes=settings.notes,
    )


def run_server(state: ServerState, opts: ServeOptions) -> None:
    """Serve until SIGINT/SIGTERM; in-flight requests get ``shutdown_timeout_s`` to finish."""
    import uvicorn

    app = create_app(state)
    config = uvicorn.Config(
        app,
        host=opts.host,
        port=opts.port,
        log_level=opts.log_level,
        access_log=False,  # one structured line per request instead (mas_serve.requests)
        timeout_graceful_shutdown=opts.shutdown_timeout_s,
    )
    server = uvicorn.Server(config)
    log.warning(
        "mas_serve: %s (attention=%s, prompt_format=%s, %d rows x %d tokens, prefix cache %s, decode %s) on http://%s:%d",
        state.model_name,
        state.attention,
        state.builder.prompt_format,
        state.engine.num_rows,
        state.engine.max_len,
        "on" if state.engine.prefix_cache is not None else "off",
        f"compiled ({opts.compile_mode}; the first step at each power-of-two width compiles)" if opts.compile_decode else "eager",
        opts.host,
        opts.port,
    )
    try:
        server.run()
    finally:
        state.engine.stop(0.0)
