"""The server's driver of the one inference engine: a thread, a bounded queue, cancellation and
events.

The model work is :class:`mas.generation.InferenceEngine`'s, the same engine ``mas.generate``
drives (continuous batching, batched and chunked prefill, the segment-prefix cache, the decode
step with sampling and stops on the device). Here one thread owns it and calls ``step()`` while
anything runs; it streams (a host read every step), isolates failures (a sequence whose forward
fails ends alone with an ``error`` event), and turns each step's tokens into :class:`Event`
objects for the HTTP layer, which never touches the model: it submits :class:`SequenceHandle`
objects and receives events through a callback (thread-safe on its side).

So a served sequence's tokens are those of ``mas.generate`` for the same prompt alone: greedy
always; sampled with a ``seed``, token for token equal to ``mas.generate(..., seed=seed,
batch_size=1)``, whatever else shares the batch.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence

from torch import nn

from mas.generation import GenerationSettings, InferenceEngine, PrefixCache, PromptTooLongError, Request, SamplingParams, StepOutput
from mas.generation.logprobs import TokenLogprob
from mas.segments import SegmentedSequence

__all__ = ["Engine", "EngineStoppedError", "Event", "PromptTooLongError", "QueueFullError", "SamplingParams", "SequenceHandle", "TooManySequencesError"]

log = logging.getLogger("mas_serve.engine")


class QueueFullError(RuntimeError):
    """Every row is busy and the waiting queue is full (HTTP 429)."""


class EngineStoppedError(RuntimeError):
    """The engine is shutting down or has stopped (HTTP 503)."""


class TooManySequencesError(ValueError):
    """A request asks for more sequences than the rows and the queue hold together: it can never
    be served, so it is a client error (HTTP 400), not "retry later"."""


@dataclass
class Event:
    """What the engine tells the HTTP layer about a sequence.

    Attributes:
        kind (str): ``"token"`` (a new token and its text), ``"finish"`` or ``"error"``.
        text (str): text to append (may be empty while a stop string or character is pending).
        token (Optional[int]): the generated id (``"token"`` events).
        logprob (Optional[TokenLogprob]): its score, when the sequence asked for log-probabilities.
        finish_reason (Optional[str]): ``"stop"``, ``"length"`` or ``"cancelled"``.
        message (str), status (int): for ``"error"`` events.
    """

    kind: str
    text: str = ""
    token: Optional[int] = None
    logprob: Optional[TokenLogprob] = None
    finish_reason: Optional[str] = None
    message: str = ""
    status: int = 500


@dataclass(eq=False)
class SequenceHandle:
    """One choice of one request, from submission to its last event.

    Args:
        prompt (SegmentedSequence): the segmented prompt (``for_generation=True``).
        params (SamplingParams): decoding.
        on_event (Callable[[Event], None]): called from the engine thread.
    """

    prompt: SegmentedSequence
    params: SamplingParams
    on_event: Callable[[Event], None]
    submitted_at: float = field(default_factory=time.perf_counter)
    request: Optional[Request] = field(default=None, repr=False)
    last_token_at: Optional[float] = None
    _cancelled: bool = field(default=False, repr=False)

    def cancel(self) -> None:
        """Stop generating (a client that went away); the engine frees the row at its next step."""
        self._cancelled = True
        if self.request is not None:
            self.request.cancel()

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    @property
    def tokens(self) -> List[int]:
        return self.request.tokens if self.request is not None else []

    @property
    def logprobs(self) -> List[TokenLogprob]:
        return self.request.logprobs if self.request is not None else []

    @property
    def prompt_logprobs(self) -> List[TokenLogprob]:
        return self.request.prompt_logprobs if self.request is not None else []

    @property
    def cached_tokens(self) -> int:
        return self.request.cached_tokens if self.request is not None else 0

    @property
    def finish_reason(self) -> Optional[str]:
        return self.request.finish_reason if self.request is not None else None

    @property
    def first_token_at(self) -> Optional[float]:
        return self.request.first_token_at if self.request is not None else None


class Engine:
    """An :class:`~mas.generation.InferenceEngine` in its own thread, fed by a bounded queue.

    Args:
        model (nn.Module): a torchtune decoder in eval mode.
        tokenizer: decodes generated ids (``decode``); its ``stop_tokens`` end a sequence.
        settings (GenerationSettings): the engine's settings (``batch_size`` rows of
            ``max_cache_len`` slots, the model's ``max_seq_len`` when None).
        max_queue (int): sequences that may wait for a row; beyond: :class:`QueueFullError`.
        namespace (Hashable): the prefix cache's namespace (adapter identity).
        prefix_cache (Optional[PrefixCache]): default: one from the settings when
            ``reuse_system_cache``.
        stop_tokens (Optional[Sequence[int]]): ids that end a sequence (default the tokenizer's).
        pad_id (int): id in padding slots.
        metrics: optional :class:`mas.serving._metrics.ServeMetrics`.
        prefill_bucket (Optional[int]): see :class:`~mas.generation.InferenceEngine`.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        settings: GenerationSettings,
        *,
        max_queue: int = 64,
        namespace: Hashable = "",
        prefix_cache: Optional[PrefixCache] = None,
        stop_tokens: Optional[Sequence[int]] = None,
        pad_id: int = 0,
        metrics: Any = None,
        prefill_bucket: Optional[int] = None,
    ) -> None:
        self.core = InferenceEngine(
            model,
            settings,
            tokenizer=tokenizer,
            stop_tokens=stop_tokens,
            pad_id=pad_id,
            stream_text=True,
            namespace=namespace,
            prefix_cache=prefix_cache,
            isolate_failures=True,
            prefill_bucket=prefill_bucket,
        )
        self.max_queue = max_queue
        self.metrics = metrics
        self._handles: Dict[int, SequenceHandle] = {}
        self._wake = threading.Condition()
        self._accepting = True
        self._stop = False
        self._thread: Optional[threading.Thread] = None

    # -- the HTTP side ------------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        return self.core.rows

    @property
    def max_len(self) -> int:
        return self.core.max_len

    @property
    def prefix_cache(self) -> Optional[PrefixCache]:
        return self.core.prefix_cache

    @property
    def steps(self) -> int:
        return self.core.decode_steps

    def active_slots(self) -> int:
        return self.core.active_rows()

    def queue_depth(self) -> int:
        return self.core.queue_depth()

    def check_fits(self, prompt_len: int, max_tokens: int) -> None:
        """Raise :class:`PromptTooLongError` unless a row holds the prompt and ``max_tokens``."""
        self.core.check_fits(prompt_len, max_tokens)

    def submit(self, handles: Sequence[SequenceHandle]) -> None:
        """Queue sequences (all of a request's choices, or none).

        Raises:
            EngineStoppedError: the engine is shutting down.
            QueueFullError: the queue cannot take them all now.
            TooManySequencesError: the rows and the queue could never take them all.
            PromptTooLongError: a prompt does not fit a row.
        """
        for h in handles:
            self.check_fits(len(h.prompt), h.params.max_tokens)
        if len(handles) > self.num_rows + self.max_queue:
            raise TooManySequencesError(
                f"the request asks for {len(handles)} sequences (prompts x n), more than this server's {self.num_rows} rows "
                f"and {self.max_queue} queue places together; send fewer prompts or a smaller n"
            )
        with self._wake:
            if not self._accepting:
                raise EngineStoppedError("the server is shutting down")
            waiting = self.core.queue_depth()
            free_rows = self.core.rows - self.core.active_rows()
            if waiting + len(handles) > self.max_queue + max(free_rows - waiting, 0):
                raise QueueFullError(
                    f"the server is at capacity ({self.num_rows} sequences decoding, {waiting} waiting, "
                    f"queue limit {self.max_queue}); retry later"
                )
            for h in handles:
                h.request = self.core.submit(h.prompt, h.params)
                if self.metrics is not None:
                    self.metrics.prompt_tokens.inc(len(h.prompt))
                if h.cancelled:
                    h.request.cancel()
                self._handles[h.request.id] = h
            self._wake.notify()

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._run, name="mas-serve-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, drain_timeout_s: float = 0.0) -> None:
        """Stop taking requests, let in-flight ones finish for up to ``drain_timeout_s``, then
        cancel the rest (each gets an ``error`` event, status 503) and end the thread."""
        with self._wake:
            self._accepting = False
        deadline = time.monotonic() + drain_timeout_s
        while time.monotonic() < deadline and self.core.has_unfinished():
            time.sleep(0.01)
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the engine thread ----------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stop and not self.core.has_unfinished():
                    self._wake.wait(timeout=0.5)
                if self._stop:
                    break
            try:
                outputs = self.core.step()
            except Exception:  # a bug in the loop itself: fail what is running, keep serving
                log.exception("engine step failed")
                outputs = self.core.abort_all("internal error in the serving engine")
            for output in outputs:
                self._publish(output)
        for output in self.core.abort_all("the server is shutting down"):
            self._publish(output, status=503)
        self.core.close()

    def _publish(self, output: StepOutput, status: int = 500) -> None:
        """Turn one step's output into events and metrics."""
        request = output.request
        handle = self._handles.get(request.id)
        if handle is None:
            return
        metrics = self.metrics
        now = time.perf_counter()
        scores: List[Optional[TokenLogprob]] = list(output.logprobs) or [None] * len(output.tokens)
        for token, piece, score in zip(output.tokens, output.pieces, scores):
            if metrics is not None:
                metrics.completion_tokens.inc()
                if handle.last_token_at is None:
                    metrics.time_to_first_token.observe(now - handle.submitted_at)
                else:
                    metrics.inter_token_latency.observe(now - handle.last_token_at)
            handle.last_token_at = now
            self._emit(handle, Event("token", text=piece, token=token, logprob=score))
        if not output.finished:
            return
        del self._handles[request.id]
        reason = request.finish_reason
        if reason == "error":
            if metrics is not None:
                (metrics.cancelled_sequences if status == 503 else metrics.failed_sequences).inc()
            self._emit(handle, Event("error", message=request.error, status=status))
            return
        if reason == "cancelled" and metrics is not None:
            metrics.cancelled_sequences.inc()
        self._emit(handle, Event("finish", text=output.final_text, finish_reason=reason))

    def _emit(self, handle: SequenceHandle, event: Event) -> None:
        try:
            handle.on_event(event)
        except Exception:  # a consumer that went away must not stop the engine
            log.debug("event consumer failed", exc_info=True)
