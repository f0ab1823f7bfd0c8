"""What the engine tracks per sequence (:class:`Request`) and reports per step (:class:`StepOutput`)."""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch

from mas.errors import DataError
from mas.generation.logprobs import TokenLogprob
from mas.generation.sampling import SamplingParams
from mas.generation.text_stream import TextStream
from mas.segments import SegmentedSequence

__all__ = ["PromptTooLongError", "Request", "StepOutput"]

_ids = itertools.count()


class PromptTooLongError(DataError):
    """The prompt plus ``max_tokens`` does not fit a row of the KV cache (the user's to fix)."""


@dataclass(eq=False)
class Request:
    """One sequence, from submission to its last token.

    Attributes:
        prompt (SegmentedSequence): the segmented prompt (``for_generation=True``).
        params (SamplingParams): how it is decoded.
        tokens (List[int]): generated ids so far (a stop token excluded).
        finish_reason (Optional[str]): ``"stop"``, ``"length"``, ``"cancelled"`` or ``"error"``.
        error (str): what failed (``finish_reason == "error"``).
        cached_tokens (int): prompt tokens whose keys and values came from the prefix cache.
        logprobs (List[TokenLogprob]): scores of ``tokens`` (``params.logprobs``; else empty).
        prompt_logprobs (List[TokenLogprob]): scores of the prompt's tokens after the first
            (``params.prompt_logprobs``; else empty).
        submitted_at, admitted_at, first_token_at, finished_at (float): ``perf_counter`` times.
    """

    prompt: SegmentedSequence
    params: SamplingParams
    id: int = field(default_factory=lambda: next(_ids))
    tokens: List[int] = field(default_factory=list)
    finish_reason: Optional[str] = None
    error: str = ""
    cached_tokens: int = 0
    logprobs: List[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: List[TokenLogprob] = field(default_factory=list)
    submitted_at: float = field(default_factory=time.perf_counter)
    admitted_at: Optional[float] = None
    first_token_at: Optional[float] = None
    finished_at: Optional[float] = None
    # Engine bookkeeping.
    row: int = -1
    prefilled: int = 0  # prompt tokens written to the row
    decode_steps: int = 0  # generated tokens written to the row
    chosen: int = 0  # tokens chosen (first token included), read or not
    generator: Optional[torch.Generator] = field(default=None, repr=False)
    text: Optional[TextStream] = field(default=None, repr=False)
    shared_key: Optional[Tuple[int, ...]] = field(default=None, repr=False)
    whole_key: Optional[Tuple[int, ...]] = field(default=None, repr=False)
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)

    def cancel(self) -> None:
        """Stop generating (thread-safe); the engine frees the row at its next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def decoding(self) -> bool:
        return self.chosen > 0 and not self.finished


@dataclass
class StepOutput:
    """What one step did for one sequence.

    Attributes:
        request (Request): the sequence.
        tokens (List[int]): ids accepted this step.
        pieces (List[str]): the text each of them adds (empty strings without text streaming).
        finished (bool): the sequence ended this step (see ``request.finish_reason``).
        final_text (str): text held back until the end (a possible stop-string start).
        logprobs (List[TokenLogprob]): scores of ``tokens`` when the sequence asked for them.
    """

    request: Request
    tokens: List[int] = field(default_factory=list)
    pieces: List[str] = field(default_factory=list)
    finished: bool = False
    final_text: str = ""
    logprobs: List[TokenLogprob] = field(default_factory=list)
