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
from typing import Any, Dict, List, Optional, Tuple

from mas.checkpointing import ADAPTER_WEIGHTS_FILE
from mas.errors import ConfigError
from mas.fingerprint import file_sha256
from mas.generation.loading import InferenceModel, load_adapter_beside, load_for_inference
from mas.generation.options import generation_settings, prompt_settings, with_prompt_settings
from mas.generation.prefix_cache import PrefixCache
from mas.segments import SegmentBuilder
from mas.serving._app import ServedModel, ServerState, create_app
from mas.serving._engine import Engine
from mas.serving._metrics import ServeMetrics
from mas.serving.options import ServeOptions

__all__ = ["API_KEY_VARIABLE", "allowed_hosts", "build_server", "check_port_free", "run_server", "server_state"]

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


def _adapter_specs(opts: ServeOptions) -> List[Tuple[Optional[str], Optional[str]]]:
    """``(served name or None, adapter folder or None)`` per served model, in order.

    Raises:
        ConfigError: ``adapters`` together with ``adapter_checkpoint`` or ``served_model_name``,
            or an empty name.
    """
    if not opts.adapters:
        return [(opts.served_model_name, opts.adapter_checkpoint)]
    if opts.adapter_checkpoint:
        raise ConfigError("set adapters or adapter_checkpoint, not both (adapter_checkpoint=<folder> is adapters={<name>: <folder>})")
    if opts.served_model_name:
        raise ConfigError("served_model_name names the one model of adapter_checkpoint; with adapters, the keys of adapters are the names")
    bad = [name for name in opts.adapters if not str(name).strip()]
    if bad:
        raise ConfigError("adapters: every adapter needs a non-empty name (the `model` clients send)")
    return [(str(name), str(path)) for name, path in opts.adapters.items()]


def _load_models(opts: ServeOptions) -> Tuple[Any, List[Tuple[Optional[str], InferenceModel]], Any, Any]:
    """The tokenizer and every served model (the first loads the base; the others share it)."""
    specs = _adapter_specs(opts)
    setup = load_for_inference(opts, adapter_checkpoint=specs[0][1])
    models = [(specs[0][0], setup.loaded)]
    for name, path in specs[1:]:
        log.warning("loading adapter %s (%s) over the same base weights", name, path)
        beside = load_adapter_beside(
            setup.loaded, opts.model, path, device=setup.device, dtype=setup.dtype, attention_backend=opts.attention_backend, allow_other_base=opts.allow_other_base  # type: ignore[arg-type]
        )
        models.append((name, beside))
    return setup.tokenizer, models, setup.device, setup.dtype


def build_server(opts: ServeOptions) -> ServerState:
    """Load the model(s) and tokenizer, and build the engines (started) and the server state.

    With ``adapters``, each adapter is its own model over one base (shared weights) with its
    own engine (``max_num_seqs`` rows) and prompt settings; one prefix cache keyed by adapter.
    """
    import torch

    check_port_free(opts.host, opts.port)  # before minutes of loading, not after
    if opts.seed is not None:
        torch.manual_seed(opts.seed)  # requests without a seed of their own draw from this RNG
    tokenizer, models, device, dtype = _load_models(opts)
    first = models[0][1].model
    max_len = opts.max_cache_len or first.max_seq_len
    kv_bytes = 2 * sum(m.num_kv_heads * m.head_dim for m in _attention_layers(first)) * dtype.itemsize * max_len * opts.max_num_seqs * len(models)
    log.warning(
        "KV cache: %d model(s) x %d rows x %d tokens = %.2f GiB (lower max_num_seqs or max_cache_len to shrink it)",
        len(models), opts.max_num_seqs, max_len, kv_bytes / 2**30,
    )  # fmt: skip
    shared_cache = PrefixCache(opts.prefix_cache_max_tokens, int(opts.prefix_cache_max_mib * 2**20)) if opts.reuse_system_cache else None
    served: Dict[str, ServedModel] = {}
    notes: List[str] = []
    engines: List[Engine] = []
    try:
        for name, loaded in models:
            prompts = prompt_settings((loaded.adapter_config or {}).get("mas"), opts)
            for note in prompts.mismatches + prompts.notes:
                log.warning("%s%s", f"{name}: " if name else "", note)
            model_opts = with_prompt_settings(opts, prompts)
            engine = Engine(
                loaded.model,
                tokenizer,
                generation_settings(model_opts, rows=opts.max_num_seqs),
                max_queue=opts.max_queue,
                namespace=_adapter_identity(loaded, opts),
                prefix_cache=shared_cache,
                pad_id=getattr(tokenizer, "pad_id", None) or 0,
            )
            engines.append(engine)
            model_name = name or _model_name(loaded, opts)
            if model_name in served:
                raise ConfigError(f"two adapters are served as `{model_name}`; give them different names")
            builder = SegmentBuilder(tokenizer, prompt_format=prompts.prompt_format, merge_system_and_user=prompts.merge_system_and_user)
            warnings = [m for m in prompts.mismatches if m.startswith("attention=")]
            served[model_name] = ServedModel(model_name, engine, builder, prompts.attention, warnings, None if loaded.adapter_path is None else str(loaded.adapter_path))
            notes += [f"{model_name}: {n}" if len(models) > 1 else n for n in prompts.mismatches + prompts.notes]
    except (torch.OutOfMemoryError, MemoryError):
        raise ConfigError(
            f"the KV caches ({len(models)} x {opts.max_num_seqs} rows x {max_len} tokens, {kv_bytes / 2**30:.1f} GiB) do not fit on {device}; "
            "lower max_num_seqs or max_cache_len"
        ) from None
    return server_state(opts, served, notes)


def _attention_layers(model: Any) -> List[Any]:
    from torchtune.modules import MultiHeadAttention

    return [m for m in model.modules() if isinstance(m, MultiHeadAttention)]


def server_state(opts: ServeOptions, served: Dict[str, ServedModel], notes: List[str]) -> ServerState:
    """The server state of built models: their engines get the metrics and are started."""
    engines = [m.engine for m in served.values()]
    cache = engines[0].prefix_cache  # shared by every engine
    metrics = ServeMetrics(
        queue_depth=lambda: sum(e.queue_depth() for e in engines),
        active_slots=lambda: sum(e.active_slots() for e in engines),
        cached_tokens=lambda: cache.tokens if cache else 0,
        cached_bytes=lambda: cache.bytes if cache else 0,
        prefix_hits=lambda: cache.stats.hits if cache else 0,
        prefix_misses=lambda: cache.stats.misses if cache else 0,
        prefix_saved_tokens=lambda: cache.stats.saved_tokens if cache else 0,
    )
    for engine in engines:
        engine.metrics = metrics
        engine.start()
    if not opts.reuse_system_cache:
        notes.append("reuse_system_cache=False: the prefix cache is off; every prompt is prefilled whole")
    return ServerState(
        api_key=opts.api_key or os.environ.get(API_KEY_VARIABLE) or None,
        allowed_hosts=allowed_hosts(opts),
        max_request_bytes=opts.max_request_bytes,
        models=served,
        metrics=metrics,
        default_max_tokens=opts.max_new_tokens,
        max_n=opts.max_n,
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
                threading.Thread(target=self.mas_state.stop, args=(self.drain_s,), name="mas-serve-drain", daemon=True).start()
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
        "mas_serve: %s (%d rows x %d tokens each, prefix cache %s, decode %s, API key %s) on http://%s:%d",
        ", ".join(f"{m.name} (attention={m.attention}, prompt_format={m.builder.prompt_format})" for m in state.models.values()),
        state.default.engine.num_rows,
        state.default.engine.max_len,
        "on" if state.default.engine.prefix_cache is not None else "off",
        f"compiled ({opts.compile_mode}; the first step at each power-of-two width compiles)" if opts.compile_decode else "eager",
        "required" if state.api_key else "off",
        opts.host,
        opts.port,
    )
    try:
        server.run()
    finally:
        state.stop(0.0)
