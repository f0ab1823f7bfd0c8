"""The HTTP layer: FastAPI routes in front of the engine (which alone touches the model).

FastAPI + uvicorn: a widely used, maintained ASGI stack with native ``async`` streaming (server-
sent events through ``StreamingResponse``), request-disconnect detection and graceful shutdown,
and the stack vLLM's and SGLang's OpenAI servers use, so clients see familiar behaviour.

Each choice of a request is one engine sequence; its events cross from the engine thread to the
event loop with ``call_soon_threadsafe``. A streaming client that disconnects closes the
generator, which cancels its sequences; a non-streaming one is watched for disconnects.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Dict, List, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from mas.generation.logprobs import TokenLogprob, is_prediction
from mas.masks import AttentionMode
from mas.segments import IGNORE_INDEX, SegmentBuilder, SegmentedSequence
from mas.serving._engine import Engine, EngineStoppedError, Event, PromptTooLongError, QueueFullError, SamplingParams, SequenceHandle, TooManySequencesError
from mas.serving._metrics import CONTENT_TYPE_LATEST, ServeMetrics
from mas.serving._logprobs import chat_logprobs, completion_logprobs, vllm_prompt_logprobs
from mas.serving._protocol import ChatCompletionRequest, CompletionRequest, RequestError, error_body, parse_request, prompt_messages_of, token_prompts_of

__all__ = ["ServedModel", "ServerState", "create_app"]

access_log = logging.getLogger("mas_serve.requests")


@dataclass
class ServedModel:
    """One model a request's ``model`` can name: the base with one adapter, its engine, and how
    it is prompted (as its adapter was trained).

    Attributes:
        name (str): the id clients send as ``model``.
        engine (Engine): its running engine (its own rows; the base weights are shared).
        builder (SegmentBuilder): messages -> segments, with its training settings.
        attention (AttentionMode): the prefill mode its requests get.
        warnings (List[str]): notes each of its responses carries (a config that asked for
            another mode than its adapter was trained with).
        adapter (Optional[str]): the adapter folder, if any.
    """

    name: str
    engine: Engine
    builder: SegmentBuilder
    attention: AttentionMode
    warnings: List[str] = field(default_factory=list)
    adapter: Optional[str] = None


@dataclass
class ServerState:
    """What the routes need.

    Attributes:
        models (Dict[str, ServedModel]): by name, the first is the default (``/tokenize`` without
            ``model``; ``/health``'s top-level fields).
        metrics (ServeMetrics): the server's metrics.
        default_max_tokens (int): ``max_tokens`` of a request that sets none.
        max_n (int): largest ``n``.
        notes (List[str]): start-up notes shown by ``/health``.
        api_key (Optional[str]): the key the ``/v1`` routes require as ``Authorization: Bearer``.
        allowed_hosts (List[str]): ``Host`` header values accepted (``["*"]``: any).
        max_request_bytes (int): the largest request body read.
    """

    models: Dict[str, ServedModel]
    metrics: ServeMetrics
    default_max_tokens: int
    max_n: int = 8
    notes: List[str] = field(default_factory=list)
    created: int = field(default_factory=lambda: int(time.time()))
    shutting_down: bool = False
    api_key: Optional[str] = None
    allowed_hosts: List[str] = field(default_factory=lambda: ["*"])
    max_request_bytes: int = 4 * 2**20

    @property
    def default(self) -> ServedModel:
        return next(iter(self.models.values()))

    @property
    def engines(self) -> List[Engine]:
        return [m.engine for m in self.models.values()]

    @property
    def tokenizer(self) -> Any:
        """The one tokenizer (every adapter is over the same base)."""
        return self.default.builder.tokenizer

    def model(self, name: str) -> ServedModel:
        """The model a request names.

        Raises:
            RequestError: 404 naming the served models.
        """
        served = self.models.get(name)
        if served is None:
            names = ", ".join(f"`{n}`" for n in self.models)
            raise RequestError(f"model: the model `{name}` does not exist; this server serves {names}", "model", status=404, code="model_not_found")
        return served

    def stop(self, drain_timeout_s: float = 0.0) -> None:
        """Stop every engine (in parallel: they drain for the same time)."""
        threads = [threading.Thread(target=e.stop, args=(drain_timeout_s,), daemon=True) for e in self.engines]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def _error(e: RequestError) -> JSONResponse:
    return JSONResponse(error_body(e.message, param=e.param, code=e.code, type=e.type), status_code=e.status)


#: Seconds a client is told to wait after a 503 (the server is stopping; a restart takes about this).
RETRY_AFTER_S = 30


def _unavailable(message: str) -> JSONResponse:
    """503 with ``Retry-After``: the server is stopping."""
    return JSONResponse(error_body(message, type="server_error"), status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})


class _Choices:
    """The engine sequences of one request and the queue their events arrive on."""

    def __init__(self, handles_of: Any) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: "asyncio.Queue[tuple[int, Event]]" = asyncio.Queue()
        self.handles: List[SequenceHandle] = handles_of(self._callback)

    def _callback(self, index: int):
        def push(event: Event) -> None:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))

        return push

    def cancel(self) -> None:
        for h in self.handles:
            if h.finish_reason is None:
                h.cancel()


def create_app(state: ServerState) -> FastAPI:
    """The FastAPI app serving ``state`` (see the module docstring for the routes)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        # uvicorn has already let in-flight requests finish (or cancelled them past its timeout).
        state.shutting_down = True
        await asyncio.get_running_loop().run_in_executor(None, state.stop, 0.0)

    app = FastAPI(title="mas_serve", lifespan=lifespan)
    app.state.mas = state
    if state.allowed_hosts != ["*"]:
        # A page on another site that rebinds its DNS name to this address sends its own Host.
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=state.allowed_hosts)

    @app.middleware("http")
    async def require_api_key(request: Request, call_next: Any) -> Response:
        if state.api_key is not None and request.url.path not in ("/health", "/metrics"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {state.api_key}".encode()):
                body = error_body("invalid or missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
                return JSONResponse(body, status_code=401)
        return await call_next(request)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return JSONResponse(error_body(f"{request.method} {request.url.path}: {exc.detail}", code=code), status_code=exc.status_code)

    @app.get("/health")
    async def health() -> JSONResponse:
        default = state.default
        engine = default.engine
        cache = engine.prefix_cache  # one cache for every model (keyed by adapter)
        ok = all(e.is_alive() for e in state.engines) and not state.shutting_down
        body = {
            "status": "ok" if ok else "unavailable",
            "model": default.name,
            "attention": default.attention,
            "active_slots": sum(e.active_slots() for e in state.engines),
            "rows": sum(e.num_rows for e in state.engines),
            "queue_depth": sum(e.queue_depth() for e in state.engines),
            "max_queue": engine.max_queue,
            "context_length": engine.max_len,
            "prefix_cache": None
            if cache is None
            else {"entries": len(cache), "tokens": cache.tokens, "bytes": cache.bytes, "hits": cache.stats.hits, "misses": cache.stats.misses, "saved_tokens": cache.stats.saved_tokens},
            "models": [{"id": m.name, "attention": m.attention, "active_slots": m.engine.active_slots(), "queue_depth": m.engine.queue_depth()} for m in state.models.values()],
            "notes": state.notes,
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        cards = [
            {"id": m.name, "object": "model", "created": state.created, "owned_by": "mas", "max_model_len": m.engine.max_len, "attention": m.attention, "prompt_format": m.builder.prompt_format, "adapter": m.adapter}
            for m in state.models.values()
        ]
        return JSONResponse({"object": "list", "data": cards})

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        """The token ids and segment ids a request's prompt is prefilled with: ``{"messages": [...]}``
        (a chat) or ``{"prompt": ...}``; ``model`` optional."""
        try:
            _check_json(request)
            raw = await _read_body(request)
            return JSONResponse(await asyncio.get_running_loop().run_in_executor(None, _tokenize, raw))
        except RequestError as e:
            return _error(e)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        """``{"tokens": [ids]}`` -> ``{"prompt": text}``."""
        try:
            _check_json(request)
            data = _loads(await _read_body(request))
            tokens = data.get("tokens") if isinstance(data, dict) else None
            vocab = state.default.engine.core.vocab
            if not isinstance(tokens, list) or not all(type(t) is int and 0 <= t < vocab for t in tokens):
                raise RequestError(f"tokens: expected a list of token ids in [0, {vocab})", "tokens")
            return JSONResponse({"prompt": state.tokenizer.decode(tokens)})
        except RequestError as e:
            return _error(e)

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> JSONResponse:
        """The tokenizer's special tokens (vLLM's route; lm-evaluation-harness's ``remote`` tokenizer
        reads it). No chat template: chats are rendered here, message by message, into segments."""
        tokenizer = state.tokenizer
        names = {i: name for name, i in _special_tokens(tokenizer).items()}
        eos, bos = getattr(tokenizer, "eos_id", None), getattr(tokenizer, "bos_id", None)
        return JSONResponse(
            {"tokenizer_class": type(tokenizer).__name__, "eos_token": names.get(eos), "bos_token": names.get(bos), "pad_token": None, "chat_template": None, "model_max_length": state.default.engine.max_len}
        )

    def _raw_tokens(text: str) -> List[int]:
        """``text``'s ids with no template and no BOS/EOS; a special token's name is its id."""
        special = _special_tokens(state.tokenizer)
        if text in special:
            return [special[text]]
        return list(state.tokenizer.encode(text, add_bos=False, add_eos=False))

    def _tokenize(raw: bytes) -> Dict[str, Any]:
        data = _loads(raw)
        if not isinstance(data, dict):
            raise RequestError(f"the request body must be a JSON object, got {type(data).__name__}")
        if data.get("add_special_tokens") is False:
            # vLLM's raw form (what lm-evaluation-harness's remote tokenizer sends): the text's own
            # ids, which it then sends back as a token-id prompt.
            text = data.get("prompt")
            if not isinstance(text, str):
                raise RequestError("prompt: expected a string with add_special_tokens: false", "prompt")
            tokens = _raw_tokens(text)
            return {"tokens": tokens, "count": len(tokens), "max_model_len": state.default.engine.max_len}
        data = {"model": state.default.name, **data}
        kind = ChatCompletionRequest if "messages" in data else CompletionRequest
        body = parse_request(kind, data)
        served = state.model(body.model)
        prompts = [served.builder(m, for_generation=True) for m in prompt_messages_of(body)]
        rows = [{"count": len(p), "tokens": p.tokens, "segment_ids": p.segment_ids} for p in prompts]
        out: Dict[str, Any] = {"model": served.name, "max_model_len": served.engine.max_len, "attention": served.attention, "prompts": rows}
        if len(rows) == 1:
            out.update(rows[0])
        return out

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _complete(request, ChatCompletionRequest, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _complete(request, CompletionRequest, "completion")

    async def _complete(request: Request, kind: type, endpoint: str) -> Response:
        started = time.perf_counter()
        record: Dict[str, Any] = {"endpoint": endpoint, "id": f"{'chatcmpl' if endpoint == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"}
        try:
            _check_json(request)
            raw = await _read_body(request)
            # Parsing and tokenizing a large body takes time: not on the event loop, which
            # streams every other request's tokens.
            body, plan = await asyncio.get_running_loop().run_in_executor(None, _parse_and_plan, raw, kind, endpoint)
        except RequestError as e:
            return _finish_record(record, started, e.status, error=e.message, response=_error(e))
        record.update(stream=body.stream, n=body.n, warnings=plan["warnings"])
        try:
            choices = _Choices(lambda cb: [SequenceHandle(p, plan["params"][i], cb(i)) for i, p in enumerate(plan["prompts"])])
            plan["served"].engine.submit(choices.handles)
        except QueueFullError as e:
            return _finish_record(record, started, 429, error=str(e), response=_error(RequestError(str(e), status=429, code="rate_limit_exceeded", type="rate_limit_error")))
        except EngineStoppedError as e:
            return _finish_record(record, started, 503, error=str(e), response=_unavailable(str(e)))
        except PromptTooLongError as e:
            return _finish_record(record, started, 400, error=str(e), response=_error(RequestError(str(e), code="context_length_exceeded")))
        except TooManySequencesError as e:
            return _finish_record(record, started, 400, error=str(e), response=_error(RequestError(str(e), "n")))
        if body.stream:
            return StreamingResponse(_stream(choices, body, endpoint, plan, record, started), media_type="text/event-stream")
        return await _collect(request, choices, body, endpoint, plan, record, started)

    def _check_json(request: Request) -> None:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            # A form or text/plain POST from any web page must not run a generation.
            raise RequestError(f"the request body must be JSON with Content-Type: application/json, got {content_type or 'none'!r}", status=415)

    def _loads(raw: bytes) -> Any:
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(f"the request body is not valid JSON: {e}") from None
        except RecursionError:
            raise RequestError("the request body is nested too deeply") from None

    async def _read_body(request: Request) -> bytes:
        """The body, refused (413) past ``max_request_bytes`` without reading further."""
        limit = state.max_request_bytes
        too_large = RequestError(f"the request body is larger than this server's limit of {limit} bytes (max_request_bytes)", status=413)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    def _parse_and_plan(raw: bytes, kind: type, endpoint: str) -> Any:
        body = parse_request(kind, _loads(raw))
        return body, _plan(body, endpoint)

    def _plan(body: Any, endpoint: str) -> Dict[str, Any]:
        served = state.model(body.model)
        if body.n > state.max_n:
            raise RequestError(f"n: at most {state.max_n} choices per request, got {body.n}", "n")
        warnings = list(served.warnings)
        if body.attention is not None and body.attention != served.attention:
            note = f"attention={body.attention} was requested, but this model is served with attention={served.attention} (how its adapter was trained)"
            warnings.append(note)
            access_log.warning(note)
        stops = body.stop_strings()
        generated_logprobs = body.generated_logprobs()
        echo = bool(getattr(body, "echo", False))
        if endpoint == "chat" and body.model_extra and body.model_extra.get("echo") not in (None, False):
            raise RequestError("echo: not supported on chat completions; ask for prompt_logprobs (vLLM's field) to score the messages", "echo")
        if echo and generated_logprobs is not None and served.attention == "mas":
            raise RequestError(
                "echo: under attention=mas a completion prompt is one bidirectional segment, so the log-probabilities of its tokens are not "
                "predictions; score an answer through /v1/chat/completions with the answer as a final assistant message and prompt_logprobs, "
                "or serve a causal adapter",
                "echo",
            )
        prompt_logprobs = body.prompt_logprobs
        if echo and generated_logprobs is not None:
            prompt_logprobs = max(prompt_logprobs or 0, generated_logprobs)
        token_prompts = token_prompts_of(body) if endpoint == "completion" else None
        vocab = served.engine.core.vocab
        prompts = []
        if token_prompts is not None:
            for i, ids in enumerate(token_prompts):
                if not all(0 <= t < vocab for t in ids):
                    raise RequestError(f"prompt: token ids must be in [0, {vocab})", "prompt")
                # Token ids are the prompt as given (no template, no BOS added), one segment.
                prompts.append(SegmentedSequence(list(ids), [IGNORE_INDEX] * len(ids), [0] * len(ids)))
        else:
            for p_index, messages in enumerate(prompt_messages_of(body)):
                try:
                    prompts.append(served.builder(messages, for_generation=True))
                except ValueError as e:
                    raise RequestError(f"{'messages' if endpoint == 'chat' else 'prompt'}: {e}", "messages" if endpoint == "chat" else "prompt") from None
        context = served.engine.max_len
        field_name = "messages" if endpoint == "chat" else "prompt"
        max_tokens_field = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) is not None else "max_tokens"
        asked = getattr(body, "max_completion_tokens", None) or body.max_tokens
        params, sequences = [], []
        for prompt in prompts:
            if len(prompt) >= context:
                raise RequestError(
                    f"{field_name}: the prompt has {len(prompt)} tokens; this server's context is {context} tokens (prompt + answer)",
                    field_name,
                    code="context_length_exceeded",
                )
            if asked is not None and len(prompt) + asked > context:
                raise RequestError(
                    f"{max_tokens_field}: {asked} tokens do not fit after the {len(prompt)}-token prompt in the {context}-token context; "
                    f"ask for at most {context - len(prompt)}",
                    max_tokens_field,
                    code="context_length_exceeded",
                )
            max_tokens = asked if asked is not None else min(state.default_max_tokens, context - len(prompt))
            if max_tokens == 0 and not (echo or prompt_logprobs is not None):
                raise RequestError(f"{max_tokens_field}: must be at least 1 (0 only with echo or prompt_logprobs)", max_tokens_field)
            if body.min_tokens > max_tokens:
                raise RequestError(f"min_tokens: {body.min_tokens} is more than max_tokens ({max_tokens})", "min_tokens")
            if body.stop_token_ids and not all(0 <= t < vocab for t in body.stop_token_ids):
                raise RequestError(f"stop_token_ids: ids must be in [0, {vocab})", "stop_token_ids")
            for j in range(body.n):
                params.append(
                    SamplingParams(
                        max_tokens=max_tokens,
                        temperature=body.temperature if body.temperature is not None else 1.0,
                        top_p=body.top_p,
                        top_k=body.top_k if body.top_k not in (None, -1, 0) else None,
                        seed=None if body.seed is None else body.seed + j,  # choice j of a seeded request: seed + j
                        stop=stops,
                        ignore_stop_tokens=body.ignore_eos,
                        stop_token_ids=tuple(body.stop_token_ids or ()),
                        min_tokens=body.min_tokens,
                        presence_penalty=float(body.presence_penalty),
                        frequency_penalty=float(body.frequency_penalty),
                        repetition_penalty=float(body.repetition_penalty),
                        logprobs=generated_logprobs,
                        prompt_logprobs=prompt_logprobs,
                    )
                )
                sequences.append(prompt)
        prompt_texts: List[str] = []  # echo: each prompt as given (token ids: their text)
        if echo:
            given = body.prompt if isinstance(body.prompt, list) else [body.prompt]
            prompt_texts = [state.tokenizer.decode(ids) for ids in token_prompts] if token_prompts is not None else list(given)
        return {"served": served, "prompts": sequences, "params": params, "warnings": warnings, "echo": echo, "prompt_texts": prompt_texts}

    def _token_text(token: int) -> str:
        return state.tokenizer.decode([token])

    def _prompt_scores(handle: SequenceHandle, attention: AttentionMode) -> List[Optional[TokenLogprob]]:
        """The prompt's scores as reported: None for its first token and for tokens that are not
        predictions under the served mask."""
        valid = is_prediction(handle.prompt.segment_ids, attention)
        return [None] + [s if ok else None for s, ok in zip(handle.prompt_logprobs, valid)]

    def _echo_logprobs(handle: SequenceHandle, attention: AttentionMode) -> Dict[str, Any]:
        """The echoed prompt's ``logprobs`` (scored echo is refused under MAS in the plan)."""
        return completion_logprobs(_prompt_scores(handle, attention), handle.prompt.tokens, _token_text)

    def _choice_logprobs(handle: SequenceHandle, endpoint: str, echo: bool, attention: AttentionMode) -> Optional[Dict[str, Any]]:
        """A whole choice's ``logprobs`` (None when not asked for)."""
        if handle.params.logprobs is None:
            return None
        if endpoint == "chat":
            return chat_logprobs(handle.logprobs, _token_text)
        generated = completion_logprobs(handle.logprobs, handle.tokens[: len(handle.logprobs)], _token_text)
        if not echo:
            return generated
        prompt = _echo_logprobs(handle, attention)
        shift = sum(len(t) for t in prompt["tokens"])
        return {key: prompt[key] + ([o + shift for o in generated[key]] if key == "text_offset" else generated[key]) for key in prompt}

    def _usage(choices: _Choices, n: int) -> Dict[str, Any]:
        # As OpenAI counts it: each prompt once, however many choices it has (choices i*n..i*n+n-1
        # share prompt i).
        prompt_tokens = sum(len(h.prompt) for h in choices.handles[::n])
        completion = sum(len(h.tokens) for h in choices.handles)
        cached = sum(h.cached_tokens for h in choices.handles[::n])
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion, "prompt_tokens_details": {"cached_tokens": cached}}

    def _meta(choices: _Choices, body: Any, plan: Dict[str, Any]) -> Dict[str, Any]:
        meta: Dict[str, Any] = {"attention": plan["served"].attention, "cached_prompt_tokens": [h.cached_tokens for h in choices.handles], "warnings": plan["warnings"]}
        if body.return_token_ids:
            meta["token_ids"] = [list(h.tokens) for h in choices.handles]
        return meta

    async def _collect(request: Request, choices: _Choices, body: Any, endpoint: str, plan: Dict[str, Any], record: Dict[str, Any], started: float) -> Response:
        texts = [""] * len(choices.handles)
        reasons: List[Optional[str]] = [None] * len(choices.handles)
        pending = len(choices.handles)
        failure: Optional[Event] = None
        watcher = asyncio.create_task(_wait_disconnect(request))
        try:
            while pending:
                getter = asyncio.ensure_future(choices.queue.get())
                done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    choices.cancel()
                    return _finish_record(record, started, 499, error="client disconnected", choices=choices, response=Response(status_code=499))
                index, event = getter.result()
                texts[index] += event.text
                if event.kind == "finish":
                    reasons[index] = event.finish_reason
                    pending -= 1
                elif event.kind == "error":
                    failure = event
                    break
        finally:
            watcher.cancel()
        if failure is not None:
            choices.cancel()
            response = _unavailable(failure.message) if failure.status == 503 else _error(RequestError(failure.message, status=failure.status, type="server_error"))
            return _finish_record(record, started, failure.status, error=failure.message, choices=choices, response=response)
        created = int(time.time())
        handles = choices.handles
        echo = plan["echo"]
        if endpoint == "chat":
            out_choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": r, "logprobs": _choice_logprobs(h, endpoint, False, plan["served"].attention)} for i, (t, r, h) in enumerate(zip(texts, reasons, handles))]
            obj = "chat.completion"
        else:
            out_choices = []
            for i, (t, r, h) in enumerate(zip(texts, reasons, handles)):
                choice = {"index": i, "text": (plan["prompt_texts"][i // body.n] if echo else "") + t, "finish_reason": r, "logprobs": _choice_logprobs(h, endpoint, echo, plan["served"].attention)}
                if body.prompt_logprobs is not None:
                    choice["prompt_logprobs"] = vllm_prompt_logprobs(_prompt_scores(h, plan["served"].attention), _token_text)
                out_choices.append(choice)
            obj = "text_completion"
        response = {"id": record["id"], "object": obj, "created": created, "model": body.model, "choices": out_choices, "usage": _usage(choices, body.n), "mas": _meta(choices, body, plan)}
        if endpoint == "chat" and body.prompt_logprobs is not None:
            response["prompt_logprobs"] = vllm_prompt_logprobs(_prompt_scores(handles[0], plan["served"].attention), _token_text)  # vLLM: one per response
        return _finish_record(record, started, 200, choices=choices, response=JSONResponse(response))

    async def _stream(choices: _Choices, body: Any, endpoint: str, plan: Dict[str, Any], record: Dict[str, Any], started: float) -> AsyncIterator[str]:
        created = int(time.time())
        obj = "chat.completion.chunk" if endpoint == "chat" else "text_completion"
        status = 200

        echoed = [not plan["echo"]] * len(choices.handles)
        offsets = [0] * len(choices.handles)  # text_offset of each choice's next token (completions)

        def completion_chunk_logprobs(index: int, scores: Dict[str, Any]) -> Dict[str, Any]:
            """Shift a chunk's ``text_offset`` past what the choice streamed before."""
            scores["text_offset"] = [o + offsets[index] for o in scores["text_offset"]]
            offsets[index] += sum(len(t) for t in scores["tokens"])
            return scores

        def chunk(index: int, text: Optional[str], reason: Optional[str], *, role: bool = False, token: Optional[int] = None, meta: bool = False, logprobs: Optional[Dict[str, Any]] = None) -> str:
            if endpoint == "chat":
                delta: Dict[str, Any] = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
                choice: Dict[str, Any] = {"index": index, "delta": delta, "finish_reason": reason, "logprobs": logprobs}
            else:
                choice = {"index": index, "text": text or "", "finish_reason": reason, "logprobs": logprobs}
            if token is not None and body.return_token_ids:
                choice["token_ids"] = [token]
            out: Dict[str, Any] = {"id": record["id"], "object": obj, "created": created, "model": body.model, "choices": [choice]}
            if meta:
                out["mas"] = _meta(choices, body, plan)
            return "data: " + json.dumps(out) + "\n\n"

        try:
            if endpoint == "chat":
                for i in range(len(choices.handles)):
                    yield chunk(i, None, None, role=True)
            pending = len(choices.handles)
            while pending:
                index, event = await choices.queue.get()
                if not echoed[index] and event.kind != "error":
                    # The prompt is prefilled (and scored) before any event: its text comes first.
                    echoed[index] = True
                    handle = choices.handles[index]
                    echo_scores = completion_chunk_logprobs(index, _echo_logprobs(handle, plan["served"].attention)) if handle.params.logprobs is not None else None
                    yield chunk(index, plan["prompt_texts"][index // body.n], None, logprobs=echo_scores)
                if event.kind == "token":
                    logprobs = None
                    if event.logprob is not None:
                        if endpoint == "chat":
                            logprobs = chat_logprobs([event.logprob], _token_text)
                        else:
                            logprobs = completion_chunk_logprobs(index, completion_logprobs([event.logprob], [event.logprob.token], _token_text))
                    if event.text or body.return_token_ids or logprobs is not None:
                        yield chunk(index, event.text, None, token=event.token, logprobs=logprobs)
                elif event.kind == "finish":
                    pending -= 1
                    if event.text:
                        yield chunk(index, event.text, None)
                    # The stream's last choice chunk carries the server's metadata ("mas").
                    yield chunk(index, None if endpoint == "chat" else "", event.finish_reason, meta=not pending)
                else:
                    status = event.status
                    choices.cancel()
                    record["error"] = event.message
                    yield "data: " + json.dumps(error_body(event.message, type="server_error")) + "\n\n"
                    break
            if status == 200 and body.stream_options is not None and body.stream_options.include_usage:
                # A chunk with no choices only when asked for (the usual `chunk.choices[0]` loop
                # must not meet one otherwise).
                final = {"id": record["id"], "object": obj, "created": created, "model": body.model, "choices": [], "usage": _usage(choices, body.n)}
                yield "data: " + json.dumps(final) + "\n\n"
            yield "data: [DONE]\n\n"
        except BaseException:  # the client went away (cancelled generator): free its rows
            status = 499
            record["error"] = "client disconnected"
            choices.cancel()
            raise
        finally:
            _finish_record(record, started, status, choices=choices)

    def _finish_record(record: Dict[str, Any], started: float, status: int, *, error: Optional[str] = None, choices: Optional[_Choices] = None, response: Optional[Response] = None) -> Optional[Response]:
        """Count the request, observe its latency and write its one log line."""
        latency = time.perf_counter() - started
        state.metrics.requests.labels(endpoint=record["endpoint"], status=str(status)).inc()
        state.metrics.request_latency.observe(latency)
        record["status"] = status
        record["latency_ms"] = round(latency * 1e3, 2)
        if error is not None:
            record.setdefault("error", error)
        if choices is not None:
            handles = choices.handles
            record["prompt_tokens"] = sum(len(h.prompt) for h in handles)
            record["cached_tokens"] = sum(h.cached_tokens for h in handles)
            record["completion_tokens"] = sum(len(h.tokens) for h in handles)
            record["finish_reasons"] = [h.finish_reason for h in handles]
            first = [h.first_token_at for h in handles if h.first_token_at is not None]
            if first:
                record["ttft_ms"] = round((min(first) - min(h.submitted_at for h in handles)) * 1e3, 2)
        access_log.info(json.dumps(record, sort_keys=True))
        return response

    return app


def _special_tokens(tokenizer: Any) -> Dict[str, int]:
    """Name -> id of a torchtune tokenizer's special tokens (empty when it keeps none)."""
    special = getattr(tokenizer, "special_tokens", None)
    return dict(special) if isinstance(special, dict) else {}


async def _wait_disconnect(request: Request) -> None:
    """Return when the client of a non-streaming request has gone."""
    while not await request.is_disconnected():
        await asyncio.sleep(0.25)
