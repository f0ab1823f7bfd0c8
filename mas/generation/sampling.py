"""Next-token choice for every row of a batch: greedy, temperature, top-k and top-p (nucleus).

Each row carries its own settings as tensors (:class:`RowSampling`), so one batch can mix greedy
rows and sampled rows with different filters, and the choice traces into a compiled decode step
(no host read, no data-dependent shape).

A sampled row draws ``argmax(p / E)`` over ``E ~ Exp(1)`` noise, a draw from ``p`` (the
exponential-race form of the Gumbel-max trick). The noise comes from the sequence's own
generator, one ``[1, vocab]`` draw per chosen token (:func:`draw_noise`), so a seeded sequence
draws the same tokens whatever else shares its batch. Greedy rows draw nothing.

The slow twins (a scalar filter per row and ``torch.multinomial``) live in
:mod:`mas.testing.reference_decoding`; the tests compare against them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from mas.errors import ConfigError
from mas.generation.logprobs import MAX_LOGPROBS

__all__ = ["RowSampling", "SamplingParams", "choose_tokens", "draw_noise", "exponential_noise", "filtered_probs", "suppress_stops"]


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence is decoded.

    Attributes:
        max_tokens (int): tokens to generate at most (a stop token is not counted); 0: prefill
            the prompt and generate nothing (to score it with ``prompt_logprobs``).
        temperature (float): 0: greedy.
        top_k (Optional[int]): sample from the ``k`` most likely tokens (None: all).
        top_p (Optional[float]): nucleus mass (None: off).
        seed (Optional[int]): seeds this sequence's own generator on the model's device: the
            tokens are then the same whatever else is decoding (None: the device's default RNG).
        stop (Sequence[str]): strings that end the text (not included).
        ignore_stop_tokens (bool): the engine's stop tokens (the tokenizer's EOS) do not end this
            sequence (benchmarks, tests); its own ``stop_token_ids`` still do.
        stop_token_ids (Sequence[int]): more ids that end this sequence (not included).
        min_tokens (int): tokens generated before any stop token may be chosen (their logits are
            ``-inf`` until then).
        presence_penalty (float), frequency_penalty (float): subtracted from the logit of a token
            already in the output, once / per occurrence (0: off; :mod:`mas.generation.penalties`).
        repetition_penalty (float): divides a positive (multiplies a negative) logit of a token
            in the prompt or the output (1: off).
        logprobs (Optional[int]): report each generated token's log-probability and this many
            most likely alternatives (:mod:`mas.generation.logprobs`; None: none).
        prompt_logprobs (Optional[int]): the same for every prompt token after the first (the
            prompt is then prefilled whole, not copied from the prefix cache; None: none).
    """

    max_tokens: int
    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None
    stop: Sequence[str] = ()
    ignore_stop_tokens: bool = False
    stop_token_ids: Sequence[int] = ()
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None

    def __post_init__(self) -> None:
        # ConfigError: the generate and serve configs' sampling keys (temperature, top_k, top_p) arrive
        # here under their own names (the server checks its requests before, as 400s).
        if self.max_tokens < 0:
            raise ConfigError(f"max_tokens must be >= 0, got {self.max_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise ConfigError(f"{name} must be in [0, {MAX_LOGPROBS}] or None, got {value}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ConfigError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not self.repetition_penalty > 0:
            raise ConfigError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ConfigError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k must be >= 1 or None, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1] or None, got {self.top_p}")

    @property
    def samples(self) -> bool:
        return self.temperature > 0.0

    @property
    def penalizes(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0


@dataclass
class RowSampling:
    """Per-row sampling settings as tensors, and which filters any row uses (static flags: a
    compiled step keeps one graph per combination).

    Attributes:
        temperature (Tensor): ``[b]`` float32 (0: greedy).
        top_k (Tensor): ``[b]`` long (the vocabulary size: no filter).
        top_p (Tensor): ``[b]`` float32 (1: no filter).
        samples (bool), uses_top_k (bool), uses_top_p (bool): whether any row samples / filters.
    """

    temperature: Tensor
    top_k: Tensor
    top_p: Tensor
    samples: bool = False
    uses_top_k: bool = False
    uses_top_p: bool = False

    @classmethod
    def empty(cls, rows: int, vocab: int, device: torch.device) -> "RowSampling":
        return cls(
            torch.zeros(rows, dtype=torch.float32, device=device),
            torch.full((rows,), vocab, dtype=torch.long, device=device),
            torch.ones(rows, dtype=torch.float32, device=device),
        )

    def set_rows(self, rows: Sequence[int], params: Sequence[SamplingParams], vocab: int) -> None:
        """Give rows ``rows`` the settings ``params`` (one host-to-device copy per field)."""
        device = self.temperature.device
        index = torch.tensor(list(rows), dtype=torch.long).to(device)
        self.temperature[index] = torch.tensor([p.temperature for p in params], dtype=torch.float32).to(device)
        self.top_k[index] = torch.tensor([min(p.top_k or vocab, vocab) for p in params], dtype=torch.long).to(device)
        self.top_p[index] = torch.tensor([p.top_p if p.top_p is not None else 1.0 for p in params], dtype=torch.float32).to(device)

    def flags_for(self, params: Sequence[SamplingParams]) -> "RowSampling":
        """The same tensors with the static flags of the rows that use ``params``."""
        return RowSampling(
            self.temperature,
            self.top_k,
            self.top_p,
            samples=any(p.samples for p in params),
            uses_top_k=any(p.samples and p.top_k is not None for p in params),
            uses_top_p=any(p.samples and p.top_p is not None and p.top_p < 1.0 for p in params),
        )

    def rows(self, index: Tensor) -> "RowSampling":
        """The settings of some rows (``index``: ``[k]`` long)."""
        return RowSampling(self.temperature[index], self.top_k[index], self.top_p[index], self.samples, self.uses_top_k, self.uses_top_p)

    def head(self, k: int) -> "RowSampling":
        """The settings of rows ``[0, k)`` (views)."""
        return RowSampling(self.temperature[:k], self.top_k[:k], self.top_p[:k], self.samples, self.uses_top_k, self.uses_top_p)


def filtered_probs(logits: Tensor, sampling: RowSampling) -> Tensor:
    """Each row's sampling distribution after its temperature, top-k and top-p.

    Args:
        logits (Tensor): ``[b, vocab]`` next-token logits.
        sampling (RowSampling): ``[b]`` settings; greedy rows are given temperature 1 here
            (their distribution is unused).

    Returns:
        Tensor: ``[b, vocab]`` float32 probabilities (zero outside each row's kept tokens).
    """
    temperature = torch.where(sampling.temperature > 0, sampling.temperature, torch.ones_like(sampling.temperature))
    logits = logits.float() / temperature[:, None]
    if sampling.uses_top_k:
        # Everything below a row's k-th largest logit is out (k = vocab keeps all).
        ordered = torch.sort(logits, dim=-1, descending=True).values
        kth = ordered.gather(-1, (sampling.top_k - 1)[:, None])
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.uses_top_p:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens before it already reach top_p (the top token always
        # stays); rows with top_p = 1 drop nothing, whatever the rounding of the sum.
        drop_sorted = ((sorted_probs.cumsum(-1) - sorted_probs) >= sampling.top_p[:, None]) & (sampling.top_p < 1.0)[:, None]
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


def choose_tokens(logits: Tensor, noise: Optional[Tensor], sampling: RowSampling) -> Tensor:
    """One token per row: ``argmax`` for greedy rows, a draw from the filtered distribution for
    the others (traceable, no host read).

    Args:
        logits (Tensor): ``[b, vocab]`` next-token logits.
        noise (Optional[Tensor]): ``[b, vocab]`` ``Exp(1)`` noise (:func:`draw_noise`); None when
            no row samples.
        sampling (RowSampling): ``[b]`` settings.

    Returns:
        Tensor: ``[b]`` token ids (int64).
    """
    greedy = logits.argmax(dim=-1)
    if not sampling.samples:
        return greedy
    if noise is None:
        raise ValueError("sampling with temperature > 0 needs noise")
    sampled = (filtered_probs(logits, sampling) / noise).argmax(dim=-1)
    return torch.where(sampling.temperature > 0, sampled, greedy)


def exponential_noise(shape: torch.Size, device: torch.device, generator: Optional[torch.Generator] = None) -> Tensor:
    """``Exp(1)`` samples for :func:`choose_tokens` (a device kernel, no host read)."""
    noise = torch.empty(shape, device=device, dtype=torch.float32).exponential_(generator=generator)
    # A zero would turn a filtered-out token's 0 / 0 into NaN, which argmax could pick.
    return noise.clamp_min_(torch.finfo(torch.float32).tiny)


def draw_noise(
    rows: int, vocab: int, device: torch.device, sampled: Sequence[int], generators: Sequence[Optional[torch.Generator]]
) -> Tensor:
    """The noise of one token choice: a ``[1, vocab]`` draw from each sampled row's generator.

    Args:
        rows (int): batch rows.
        vocab (int): vocabulary size.
        device (torch.device): where the logits are.
        sampled (Sequence[int]): the rows that sample.
        generators (Sequence[Optional[torch.Generator]]): each sampled row's generator (None: the
            device's default RNG), in the order of ``sampled``.

    Returns:
        Tensor: ``[rows, vocab]`` (ones in rows that do not sample).
    """
    noise = torch.ones((rows, vocab), dtype=torch.float32, device=device)
    for row, generator in zip(sampled, generators):
        noise[row] = exponential_noise((1, vocab), device, generator)[0]
    return noise


def suppress_stops(logits: Tensor, row_stops: Tensor, min_left: Tensor) -> Tensor:
    """Each row's stop ids made impossible (``-inf``) while it must still generate tokens.

    Args:
        logits (Tensor): ``[b, vocab]``.
        row_stops (Tensor): ``[b, S]`` long, each row's stop ids (``-1`` pads).
        min_left (Tensor): ``[b]`` long, tokens a row must still generate before it may stop.

    Returns:
        Tensor: ``[b, vocab]``.
    """
    is_stop = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, row_stops.clamp(min=0), row_stops >= 0)
    return logits.masked_fill(is_stop & (min_left > 0)[:, None], float("-inf"))
