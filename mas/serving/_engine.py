"""The serving engine: one thread owns the model and runs continuous batching over slot rows.

Loop (one iteration)::

    admit   : while a row is free and a sequence waits: copy its longest cached prefix into the
              row, prefill the rest with ``mas.generation.prefill`` (MAS mask), sample its first
              token
    decode  : one ``mas.generation.forward_one_token`` over every busy row (each row at its own
              length; a generated token attends to its row's written slots), sample per row
    finish  : stop token, stop string, max_tokens, or a cancelled client frees the row; the
              row's keys and values go to the prefix cache

So a request that arrives while others decode joins at the next step.

Eager (the default), a decode forward runs rows ``[0, last busy row]`` over ``max(lengths) + 1``
key slots. With ``compile_decode`` it runs compiled over every row (a fixed batch; free rows
attend nothing) and over the written slots rounded up to a power-of-two bucket
(``mas.generation.decode_loop.decode_width``, as ``mas.generate``'s compiled step): one compiled
graph per width bucket, the first step in each bucket pays the compile. Sampling stays per row,
outside the graph, and the row-by-row retry after a failing batched step runs eager. The HTTP layer never
touches the model: it submits :class:`SequenceHandle` objects and receives :class:`Event` objects
through a callback (thread-safe on its side). A sequence that fails inside the model fails
alone: a failing batched step is retried row by row, and only rows that fail alone are dropped.

Tokens equal ``mas.generate``'s for the same prompt alone (tests/unit/serving/test_serving_engine.py):
the same prefill function and mask, positions equal to slots, every unwritten slot masked, and
the same token choice (:func:`mas.generation.sampling.sample_with_generator`: one ``Exp(1)``
noise draw per token from the sequence's own generator, seeded as ``mas.generate`` seeds its
one). Greedy always; sampled with a ``seed``, token for token equal to
``mas.generate(..., seed=seed, batch_size=1)``, whatever else shares the batch.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Hashable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from mas.attention import AttentionBackend, prefill_tile, use_mas_attention
from mas.block_mask import round_up_to_tile
from mas.generation import CompileMode, layout_prompts, prefill
from mas.generation.decode_loop import decode_width
from mas.generation.sampling import sample_with_generator
from mas.masks import CAUSAL, AttentionMode
from mas.segments import SegmentedSequence
from mas.serving._prefix_cache import PrefixCache
from mas.serving._slot_cache import SlotCaches, compiled_slot_decode_forward, install_slot_caches, slot_decode_forward
from mas.serving._text import TextStream

__all__ = [
    "Engine",
    "EngineStoppedError",
    "Event",
    "PromptTooLongError",
    "QueueFullError",
    "SamplingParams",
    "SequenceHandle",
]

log = logging.getLogger("mas_serve.engine")


class QueueFullError(RuntimeError):
    """Every row is busy and the waiting queue is full (HTTP 429)."""


class EngineStoppedError(RuntimeError):
    """The engine is shutting down or has stopped (HTTP 503)."""


class PromptTooLongError(ValueError):
    """The prompt plus ``max_tokens`` does not fit a row (HTTP 400)."""


@dataclass
class SamplingParams:
    """How one sequence is decoded.

    Attributes:
        max_tokens (int): tokens to generate at most (a stop token is not counted).
        temperature (float): 0: greedy.
        top_p (Optional[float]), top_k (Optional[int]): sampling filters.
        seed (Optional[int]): seeds this sequence's own generator, on the model's device, as
            ``mas.generate`` seeds its one: the tokens equal ``mas.generate(..., seed=seed,
            batch_size=1)`` for this prompt alone (same temperature, top_p, top_k), whatever
            else is decoding. (With ``batch_size > 1``, ``mas.generate`` draws one noise tensor
            for the whole batch from one generator, so its rows share a stream; batch size 1
            is the reference.) None: the device's default RNG (seeded by the server's ``seed``
            key), so the draw depends on the other sequences.
        stop (Sequence[str]): strings that end the text (not included).
        ignore_stop_tokens (bool): generate exactly ``max_tokens`` (benchmarks, tests).
    """

    max_tokens: int
    temperature: float = 0.0
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    seed: Optional[int] = None
    stop: Sequence[str] = ()
    ignore_stop_tokens: bool = False


@dataclass
class Event:
    """What the engine tells the HTTP layer about a sequence.

    Attributes:
        kind (str): ``"token"`` (a new token and its text), ``"finish"`` or ``"error"``.
        text (str): text to append (may be empty while a stop string or character is pending).
        token (Optional[int]): the generated id (``"token"`` events).
        finish_reason (Optional[str]): ``"stop"``, ``"length"`` or ``"cancelled"``.
        message (str), status (int): for ``"error"`` events.
    """

    kind: str
    text: str = ""
    token: Optional[int] = None
    finish_reason: Optional[str] = None
    message: str = ""
    status: int = 500


_ids = itertools.count()


@dataclass
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
    id: int = field(default_factory=lambda: next(_ids))
    submitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: Optional[float] = None
    finished_at: Optional[float] = None
    cached_tokens: int = 0
    tokens: List[int] = field(default_factory=list)
    finish_reason: Optional[str] = None
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)

    def cancel(self) -> None:
        """Stop generating (a client that went away); the engine frees the row at its next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


@dataclass
class _Row:
    """A busy row: its sequence and what the cache holds."""

    handle: SequenceHandle
    tokens: List[int]  # what slots [0, length) hold
    segment_ids: List[int]
    next_token: int  # sampled, not yet written to the cache
    text: TextStream
    generator: Optional[torch.Generator]
    last_token_at: float

    @property
    def length(self) -> int:
        return len(self.tokens)


class Engine:
    """Continuous batching over a slot KV cache, in one thread.

    Args:
        model (nn.Module): a torchtune decoder in eval mode (MAS attention is installed).
        tokenizer: decodes generated ids (``decode``); its ``stop_tokens`` end a sequence.
        attention (AttentionMode): prefill mask of every request.
        attention_backend (AttentionBackend): mask form and kernel.
        rows (int): sequences decoded together (KV-cache rows).
        max_len (int): slots per row (prompt + generated tokens).
        max_queue (int): sequences that may wait for a row; beyond: :class:`QueueFullError`.
        prefix_cache (Optional[PrefixCache]): reuse prompt prefixes (None: off).
        namespace (Hashable): the prefix-cache namespace (adapter identity).
        stop_tokens (Optional[Sequence[int]]): ids that end a sequence (default the tokenizer's).
        pad_id (int): id in padding slots.
        metrics: optional :class:`mas.serving._metrics.ServeMetrics`.
        prefill_bucket (Optional[int]): round each prefill's query part up to a multiple of this
            many slots, right-padded (so a compiled FlexAttention kernel sees a few shapes, not one
            per prompt length); None: the flex tile where flex runs, else no rounding; 0: none.
        compile_decode (bool): ``torch.compile`` the batched decode forward (all rows, width
            buckets; see the module docstring). False: eager.
        compile_mode (CompileMode): its ``torch.compile`` mode.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        attention: AttentionMode,
        attention_backend: AttentionBackend = "auto",
        rows: int = 8,
        max_len: Optional[int] = None,
        max_queue: int = 64,
        prefix_cache: Optional[PrefixCache] = None,
        namespace: Hashable = "",
        stop_tokens: Optional[Sequence[int]] = None,
        pad_id: int = 0,
        metrics: Any = None,
        prefill_bucket: Optional[int] = None,
        compile_decode: bool = False,
        compile_mode: CompileMode = "default",
    ) -> None:
        self.model = model.eval()
        use_mas_attention(model, attention_backend)
        self.tokenizer = tokenizer
        self.attention = attention
        self.backend = attention_backend
        self.max_len = max_len or model.max_seq_len
        self.max_queue = max_queue
        self.prefix_cache = prefix_cache
        self.namespace = (namespace, attention)
        self.stop_tokens = set(stop_tokens if stop_tokens is not None else getattr(tokenizer, "stop_tokens", [tokenizer.eos_id]))
        self.pad_id = pad_id
        self.metrics = metrics
        self.device = model.tok_embeddings.weight.device
        if prefill_bucket is None:
            prefill_bucket = prefill_tile(attention_backend, self.device)
        self.prefill_bucket = prefill_bucket
        dtype = model.tok_embeddings.weight.dtype
        self.caches: SlotCaches = install_slot_caches(model, rows, self.max_len, dtype)
        self._rows: List[Optional[_Row]] = [None] * rows
        self._waiting: Deque[SequenceHandle] = collections.deque()
        self._wake = threading.Condition()
        self._accepting = True
        self._stop = False
        self._thread: Optional[threading.Thread] = None
        self.steps = 0  # decode steps run (tests read it)
        self.compile_decode = compile_decode
        self._compiled_forward = compiled_slot_decode_forward(compile_mode) if compile_decode else None

    # -- the HTTP side ------------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        return len(self._rows)

    def active_slots(self) -> int:
        return sum(r is not None for r in self._rows)

    def queue_depth(self) -> int:
        return len(self._waiting)

    def check_fits(self, prompt_len: int, max_tokens: int) -> None:
        """Raise :class:`PromptTooLongError` unless a row holds the prompt and ``max_tokens``."""
        if prompt_len + max_tokens > self.max_len:
            raise PromptTooLongError(
                f"the prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) = {prompt_len + max_tokens} "
                f"> the {self.max_len}-token context of this server"
            )

    def submit(self, handles: Sequence[SequenceHandle]) -> None:
        """Queue sequences (all of a request's choices, or none).

        Raises:
            EngineStoppedError: the engine is shutting down.
            QueueFullError: the queue cannot take them all.
            PromptTooLongError: a prompt does not fit a row.
        """
        for h in handles:
            if len(h.prompt) == 0:
                raise PromptTooLongError("the prompt is empty")
            self.check_fits(len(h.prompt), h.params.max_tokens)
        with self._wake:
            if not self._accepting:
                raise EngineStoppedError("the server is shutting down")
            free_rows = sum(r is None for r in self._rows)
            if len(self._waiting) + len(handles) > self.max_queue + max(free_rows - len(self._waiting), 0):
                raise QueueFullError(
                    f"the server is at capacity ({self.num_rows} sequences decoding, {len(self._waiting)} waiting, "
                    f"queue limit {self.max_queue}); retry later"
                )
            self._waiting.extend(handles)
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
        while time.monotonic() < deadline and (self._waiting or self.active_slots()):
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
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not self._stop and not self._waiting and not self.active_slots():
                        self._wake.wait(timeout=0.5)
                    if self._stop:
                        break
                try:
                    self._drop_cancelled()
                    self._admit()
                    if self.active_slots():
                        self._decode_step()
                except Exception:  # a bug in the loop itself: fail what is running, keep serving
                    log.exception("engine step failed")
                    for i, row in enumerate(self._rows):
                        if row is not None:
                            self._fail(i, "internal error in the serving engine")
        self._cancel_all("the server is shutting down")

    def _emit(self, handle: SequenceHandle, event: Event) -> None:
        try:
            handle.on_event(event)
        except Exception:  # a consumer that went away must not stop the engine
            log.debug("event consumer failed", exc_info=True)

    def _drop_cancelled(self) -> None:
        with self._wake:
            kept = [h for h in self._waiting if not h.cancelled]
            dropped = len(self._waiting) - len(kept)
            self._waiting = collections.deque(kept)
        for _ in range(dropped):
            if self.metrics is not None:
                self.metrics.cancelled_sequences.inc()
        for i, row in enumerate(self._rows):
            if row is not None and row.handle.cancelled:
                self._finish(i, "cancelled")

    def _cancel_all(self, message: str) -> None:
        with self._wake:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for h in waiting:
            self._emit(h, Event("error", message=message, status=503))
        for i, row in enumerate(self._rows):
            if row is not None:
                self._rows[i] = None
                if self.metrics is not None:
                    self.metrics.cancelled_sequences.inc()
                self._emit(row.handle, Event("error", message=message, status=503))

    def _admit(self) -> None:
        while True:
            free = next((i for i, r in enumerate(self._rows) if r is None), None)
            if free is None:
                return
            with self._wake:
                if not self._waiting:
                    return
                handle = self._waiting.popleft()
            if handle.cancelled:
                continue
            try:
                self._prefill(free, handle)
            except Exception as e:  # this request alone fails
                log.exception("prefill failed for sequence %d", handle.id)
                self._rows[free] = None
                if self.metrics is not None:
                    self.metrics.failed_sequences.inc()
                self._emit(handle, Event("error", message=f"the model failed on this request: {type(e).__name__}: {e}", status=500))

    def _prefill(self, row_index: int, handle: SequenceHandle) -> None:
        prompt = handle.prompt
        cached, kv = 0, None
        if self.prefix_cache is not None:
            cached, kv = self.prefix_cache.lookup(self.namespace, prompt.tokens, prompt.segment_ids, self.attention)
        if kv is not None:
            self.caches.write(row_index, kv, cached)
        handle.cached_tokens = cached
        end = self._prefill_end(cached, len(prompt))
        batch = layout_prompts([prompt], self.pad_id, prefix_len=cached).padded_right(end, self.pad_id).to(self.device)
        # Slots [len(prompt), end) hold padding: masked for decode (a row attends its first
        # `length` slots) and overwritten by the generated tokens.
        self.caches.plan_prefill(row_index, cached, end)
        last = torch.tensor([len(prompt) - cached - 1], device=self.device)  # the prompt's last token
        logits = prefill(self.model, batch, attention=self.attention, backend=self.backend, logits_at=last)
        if self.prefix_cache is not None and cached < len(prompt):
            self.prefix_cache.insert(self.namespace, prompt.tokens, prompt.segment_ids, self.caches.read(row_index, len(prompt)))
        generator = None
        if handle.params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(handle.params.seed)
        row = _Row(
            handle=handle,
            tokens=list(prompt.tokens),
            segment_ids=list(prompt.segment_ids),
            next_token=-1,
            text=TextStream(self.tokenizer, handle.params.stop),
            generator=generator,
            last_token_at=time.perf_counter(),
        )
        self._rows[row_index] = row
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(len(prompt))
        self._accept(row_index, int(self._sample(row, logits)[0]))

    def _prefill_end(self, cached: int, prompt_len: int) -> int:
        """The slot after a prefill of slots ``[cached, end)``: the prompt's end, rounded up to
        :attr:`prefill_bucket` past the cached prefix, within the row."""
        if not self.prefill_bucket:
            return prompt_len
        return round_up_to_tile(prompt_len, start=cached, tile=self.prefill_bucket, limit=self.max_len)

    def _sample(self, row: _Row, logits: Tensor) -> Tensor:
        """This row's next token, chosen as ``mas.generate`` chooses it, from the row's own
        generator (so other rows never shift its draws).

        Args:
            row (_Row): the sequence.
            logits (Tensor): ``[1, vocab]`` its next-token logits.

        Returns:
            Tensor: ``[1]`` the token id, on the device (not read yet).
        """
        p = row.handle.params
        return sample_with_generator(logits, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, generator=row.generator)

    def _accept(self, row_index: int, token: int) -> None:
        """A sampled token: stop, or hand it out and keep it for the next decode step."""
        row = self._rows[row_index]
        handle = row.handle
        now = time.perf_counter()
        if token in self.stop_tokens and not handle.params.ignore_stop_tokens:
            self._finish(row_index, "stop")
            return
        handle.tokens.append(token)
        if handle.first_token_at is None:
            handle.first_token_at = now
            if self.metrics is not None:
                self.metrics.time_to_first_token.observe(now - handle.submitted_at)
        elif self.metrics is not None:
            self.metrics.inter_token_latency.observe(now - row.last_token_at)
        row.last_token_at = now
        if self.metrics is not None:
            self.metrics.completion_tokens.inc()
        text, hit_stop_string = row.text.add(token)
        self._emit(handle, Event("token", text=text, token=token))
        if hit_stop_string:
            self._finish(row_index, "stop")
        elif len(handle.tokens) >= handle.params.max_tokens:
            self._finish(row_index, "length")
        else:
            row.next_token = token

    def _finish(self, row_index: int, reason: str) -> None:
        row = self._rows[row_index]
        self._rows[row_index] = None
        handle = row.handle
        handle.finish_reason = reason
        handle.finished_at = time.perf_counter()
        if reason == "cancelled":
            if self.metrics is not None:
                self.metrics.cancelled_sequences.inc()
        elif self.prefix_cache is not None and row.length > len(handle.prompt):
            # Prompt + answer (the conversation so far): a chat's next turn starts with it.
            self.prefix_cache.insert(self.namespace, row.tokens, row.segment_ids, self.caches.read(row_index, row.length))
        self._emit(handle, Event("finish", text=row.text.finish(), finish_reason=reason))

    def _fail(self, row_index: int, message: str) -> None:
        row = self._rows[row_index]
        self._rows[row_index] = None
        if self.metrics is not None:
            self.metrics.failed_sequences.inc()
        self._emit(row.handle, Event("error", message=message, status=500))

    def _decode_inputs(self, first: int, last: int) -> Tuple[List[int], Tensor, Tensor, Tensor]:
        """Rows ``[first, last)``'s lengths, and on the device (one copy) their new tokens,
        slots and busy flags, each ``[last - first]``."""
        rows = self._rows[first:last]
        lengths = [r.length if r is not None else 0 for r in rows]
        tokens = [r.next_token if r is not None else self.pad_id for r in rows]
        busy = [int(r is not None) for r in rows]
        # [3, b] on the host -> the device in one copy
        tokens_t, slots, busy_t = torch.tensor([tokens, lengths, busy], dtype=torch.long).to(self.device)
        return lengths, tokens_t, slots, busy_t.bool()

    def _forward_rows(self, first: int, last: int) -> Tensor:
        """One eager decode forward over rows ``[first, last)``, ``max(lengths) + 1`` slots wide;
        free rows in between attend nothing.

        Returns:
            Tensor: ``[last - first, vocab]`` next-token logits.
        """
        lengths, tokens, slots, busy = self._decode_inputs(first, last)
        width = max(lengths) + 1
        self.caches.plan_decode(slots, width, first_row=first)
        return slot_decode_forward(self.model, tokens[:, None], self.caches.plan.slots, busy, width=width)

    def _forward_all_rows_compiled(self) -> Tensor:
        """One compiled decode forward over every row (free rows attend nothing), over the
        written slots rounded up to a :func:`~mas.generation.decode_loop.decode_width` bucket.

        Returns:
            Tensor: ``[rows, vocab]`` next-token logits.
        """
        lengths, tokens, slots, busy = self._decode_inputs(0, self.num_rows)
        width = decode_width(max(lengths) + 1, self.max_len)
        self.caches.plan_decode(slots, width, first_row=0)
        # The plan's own [b, 1] slots tensor: the graph reads one tensor, not two views of one.
        return self._compiled_forward(self.model, tokens[:, None], self.caches.plan.slots, busy, width=width)

    def _decode_step(self) -> None:
        busy = [i for i, r in enumerate(self._rows) if r is not None]
        last = busy[-1] + 1
        try:
            if self._compiled_forward is not None:
                logits = self._forward_all_rows_compiled()
            else:
                logits = self._forward_rows(0, last)
            per_row = {i: logits[i : i + 1] for i in busy}
        except Exception:
            log.exception("batched decode step failed; retrying its rows one by one")
            per_row = {}
            for i in busy:
                try:
                    per_row[i] = self._forward_rows(i, i + 1)
                except Exception as e:
                    log.exception("decode failed for sequence %d", self._rows[i].handle.id)
                    self._fail(i, f"the model failed on this request: {type(e).__name__}: {e}")
            if self._compiled_forward is not None and len(per_row) == len(busy):
                # Every row decodes eagerly: the compiler failed, not a request. Do not pay a
                # failing compile at every step.
                log.error("the compiled decode forward failed (traceback above); decoding eagerly from now on")
                self._compiled_forward = None
        self.steps += 1
        chosen = {}
        for i, logits_i in per_row.items():
            row = self._rows[i]
            row.tokens.append(row.next_token)  # the forward wrote it at slot `length`
            row.segment_ids.append(CAUSAL)
            try:
                chosen[i] = self._sample(row, logits_i)
            except Exception as e:
                self._fail(i, f"sampling failed: {type(e).__name__}: {e}")
        if chosen:
            tokens = torch.cat(list(chosen.values())).tolist()  # the step's one host read
            for i, token in zip(chosen, tokens):
                self._accept(i, token)
