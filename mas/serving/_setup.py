"""From typed options to a running server: load the model as ``mas_generate`` does, decide how
to prompt it (:func:`mas.generation.options.prompt_settings`, the policy of every inference
recipe), build the engine (:func:`mas.generation.options.generation_settings`), the app, and run
uvicorn.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Any, List

from mas.checkpointing import ADAPTER_WEIGHTS_FILE
from mas.errors import ConfigError
from mas.fingerprint import file_sha256
from mas.generation.loading import InferenceModel, load_for_inference
from mas.generation.options import PromptSettings, generation_settings, prompt_settings, with_prompt_settings
from mas.segments import SegmentBuilder
from mas.serving._app import ServerState, create_app
from mas.serving._engine import Engine
from mas.serving._metrics import ServeMetrics
from mas.serving.options import ServeOptions

__all__ = ["API_KEY_VARIABLE", "allowed_hosts", "build_server", "check_port_free", "run_server"]

log = logging.getLogger("mas_serve")


#: The environment variable an API key may come from (so it stays out of configs and logs).
API_KEY_VARIABLE = "MAS_SERVE_API_KEY"


def check_port_free(host: str, port: int) -> None:
    """Raise a one-line ``ConfigError`` when ``host:port`` cannot be bound (taken, or not an
    address of this machine)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror}); set port=<a free port> or host=<an address of this machine>") from None


def allowed_hosts(opts: ServeOptions) -> List[str]:
    """``Host`` header values accepted: the config's, else the bind address and the loopback
    names (any host when bound to every interface: then set ``allowed_hosts``)."""
    if opts.allowed_hosts is not None:
        return list(opts.allowed_hosts)
    if opts.host in ("0.0.0.0", "::"):
        return ["*"]
    return sorted({opts.host, "localhost", "127.0.0.1", "::1", "[::1]"})


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

    check_port_free(opts.host, opts.port)  # before minutes of loading, not after
    if opts.seed is not None:
        torch.manual_seed(opts.seed)  # requests without a seed of their own draw from this RNG
    setup = load_for_inference(opts, adapter_checkpoint=opts.adapter_checkpoint)
    tokenizer, loaded, device, dtype = setup.tokenizer, setup.loaded, setup.device, setup.dtype
    prompts = prompt_settings((loaded.adapter_config or {}).get("mas"), opts)
    for note in prompts.mismatches + prompts.notes:
        log.warning(note)
    opts = with_prompt_settings(opts, prompts)
    max_len = opts.max_cache_len or loaded.model.max_seq_len
    model = loaded.model
    kv_bytes = 2 * sum(m.num_kv_heads * m.head_dim for m in _attention_layers(model)) * dtype.itemsize * max_len * opts.max_num_seqs
    log.warning(
        "KV cache: %d rows x %d tokens = %.2f GiB (lower max_num_seqs or max_cache_len to shrink it)", opts.max_num_seqs, max_len, kv_bytes / 2**30
    )
    try:
        engine = Engine(
            loaded.model,
            tokenizer,
            generation_settings(opts, rows=opts.max_num_seqs),
            max_queue=opts.max_queue,
            namespace=_adapter_identity(loaded, opts),
            pad_id=getattr(tokenizer, "pad_id", None) or 0,
        )
    except (torch.OutOfMemoryError, MemoryError):
        raise ConfigError(
            f"the KV cache ({opts.max_num_seqs} rows x {max_len} tokens, {kv_bytes / 2**30:.1f} GiB) does not fit on {device}; "
            "lower max_num_seqs or max_cache_len"
        ) from None
    return _state(opts, prompts, loaded, tokenizer, engine)


def _attention_layers(model: Any) -> List[Any]:
    from torchtune.modules import MultiHeadAttention

    return [m for m in model.modules() if isinstance(m, MultiHeadAttention)]


def _state(opts: ServeOptions, prompts: PromptSettings, loaded: InferenceModel, tokenizer: Any, engine: Engine) -> ServerState:
    cache = engine.prefix_cache
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
    builder = SegmentBuilder(tokenizer, prompt_format=prompts.prompt_format, merge_system_and_user=prompts.merge_system_and_user)
    engine.start()
    notes = prompts.mismatches + prompts.notes
    if not opts.reuse_system_cache:
        notes.append("reuse_system_cache=False: the prefix cache is off; every prompt is prefilled whole")
    return ServerState(
        api_key=opts.api_key or os.environ.get(API_KEY_VARIABLE) or None,
        allowed_hosts=allowed_hosts(opts),
        max_request_bytes=opts.max_request_bytes,
        engine=engine,
        builder=builder,
        metrics=metrics,
        model_name=_model_name(loaded, opts),
        attention=prompts.attention,
        default_max_tokens=opts.max_new_tokens,
        max_n=opts.max_n,
        warnings=[m for m in prompts.mismatches if m.startswith("attention=")],
        notes=notes,
    )


#: Seconds uvicorn waits for connections after the engine's drain has ended every sequence.
DRAIN_MARGIN_S = 5.0


def _draining_server_type() -> type:
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn's server whose SIGTERM/SIGINT first drains the engine: it stops taking
        requests (503 with ``Retry-After``), lets in-flight ones finish for ``drain_s``, then
        ends the rest with an error event (a stream's last lines are an error and ``[DONE]``,
        a waiting non-streamed request gets a 503), never a connection cut mid-body."""

        def __init__(self, config: Any, state: ServerState, drain_s: float) -> None:
            super().__init__(config)
            self.mas_state, self.drain_s = state, drain_s

        def handle_exit(self, sig: int, frame: Any) -> None:
            if not self.mas_state.shutting_down:
                self.mas_state.shutting_down = True
                log.warning("mas_serve: stopping; in-flight requests get %.0f s to finish", self.drain_s)
                threading.Thread(target=self.mas_state.engine.stop, args=(self.drain_s,), name="mas-serve-drain", daemon=True).start()
            super().handle_exit(sig, frame)

    return DrainingServer


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
        # The engine drains first (below); this only bounds connections that still hang after it.
        timeout_graceful_shutdown=opts.shutdown_timeout_s + DRAIN_MARGIN_S,
    )
    server = _draining_server_type()(config, state, opts.shutdown_timeout_s)
    log.warning(
        "mas_serve: %s (attention=%s, prompt_format=%s, %d rows x %d tokens, prefix cache %s, decode %s, API key %s) on http://%s:%d",
        state.model_name,
        state.attention,
        state.builder.prompt_format,
        state.engine.num_rows,
        state.engine.max_len,
        "on" if state.engine.prefix_cache is not None else "off",
        f"compiled ({opts.compile_mode}; the first step at each power-of-two width compiles)" if opts.compile_decode else "eager",
        "required" if state.api_key else "off",
        opts.host,
        opts.port,
    )
    try:
        server.run()
    finally:
        state.engine.stop(0.0)
