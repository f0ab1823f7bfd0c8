"""The inference engine: continuous batching over a slot KV cache, for every inference path.

``mas.generate`` (so ``mas_generate`` and ``mas_eval``) submits its prompts and calls
:meth:`InferenceEngine.step` until all are done; the server runs the same engine in its thread
and reads every step's tokens because it streams. One step::

    admit    : free rows take waiting sequences; each copies its longest cached prefix that ends
               at a segment boundary into its row (a system prompt that several waiting
               sequences share and nobody cached yet is prefilled once first, then copied)
    prefill  : the admitted rows' next chunks in one forward per start slot (rows that wrote
               the same number of slots share a forward); while other rows decode, at most
               ``prefill_chunk_tokens`` prompt tokens per step, cut at segment boundaries; a
               row whose prompt is complete chooses its first token
    decode   : ``stop_check_every`` decode steps over every decoding row (1 when streaming), each
               row at its own slot, sampling and stops on the device (:func:`decode_step`)
    read     : one host read of the step's tokens; stop tokens, stop strings and ``max_tokens``
               finish sequences, whose rows (prompt and answer) go to the prefix cache

A sequence's tokens do not depend on what else runs: the same prefill mask, slot = position,
every unwritten slot masked, and a sampled sequence draws from its own generator (one ``Exp(1)``
draw per chosen token). So a seeded sequence equals ``mas.generate(seed=..., batch_size=1)`` on
its prompt alone, and the tests compare every path with a recompute without any cache
(:mod:`mas.testing.reference_decoding`).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from typing import Any, Callable, Counter, Deque, Dict, Hashable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from mas.attention import MASAttention, prefill_tile, use_mas_attention
from mas.block_mask import round_up_to_tile
from mas.errors import ConfigError, DataError
from mas.generation.decode_loop import compiled_decode_step, decode_step, decode_width
from mas.generation.gqa_attention import native_gqa_attention
from mas.generation.layout import chunk_end, layout_chunks
from mas.generation.logprobs import TokenLogprob, score_tokens, token_logprobs
from mas.generation.penalties import RowPenalties, apply_penalties
from mas.generation.prefill import prefill
from mas.generation.prefix_cache import PrefixCache, reusable_ends
from mas.generation.request import PromptTooLongError, Request, StepOutput
from mas.generation.sampling import RowSampling, SamplingParams, choose_tokens, draw_noise, suppress_stops
from mas.generation.settings import GenerationSettings
from mas.generation.slot_cache import SlotCaches, install_slot_caches, remove_caches
from mas.generation.text_stream import TextStream
from mas.masks import CAUSAL
from mas.segments import SegmentedSequence

__all__ = ["InferenceEngine", "PromptTooLongError", "Request", "StepOutput"]

log = logging.getLogger("mas.generation.engine")

#: Scores of chosen tokens: log-probabilities, and the top alternatives' ids and log-probabilities.
Scores = Tuple[Tensor, Tensor, Tensor]

class InferenceEngine:
    """Continuous batching over a slot KV cache (see the module docstring).

    Args:
        model (nn.Module): a torchtune decoder on its device (MAS attention is installed; the
            model gets slot caches until :meth:`close`).
        settings (GenerationSettings): engine-wide settings (``batch_size`` rows of
            ``max_cache_len`` slots; None: the model's ``max_seq_len``).
        tokenizer: decodes text for stop strings and streaming (None: ids only).
        stop_tokens (Optional[Sequence[int]]): ids that end a sequence (default: the settings',
            else the tokenizer's ``stop_tokens``, else none).
        pad_id (int): id written in padding slots.
        stream_text (bool): decode each token's text as it comes (servers).
        namespace (Hashable): the prefix cache's namespace (the weights' identity).
        prefix_cache (Optional[PrefixCache]): share one cache between engines; default: a new one
            when ``settings.reuse_system_cache``.
        isolate_failures (bool): a sequence whose forward fails ends with ``"error"`` alone and
            the engine goes on (servers); False: the exception propagates.
        prefill_bucket (Optional[int]): round each prefill's query slots up to a multiple of this;
            None: the flex tile where FlexAttention runs, else none; 0: none.
        max_len (Optional[int]): slots per row to start with (default ``settings.max_cache_len``,
            else the model's ``max_seq_len``); :meth:`reserve` grows them.
    """

    def __init__(
        self,
        model: nn.Module,
        settings: GenerationSettings,
        *,
        tokenizer: Any = None,
        stop_tokens: Optional[Sequence[int]] = None,
        pad_id: int = 0,
        stream_text: bool = False,
        namespace: Hashable = "",
        prefix_cache: Optional[PrefixCache] = None,
        isolate_failures: bool = False,
        prefill_bucket: Optional[int] = None,
        max_len: Optional[int] = None,
    ) -> None:
        self.model = model.eval()
        self.settings = settings
        self.tokenizer = tokenizer
        self.stream_text = stream_text
        self.isolate_failures = isolate_failures
        self.device = model.tok_embeddings.weight.device
        self.vocab = model.tok_embeddings.num_embeddings
        self.max_len = max_len or settings.max_cache_len or model.max_seq_len
        if self.max_len > model.max_seq_len:
            raise ConfigError(
                f"max_cache_len {self.max_len} is more than the model's max_seq_len {model.max_seq_len} (its positions end there); "
                f"set max_cache_len <= {model.max_seq_len}"
            )
        self.rows = settings.batch_size
        _ensure_mas_attention(model, settings)
        if stop_tokens is None:
            stop_tokens = settings.stop_tokens
        if stop_tokens is None and tokenizer is not None:
            stop_tokens = getattr(tokenizer, "stop_tokens", [tokenizer.eos_id])
        self.stop_tokens = list(stop_tokens or [])
        self.pad_id = pad_id
        if prefix_cache is None and settings.reuse_system_cache:
            prefix_cache = PrefixCache(settings.prefix_cache_max_tokens, int(settings.prefix_cache_max_mib * 2**20))
        self.prefix_cache = prefix_cache if settings.reuse_system_cache else None
        self.namespace = (namespace, settings.attention)
        self.prefill_bucket = prefill_tile(settings.attention_backend, self.device) if prefill_bucket is None else prefill_bucket
        self._step_fn: Callable[..., Tuple[Tensor, ...]] = compiled_decode_step(settings.compile_mode) if settings.compile_decode else decode_step
        self._gqa = native_gqa_attention(model) if settings.native_gqa else contextlib.nullcontext()
        self._gqa.__enter__()
        self.caches: SlotCaches = install_slot_caches(model, self.rows, self.max_len, model.tok_embeddings.weight.dtype)
        self._init_state()
        self._slots: List[Optional[Request]] = [None] * self.rows
        self._waiting: Deque[Request] = collections.deque()
        self._prefilling: List[Request] = []
        self._shared: Counter[Tuple[int, ...]] = collections.Counter()  # first segments of waiting prompts
        self._identical: Counter[Tuple[int, ...]] = collections.Counter()  # whole waiting prompts
        self._lock = threading.Lock()  # guards the waiting queue (other threads submit)
        self.closed = False
        # Counters (read by drivers and metrics).
        self.decode_steps = 0
        self.decoded_tokens = 0
        self.decode_seconds = 0.0
        self.prefill_forwards = 0
        self.prefilled_tokens = 0
        self.compile_seconds = 0.0  # decode steps that compiled a graph (not in decode_seconds)
        self._compiled_shapes: set = set()

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def _init_state(self) -> None:
        """Per-row device state of the decode step (inference tensors, as the step's outputs that
        replace them: a compiled step then sees one kind of input)."""
        r, device = self.rows, self.device
        self.token = torch.zeros(r, dtype=torch.long, device=device)
        self.done = torch.ones(r, dtype=torch.bool, device=device)
        self.slot = torch.zeros(r, dtype=torch.long, device=device)
        self.decoding = torch.zeros(r, dtype=torch.bool, device=device)
        self.row_stops = torch.full((r, self._stop_width(0)), -1, dtype=torch.long, device=device)
        self.min_left = torch.zeros(r, dtype=torch.long, device=device)
        self.sampling = RowSampling.empty(r, self.vocab, device)
        self.penalties: Optional[RowPenalties] = None  # made on the first request with a penalty
        # This step's scores of first tokens, per row ([], [top], [top] tensors), read in _read.
        self._first_scores: Dict[int, Tuple[Tensor, Tensor, Tensor]] = {}

    def _stop_width(self, own: int) -> int:
        """Columns of the per-row stop table: the engine's stop ids plus a request's own, rounded
        up to a power of two (at least 4), so a compiled step sees few shapes."""
        width = 4
        while width < len(self.stop_tokens) + own:
            width *= 2
        return width

    def _fit_stop_table(self, ids: int) -> None:
        """Widen the per-row stop table (keeping its rows) when a sequence has more stop ids."""
        width = self._stop_width(ids - len(self.stop_tokens))
        if width > self.row_stops.shape[1]:
            wider = torch.full((self.rows, width), -1, dtype=torch.long, device=self.device)
            wider[:, : self.row_stops.shape[1]] = self.row_stops
            self.row_stops = wider

    def _stops_of(self, params: SamplingParams) -> List[int]:
        engine = [] if params.ignore_stop_tokens else self.stop_tokens
        return list(dict.fromkeys([*engine, *params.stop_token_ids]))

    # -- submitting ---------------------------------------------------------------------
    def check_fits(self, prompt_len: int, max_tokens: int) -> None:
        """Raise :class:`PromptTooLongError` unless a row holds the prompt and ``max_tokens``."""
        if prompt_len == 0:
            raise PromptTooLongError("the prompt is empty")
        if prompt_len + max_tokens > self.max_len:
            raise PromptTooLongError(
                f"the prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) = {prompt_len + max_tokens} "
                f"> the {self.max_len}-slot KV cache; shorten the prompt, lower max_new_tokens or raise max_cache_len"
            )

    def submit(self, prompt: SegmentedSequence, params: SamplingParams) -> Request:
        """Queue one sequence.

        Raises:
            PromptTooLongError: it does not fit a row.
        """
        self.check_fits(len(prompt), params.max_tokens)
        bad = [t for t in params.stop_token_ids if not 0 <= t < self.vocab]
        if bad:
            raise DataError(f"stop_token_ids {bad} are not ids of this model's {self.vocab}-token vocabulary")
        request = Request(prompt, params)
        if params.seed is not None:
            request.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        if self.tokenizer is not None and (self.stream_text or params.stop):
            request.text = TextStream(self.tokenizer, params.stop)
        if params.prompt_logprobs is None:  # a scored prompt is prefilled whole: no reuse
            request.shared_key = self._first_cut_key(prompt)
            if self.prefix_cache is not None and params.max_tokens > 0:
                request.whole_key = tuple(prompt.tokens) + tuple(prompt.segment_ids)
        with self._lock:
            self._waiting.append(request)
            if request.shared_key is not None:
                self._shared[request.shared_key] += 1
            if request.whole_key is not None:
                self._identical[request.whole_key] += 1
        return request

    def _first_cut_key(self, prompt: SegmentedSequence) -> Optional[Tuple[int, ...]]:
        """Identity of the prompt's first segment when it is a reusable prefix (a system prompt)."""
        if self.prefix_cache is None:
            return None
        end = reusable_ends(prompt.segment_ids)[0]
        if end >= len(prompt) or end < self.prefix_cache.min_tokens:
            return None
        return tuple(prompt.tokens[:end]) + tuple(prompt.segment_ids[:end]) + (end,)

    def has_unfinished(self) -> bool:
        return bool(self._waiting) or any(r is not None for r in self._slots)

    def queue_depth(self) -> int:
        return len(self._waiting)

    def active_rows(self) -> int:
        return sum(r is not None for r in self._slots)

    # -- one step -----------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> List[StepOutput]:
        """Admit, prefill, decode, read (see the module docstring).

        Returns:
            List[StepOutput]: one entry per sequence that got tokens or ended this step.
        """
        outputs: Dict[int, StepOutput] = {}
        self._drop_cancelled(outputs)
        first = torch.full((self.rows,), -2, dtype=torch.long, device=self.device)
        self._admit(first, outputs)
        self._prefill_pass(first, outputs)
        emitted, scores = self._decode_burst()
        self._read(first, emitted, scores, outputs)
        return list(outputs.values())

    def _output(self, outputs: Dict[int, StepOutput], request: Request) -> StepOutput:
        if request.id not in outputs:
            outputs[request.id] = StepOutput(request)
        return outputs[request.id]

    def _drop_cancelled(self, outputs: Dict[int, StepOutput]) -> None:
        with self._lock:
            cancelled = [r for r in self._waiting if r.cancelled]
            if cancelled:
                self._waiting = collections.deque(r for r in self._waiting if not r.cancelled)
                for r in cancelled:
                    self._forget_shared(r)
        for request in cancelled:
            self._finish(request, "cancelled", outputs)
        for request in list(self._slots):
            if request is not None and request.cancelled:
                self._finish(request, "cancelled", outputs)

    def _forget_shared(self, request: Request) -> None:
        for counter, key in ((self._shared, request.shared_key), (self._identical, request.whole_key)):
            if key is not None:
                counter[key] -= 1
                if counter[key] <= 0:
                    del counter[key]

    # -- admit --------------------------------------------------------------------------
    def _admit(self, first: Tensor, outputs: Dict[int, StepOutput]) -> None:
        for row in range(self.rows):
            if self._slots[row] is not None:
                continue
            with self._lock:
                if not self._waiting:
                    return
                request = self._waiting.popleft()
                self._forget_shared(request)
            request.row, request.admitted_at = row, time.perf_counter()
            self._slots[row] = request
            try:
                self._reuse_prefix(request, first)
            except Exception as e:  # noqa: BLE001 - a failing request fails alone
                self._fail_or_raise(request, e, outputs)
                continue
            if not request.decoding:  # else the whole prompt came from the cache or was just prefilled
                self._park(request)
                self._prefilling.append(request)

    def _park(self, request: Request) -> None:
        """Point the row's decode slot at its next unwritten slot: a decode step over all rows
        writes there in a row that does not decode yet, and the next chunk overwrites it."""
        self.slot[request.row] = request.prefilled

    def _reuse_prefix(self, request: Request, first: Tensor) -> None:
        """Copy the longest cached prefix into the row. A prompt cached whole (with its next-token
        logits) needs no prefill: it starts decoding at once. A prompt that other waiting
        sequences repeat whole (``n > 1`` choices) is prefilled now, so they find it whole; one
        whose system prompt they share has that prefilled now and cached."""
        if self.prefix_cache is None or request.params.prompt_logprobs is not None:
            return  # a scored prompt needs the logits of every slot: prefilled whole
        prompt = request.prompt
        whole = None if request.params.max_tokens == 0 else self.prefix_cache.lookup_whole(self.namespace, prompt.tokens, prompt.segment_ids)
        if whole is not None:
            kv, logits = whole
            self.caches.write(request.row, kv, len(prompt))
            request.prefilled = request.cached_tokens = len(prompt)
            self._start_decoding([request], logits[None], first)
            return
        cached, kv = self.prefix_cache.lookup(self.namespace, prompt.tokens, prompt.segment_ids, self.settings.attention)
        if kv is not None:
            self.caches.write(request.row, kv, cached)
            request.prefilled = request.cached_tokens = cached
        if request.whole_key is not None and request.whole_key in self._identical:
            self._prefill_rows([request], [len(prompt)], first)  # caches it whole, with its logits
        elif kv is None and request.shared_key is not None and request.shared_key in self._shared:
            end = request.shared_key[-1]
            self._prefill_rows([request], [end], first=None)
            self.prefix_cache.insert(self.namespace, prompt.tokens[:end], prompt.segment_ids[:end], self.caches.read(request.row, end))

    # -- prefill ------------------------------------------------------------------------
    def _prefill_pass(self, first: Tensor, outputs: Dict[int, StepOutput]) -> None:
        """One bounded pass over the rows still prefilling (see :class:`GenerationSettings`)."""
        if not self._prefilling:
            return
        budget = self.settings.prefill_chunk_tokens if any(r is not None and r.decoding for r in self._slots) else None
        groups: Dict[int, Tuple[List[Request], List[int]]] = {}
        left = budget
        for i, request in enumerate(self._prefilling):
            if left is not None and left <= 0:
                break
            end = chunk_end(request.prompt.segment_ids, request.prefilled, left, self.settings.attention)
            if left is not None:
                if i > 0 and end - request.prefilled > left:
                    break  # only the first chunk of a pass may overrun the budget (a whole segment)
                left -= end - request.prefilled
            group = groups.setdefault(request.prefilled, ([], []))
            group[0].append(request)
            group[1].append(end)
        for requests, ends in groups.values():
            self._prefill_isolated(requests, ends, first, outputs)
        self._prefilling = [r for r in self._prefilling if r.prefilled < len(r.prompt) and not r.finished]

    def _prefill_isolated(self, requests: List[Request], ends: List[int], first: Tensor, outputs: Dict[int, StepOutput]) -> None:
        try:
            self._prefill_rows(requests, ends, first)
        except Exception as e:  # noqa: BLE001
            if not self.isolate_failures:
                raise
            if len(requests) == 1:
                self._fail_or_raise(requests[0], e, outputs)
                return
            log.exception("batched prefill failed; retrying its rows one by one")
            for request, end in zip(requests, ends):
                self._prefill_isolated([request], [end], first, outputs)

    def _prefill_rows(self, requests: List[Request], ends: List[int], first: Optional[Tensor]) -> None:
        """One prefill forward: each request's slots ``[start, end)``; requests whose prompt is
        complete choose their first token (into ``first`` and the decode state)."""
        start = requests[0].prefilled
        longest = max(ends)
        slots = round_up_to_tile(longest, start=start, tile=self.prefill_bucket, limit=self.max_len) if self.prefill_bucket else longest
        batch = layout_chunks([r.prompt for r in requests], ends, start=start, num_slots=slots, pad_id=self.pad_id).to(self.device)
        self.caches.plan_rows([r.row for r in requests], batch.positions[:, start:], slots, start=start)
        # The LM head runs on each row's last slot (its next token), and on every slot of a
        # scored prompt whose next token is a prompt token.
        rows = list(range(len(requests)))
        at = [end - start - 1 for end in ends]
        scored = [(i, p) for i, (r, end) in enumerate(zip(requests, ends)) if r.params.prompt_logprobs is not None for p in range(end - start) if start + p + 1 < len(r.prompt)]
        logits = prefill(
            self.model, batch, attention=self.settings.attention, backend=self.settings.attention_backend,
            logits_at=torch.tensor(at + [p for _, p in scored]).to(self.device), rows_at=torch.tensor(rows + [i for i, _ in scored]).to(self.device),
        )  # fmt: skip
        if scored:
            self._score_prompts(requests, start, scored, logits[len(requests) :])
        logits = logits[: len(requests)]
        self.prefill_forwards += 1
        self.prefilled_tokens += sum(end - start for end in ends)
        complete = []
        for i, (request, end) in enumerate(zip(requests, ends)):
            request.prefilled = end
            self._park(request)
            if end == len(request.prompt) and first is not None and request.params.max_tokens > 0:
                complete.append(i)  # (a request for no tokens ends at its next read)
        if not complete:
            return
        done = [requests[i] for i in complete]
        index = torch.tensor(complete).to(self.device)
        self._start_decoding(done, logits[index], first)
        if self.prefix_cache is not None:
            for i, request in zip(complete, done):
                if request.cached_tokens < len(request.prompt):
                    prompt = request.prompt
                    kv = self.caches.read(request.row, len(prompt))
                    self.prefix_cache.insert(self.namespace, prompt.tokens, prompt.segment_ids, kv, next_logits=logits[i].float().clone())

    def _score_prompts(self, requests: List[Request], start: int, scored: List[Tuple[int, int]], logits: Tensor) -> None:
        """Append the log-probabilities of the prompt tokens this chunk predicts (``scored``:
        ``(request index, query slot)`` pairs, ``logits`` ``[len(scored), vocab]``)."""
        top = max(requests[i].params.prompt_logprobs or 0 for i, _ in scored)
        targets = [requests[i].prompt.tokens[start + p + 1] for i, p in scored]
        chosen, ids, values = score_tokens(logits, torch.tensor(targets).to(self.device), top)
        chosen, ids, values = chosen.tolist(), ids.tolist(), values.tolist()  # a host read: scored prompts only
        for k, (i, _) in enumerate(scored):
            request = requests[i]
            request.prompt_logprobs += token_logprobs([targets[k]], [chosen[k]], [ids[k]], [values[k]], request.params.prompt_logprobs)

    def _start_decoding(self, requests: List[Request], logits: Tensor, first: Tensor) -> None:
        """Choose each request's first token from its prefill logits (``[k, vocab]``) and make its
        row decode from the slot after its prompt."""
        params = [r.params for r in requests]
        rows = [r.row for r in requests]
        index = torch.tensor(rows).to(self.device)
        raw = logits
        # The rows' settings first; the first token is then chosen from those rows of the tables.
        self.sampling.set_rows(rows, params, self.vocab)
        stops = [self._stops_of(p) for p in params]
        self._fit_stop_table(max(len(x) for x in stops))
        width = self.row_stops.shape[1]
        row_stops = torch.tensor([x + [-1] * (width - len(x)) for x in stops]).to(self.device)
        min_left = torch.tensor([p.min_tokens for p in params]).to(self.device)
        if self.penalties is None and any(p.penalizes for p in params):
            self.penalties = RowPenalties.empty(self.rows, self.vocab, self.device)
        if self.penalties is not None:  # every new row: its own settings, or the neutral ones
            self.penalties.start_rows(rows, params, [r.prompt.tokens for r in requests])
            if any(p.penalizes for p in params):
                logits = apply_penalties(logits, self.penalties.gather(index))
        if any(p.min_tokens > 0 for p in params):
            logits = suppress_stops(logits, row_stops, min_left)
        sampling = self.sampling.flags_for(params).rows(index)
        noise = None
        if sampling.samples:
            sampled = [i for i, p in enumerate(params) if p.samples]
            noise = draw_noise(len(requests), self.vocab, self.device, sampled, [requests[i].generator for i in sampled])
        token = choose_tokens(logits, noise, sampling)
        tops = [p.logprobs for p in params if p.logprobs is not None]
        if tops:  # scored from the raw logits, read with the step's tokens
            chosen, ids, values = score_tokens(raw, token, max(tops))
            for i, request in enumerate(requests):
                self._first_scores[request.row] = (chosen[i], ids[i], values[i])
        if self.penalties is not None:
            self.penalties.counts[index, token] += 1
        done = (token[:, None] == row_stops).any(-1)
        self.token[index] = token
        self.done[index] = done
        self.slot[index] = torch.tensor([len(r.prompt) for r in requests]).to(self.device)
        self.decoding[index] = True
        self.row_stops[index] = row_stops
        self.min_left[index] = min_left - 1
        first[index] = torch.where(done, torch.full_like(token, -1), token)
        for request in requests:
            request.chosen = 1

    # -- decode -------------------------------------------------------------------------
    def _decode_burst(self) -> Tuple[Optional[Tensor], Optional[Scores]]:
        """Up to ``stop_check_every`` decode steps (1 when streaming), no host read.

        Returns:
            Tuple: ``[rows, n]`` emitted tokens (``-1`` after a stop, ``-2`` in rows that did
            not decode), or None when nothing decoded; and when some row asked for
            ``logprobs``, their scores (``[rows, n]``, ``[rows, n, top]`` ids and values).
        """
        decoding = [r for r in self._slots if r is not None and r.decoding]
        if not decoding:
            return None, None
        every = 1 if self.stream_text else self.settings.stop_check_every
        steps = min([every] + [r.params.max_tokens - r.chosen for r in decoding])
        if steps <= 0:
            return None, None
        top = max((r.params.logprobs for r in decoding if r.params.logprobs is not None), default=-1)
        compiled = self._step_fn is not decode_step
        k = self.rows if compiled else max(r.row for r in decoding) + 1
        sampling = self.sampling.flags_for([r.params for r in decoding]).head(k)
        # Stops may be suppressed in this burst only while some row is short of its min_tokens.
        suppress = any(r.chosen < r.params.min_tokens for r in decoding)
        penalize = self.penalties is not None and any(r.params.penalizes for r in decoding)
        sampled = [r for r in decoding if r.params.samples]
        emitted: List[Tensor] = []
        scores: List[Scores] = []
        started = time.perf_counter()
        compiling, compiling_steps = 0.0, 0
        for step in range(steps):
            written = max(len(r.prompt) + r.decode_steps for r in decoding) + step + 1
            width = decode_width(written, self.max_len) if compiled else written
            noise = None
            if sampling.samples:
                noise = draw_noise(k, self.vocab, self.device, [r.row for r in sampled], [r.generator for r in sampled])
            shape = (width, sampling.samples, sampling.uses_top_k, sampling.uses_top_p, suppress, penalize, top)
            compiles = compiled and shape not in self._compiled_shapes
            if compiles:
                # This step compiles a graph: timed apart, so the decode rate is the graphs' own.
                self._compiled_shapes.add(shape)
                self._synchronize()
                first = time.perf_counter()
            out_token, out_scores = self._decode_step_isolated(k, noise, sampling, width, decoding, suppress, penalize, top)
            emitted.append(out_token)
            if out_scores is not None:
                scores.append(out_scores)
            if compiles:
                self._synchronize()
                compiling += time.perf_counter() - first
                compiling_steps += 1
        for request in decoding:
            request.decode_steps += steps
            request.chosen += steps
        self.decode_steps += steps
        self.decoded_tokens += (steps - compiling_steps) * len(decoding)
        self.compile_seconds += compiling
        self.decode_seconds += time.perf_counter() - started - compiling  # the read is added in _read
        # Only decoding rows' columns count: a row still prefilling (or free) inside [0, k) took
        # part without a sequence to decode, and its emitted values mean nothing.
        out = torch.full((self.rows, steps), -2, dtype=torch.long, device=self.device)
        rows = torch.tensor([r.row for r in decoding]).to(self.device)
        out[rows] = torch.stack(emitted, dim=1)[rows]
        if not scores:
            return out, None
        # [k] per step -> [k, steps] (and [k, steps, top]); rows past k never decoded.
        stacked = tuple(torch.stack(part, dim=1) for part in zip(*scores))
        return out, stacked  # type: ignore[return-value]

    def _decode_step_isolated(
        self, k: int, noise: Optional[Tensor], sampling: RowSampling, width: int, decoding: List[Request], suppress: bool, penalize: bool, top: int
    ) -> Tuple[Tensor, Optional[Scores]]:
        """One decode step over rows ``[0, k)``; a failure is retried row by row (eagerly) when
        failures are isolated, and a failing compiled step falls back to eager for good."""
        try:
            return self._decode_rows(self._step_fn, 0, k, noise, sampling, width, suppress, penalize, top)
        except Exception:  # noqa: BLE001
            if not self.isolate_failures:
                raise
            log.exception("batched decode step failed; retrying its rows one by one")
        emitted = torch.full((k,), -1, dtype=torch.long, device=self.device)
        scores: Optional[Scores] = None
        if top >= 0:
            scores = (torch.zeros(k, device=self.device), torch.zeros(k, top, dtype=torch.long, device=self.device), torch.zeros(k, top, device=self.device))
        ok = 0
        for request in decoding:
            row = request.row
            try:
                row_noise = None if noise is None else noise[row : row + 1]
                one = sampling.rows(torch.tensor([row], device=self.device))
                token, row_scores = self._decode_rows(decode_step, row, row + 1, row_noise, one, len(request.prompt) + request.decode_steps + 1, suppress, penalize, top)
                emitted[row] = token[0]
                if scores is not None and row_scores is not None:
                    for whole, part in zip(scores, row_scores):
                        whole[row] = part[0]
                ok += 1
            except Exception as e:  # noqa: BLE001
                log.exception("decode failed for sequence %d", request.id)
                request.error = f"the model failed on this request: {type(e).__name__}: {e}"
                self.decoding[row] = False
        if self._step_fn is not decode_step and ok == len(decoding):
            # Every row decodes eagerly: the compiler failed, not a request.
            log.error("the compiled decode step failed (traceback above); decoding eagerly from now on")
            self._step_fn = decode_step
        return emitted, scores

    def _decode_rows(
        self,
        fn: Callable[..., Tuple[Tensor, ...]],
        lo: int,
        hi: int,
        noise: Optional[Tensor],
        sampling: RowSampling,
        width: int,
        suppress: bool,
        penalize: bool,
        top: int,
    ) -> Tuple[Tensor, Optional[Scores]]:
        whole = hi - lo == self.rows
        rows = slice(lo, hi)

        def part(t: Tensor) -> Tensor:  # the buffer itself when whole: a compiled step sees one kind of input
            return t if whole else t[rows]

        self.caches.plan_decode(part(self.slot), width, first_row=lo)
        token, emitted, done, slot, min_left, scores = fn(
            self.model, part(self.token), part(self.done), part(self.slot), part(self.decoding), part(self.row_stops), part(self.min_left),
            noise, sampling, self.penalties.rows(lo, hi) if penalize else None, width=width, suppress=suppress, top_logprobs=top,
        )  # fmt: skip
        if whole and not self.settings.uses_cuda_graphs():
            self.token, self.done, self.slot, self.min_left = token, done, slot, min_left  # fresh tensors: no copy
            return emitted, scores
        # Copies into the engine's buffers (a CUDA graph's outputs are overwritten at its next replay).
        self.token[rows] = token
        self.done[rows] = done
        self.slot[rows] = slot
        self.min_left[rows] = min_left
        return emitted.clone(), None if scores is None else tuple(t.clone() for t in scores)  # type: ignore[return-value]

    # -- read ---------------------------------------------------------------------------
    def _read(self, first: Tensor, emitted: Optional[Tensor], scores: Optional[Scores], outputs: Dict[int, StepOutput]) -> None:
        """The step's one host read, then each sequence's new tokens in order."""
        started = time.perf_counter()
        table = first[:, None] if emitted is None else torch.cat([first[:, None], emitted], dim=1)
        rows = table.tolist()  # the step's one host read
        # Scores of the same tokens, when asked for (the values are ready: read with the tokens).
        first_scores = {row: tuple(t.tolist() for t in parts) for row, parts in self._first_scores.items()}
        self._first_scores = {}
        step_scores = None if scores is None else tuple(t.tolist() for t in scores)
        now = time.perf_counter()
        if emitted is not None:
            self.decode_seconds += now - started
        for request in list(self._slots):
            if request is None or request.finished:
                continue
            if request.error:
                self._finish(request, "error", outputs)
                continue
            if request.params.max_tokens == 0 and request.prefilled == len(request.prompt):
                self._finish(request, "length", outputs)  # prefilled (and scored): nothing to generate
                continue
            for column, token in enumerate(rows[request.row]):
                if token == -2:
                    continue
                if token == -1:
                    self._finish(request, "stop", outputs)
                    break
                logprob = None
                if request.params.logprobs is not None:
                    row = request.row
                    chosen, ids, values = first_scores[row] if column == 0 else (part[row][column - 1] for part in step_scores)  # type: ignore[index, union-attr]
                    logprob = token_logprobs([token], [chosen], [ids], [values], request.params.logprobs)[0]
                if self._accept(request, token, now, outputs, logprob):
                    break

    def _accept(self, request: Request, token: int, now: float, outputs: Dict[int, StepOutput], logprob: Optional[TokenLogprob] = None) -> bool:
        """Take one token (with its score when the sequence asked for one); returns whether the
        sequence ended."""
        out = self._output(outputs, request)
        request.tokens.append(token)
        if logprob is not None:
            request.logprobs.append(logprob)
            out.logprobs.append(logprob)
        if request.first_token_at is None:
            request.first_token_at = now
        piece, hit_stop_string = request.text.add(token) if request.text is not None else ("", False)
        out.tokens.append(token)
        out.pieces.append(piece)
        if hit_stop_string:
            self._finish(request, "stop", outputs)
        elif len(request.tokens) >= request.params.max_tokens:
            self._finish(request, "length", outputs)
        return request.finished

    def _finish(self, request: Request, reason: str, outputs: Dict[int, StepOutput]) -> None:
        request.finish_reason = reason
        request.finished_at = time.perf_counter()
        out = self._output(outputs, request)
        out.finished = True
        if request.text is not None and reason != "error":
            out.final_text = request.text.finish()
        row = request.row
        if row < 0 or self._slots[row] is not request:
            return
        if reason in ("stop", "length") and self.prefix_cache is not None:
            # Prompt + answer (the conversation so far): a chat's next turn starts with it.
            answer = min(request.decode_steps, len(request.tokens))
            if answer > 0:
                prompt = request.prompt
                length = len(prompt) + answer
                self.prefix_cache.insert(
                    self.namespace, prompt.tokens + request.tokens[:answer], prompt.segment_ids + [CAUSAL] * answer, self.caches.read(row, length)
                )
        self._slots[row] = None
        if request in self._prefilling:
            self._prefilling.remove(request)
        self.decoding[row] = False
        self.done[row] = True

    @torch.inference_mode()
    def abort_all(self, message: str) -> List[StepOutput]:
        """End every waiting and running sequence with ``"error"`` and ``message`` (a server that
        stops, or a step that failed outside any one sequence)."""
        outputs: Dict[int, StepOutput] = {}
        with self._lock:
            waiting, self._waiting = list(self._waiting), collections.deque()
            self._shared.clear()
        for request in waiting + [r for r in self._slots if r is not None]:
            request.error = message
            self._finish(request, "error", outputs)
        return list(outputs.values())

    def _fail_or_raise(self, request: Request, error: Exception, outputs: Dict[int, StepOutput]) -> None:
        if not self.isolate_failures:
            raise error
        log.error("sequence %d failed: %s: %s", request.id, type(error).__name__, error, exc_info=error)
        request.error = f"the model failed on this request: {type(error).__name__}: {error}"
        self._finish(request, "error", outputs)

    # -- lifetime -----------------------------------------------------------------------
    def reserve(self, max_len: int) -> None:
        """Grow the rows to ``max_len`` slots (at most the model's ``max_seq_len``) when they are
        shorter; only while nothing runs. Cached prefixes stay valid (they are copies)."""
        max_len = min(max_len, self.model.max_seq_len)
        if max_len <= self.max_len:
            return
        if self.has_unfinished():
            raise RuntimeError("reserve() needs an idle engine")
        self.max_len = max_len
        self.caches = install_slot_caches(self.model, self.rows, max_len, self.model.tok_embeddings.weight.dtype)
        self._init_state()

    def close(self) -> None:
        """Give the model back as it was: no caches, torchtune's attention layers."""
        if self.closed:
            return
        self.closed = True
        remove_caches(self.model)
        self._gqa.__exit__(None, None, None)

    def __enter__(self) -> "InferenceEngine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _ensure_mas_attention(model: nn.Module, settings: GenerationSettings) -> None:
    from torchtune.modules import MultiHeadAttention

    for module in model.modules():
        if isinstance(module, MultiHeadAttention):
            if not isinstance(module._attention_call, MASAttention):
                use_mas_attention(model, settings.attention_backend)
            return
