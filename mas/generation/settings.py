"""How the inference engine runs (:class:`GenerationSettings`): one object for ``mas.generate``,
``mas_eval`` and ``mas_serve``, built from a recipe's options by
:func:`mas.generation.options.generation_settings`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Sequence, get_args

from mas.attention import AttentionBackend, validate_attention_backend
from mas.errors import ConfigError
from mas.generation.sampling import SamplingParams
from mas.masks import AttentionMode, validate_attention_mode

__all__ = ["CACHE_LEN_MULTIPLE", "CompileMode", "GenerationSettings", "default_cache_len"]

#: ``torch.compile`` modes for the decode step.
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]

#: Cache lengths are rounded up to a multiple of this (fewer distinct shapes to compile).
CACHE_LEN_MULTIPLE = 256


@dataclass
class GenerationSettings:
    """How to generate.

    Engine-wide:

    Attributes:
        attention (str): prefill mask, ``"mas"`` or ``"causal"`` (independent of training).
        attention_backend (str): ``auto``/``flex``/``sdpa`` for the prefill.
        batch_size (int): sequences decoded together (KV-cache rows); more prompts wait for a row.
        max_cache_len (Optional[int]): slots per row (prompt + generated tokens); None:
            ``mas.generate`` sizes it from the prompts (:func:`default_cache_len`), the server
            uses the model's ``max_seq_len``.
        reuse_system_cache (bool): the prefix cache: reuse the keys and values of prompt
            prefixes that end at a segment boundary (a shared system prompt is prefilled once;
            a chat's earlier turns are not prefilled again).
        prefix_cache_max_tokens (int), prefix_cache_max_mib (float): its LRU bounds.
        prefill_chunk_tokens (Optional[int]): prompt tokens prefilled per engine step while
            other rows decode (bounds their stall; a prompt segment is never split). None: no
            bound.
        compile_decode (bool): ``torch.compile`` the decode step (forward, token choice and
            stops; static shapes, one graph per attention-width bucket).
        compile_mode (str): its ``torch.compile`` mode (``"reduce-overhead"``: CUDA graphs).
        stop_check_every (int): decode steps between host reads of the new tokens when nobody
            streams (1: every step).
        native_gqa (bool): grouped-query attention without expanded K/V copies
            (:mod:`mas.generation.gqa_attention`); False runs torchtune's expanding forward.
        stop_tokens (Optional[Sequence[int]]): ids that end a sequence (None: the tokenizer's).

    Defaults of each prompt's :class:`~mas.generation.sampling.SamplingParams`:

    Attributes:
        max_new_tokens (int), temperature (float), top_k (Optional[int]), top_p
        (Optional[float]), stop (Sequence[str]): as in ``SamplingParams``.
        seed (Optional[int]): prompt ``i`` of a call samples from a generator seeded ``seed + i``
            (so each prompt draws what it draws alone, whatever the batch size).
        logprobs (Optional[int]): score each generated token with this many alternatives
            (``GenerationResult.logprobs``; None: none).
    """

    attention: AttentionMode = "mas"
    attention_backend: AttentionBackend = "auto"
    batch_size: int = 8
    max_cache_len: Optional[int] = None
    reuse_system_cache: bool = False
    prefix_cache_max_tokens: int = 65536
    prefix_cache_max_mib: float = 1024.0
    prefill_chunk_tokens: Optional[int] = 2048
    compile_decode: bool = False
    compile_mode: CompileMode = "default"
    stop_check_every: int = 8
    native_gqa: bool = True
    stop_tokens: Optional[Sequence[int]] = None
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    stop: Sequence[str] = ()
    seed: Optional[int] = None
    logprobs: Optional[int] = None

    def __post_init__(self) -> None:
        validate_attention_mode(self.attention)
        validate_attention_backend(self.attention_backend)
        for name in ("max_new_tokens", "batch_size", "stop_check_every", "prefix_cache_max_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.compile_mode not in get_args(CompileMode):
            raise ConfigError(f"compile_mode must be one of {', '.join(get_args(CompileMode))}, got {self.compile_mode!r}")
        for name in ("max_cache_len", "prefill_chunk_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1 or None, got {getattr(self, name)}")
        self.sampling_params(0)  # checks the sampling defaults

    def uses_cuda_graphs(self) -> bool:
        """Whether the compiled decode step replays CUDA graphs (whose outputs must be copied)."""
        return self.compile_decode and self.compile_mode in ("reduce-overhead", "max-autotune")

    def sampling_params(self, index: int = 0) -> SamplingParams:
        """The sampling of prompt ``index`` of a ``mas.generate`` call."""
        return SamplingParams(
            max_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            seed=None if self.seed is None else self.seed + index,
            stop=tuple(self.stop),
            logprobs=self.logprobs,
        )


def default_cache_len(prompt_lengths: Sequence[int], max_new_tokens: int, model_max_seq_len: int) -> int:
    """KV-cache slots when ``max_cache_len`` is unset: the longest prompt + ``max_new_tokens``,
    rounded up to a multiple of :data:`CACHE_LEN_MULTIPLE`, at most ``model_max_seq_len``.

    (The model's ``max_seq_len`` alone is 131,072 slots for Llama 3.2: gigabytes per row.)
    """
    needed = max(prompt_lengths, default=0) + max_new_tokens
    return min(-(-needed // CACHE_LEN_MULTIPLE) * CACHE_LEN_MULTIPLE, model_max_seq_len)
