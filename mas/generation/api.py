"""``mas.generate``: prompts in, token ids and text out.

The offline driver of :class:`~mas.generation.engine.InferenceEngine` (as vLLM's ``LLM`` drives
the engine its server uses): submit every prompt, step until all are done. A caller that
generates in several calls (``mas_eval``'s batches) passes one engine to all of them, so its
prefix cache and compiled step live for the whole run.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, List, Mapping, Optional, Sequence, Union

from torch import nn
from torchtune.data import Message

from mas.errors import DataError
from mas.generation.engine import InferenceEngine
from mas.generation.logprobs import TokenLogprob
from mas.generation.request import PromptTooLongError
from mas.generation.settings import GenerationSettings, default_cache_len
from mas.segments import SegmentBuilder, SegmentedSequence

__all__ = ["GenerationResult", "Prompt", "generate", "prompt_messages"]

#: A prompt: a user string, ``{"system": ..., "user": ...}``, ``{"messages": [...]}``, a list of
#: torchtune ``Message``, or an already segmented :class:`SegmentedSequence`.
Prompt = Union[str, Mapping[str, Any], Sequence[Message], SegmentedSequence]


@dataclass
class GenerationResult:
    """What :func:`generate` returns, in prompt order.

    Attributes:
        tokens (List[List[int]]): generated ids per prompt (stop tokens excluded).
        texts (Optional[List[str]]): decoded completions (None without a tokenizer).
        prompts (List[SegmentedSequence]): the segmented prompts that were run.
        time_to_first_token_s (float): mean over prompts of admission to first token.
        decode_tokens_per_s (float): decoded tokens (all rows) per second of decoding (the
            decode steps that compiled a graph are left out: see ``compile_seconds``).
        compile_seconds (float): time of the decode steps that compiled a graph (``compile_decode``).
        system_cache_hits (int): prompts whose leading keys and values (a system prompt) came
            from the prefix cache instead of a prefill.
        cached_prompt_tokens (int): prompt tokens taken from the prefix cache, over all prompts.
        finish_reasons (List[str]): ``"stop"`` or ``"length"`` per prompt.
        logprobs (Optional[List[List[TokenLogprob]]]): with ``logprobs`` set, each generated
            token's log-probability and its most likely alternatives, per prompt.
    """

    tokens: List[List[int]]
    texts: Optional[List[str]]
    prompts: List[SegmentedSequence]
    time_to_first_token_s: float
    decode_tokens_per_s: float
    system_cache_hits: int = 0
    cached_prompt_tokens: int = 0
    compile_seconds: float = 0.0
    finish_reasons: List[str] = field(default_factory=list)
    logprobs: Optional[List[List[TokenLogprob]]] = None


def prompt_messages(prompt: Prompt, index: int = 0) -> List[Message]:
    """Normalize a prompt to messages (see :data:`Prompt`).

    Raises:
        DataError: naming the prompt, for empty or malformed prompts.
    """
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"prompt {index} is empty")
        return [Message("user", prompt, masked=True)]
    if isinstance(prompt, Mapping):
        if "messages" in prompt:
            messages = [m if isinstance(m, Message) else Message(m["role"], m["content"], masked=m["role"] != "assistant") for m in prompt["messages"]]
        else:
            unknown = set(prompt) - {"system", "user"}
            if unknown or "user" not in prompt:
                raise DataError(f"prompt {index}: expected keys 'system' (optional) and 'user', got {sorted(prompt)}")
            messages = [Message(role, prompt[role], masked=True) for role in ("system", "user") if prompt.get(role) is not None]
    else:
        messages = list(prompt)
    if not messages:
        raise DataError(f"prompt {index} has no message")
    for m in messages:
        text = "".join(c["content"] for c in m.content if c["type"] == "text")
        if not text.strip():
            raise DataError(f"prompt {index}: the {m.role} message is empty")
    return messages


def generate(
    model: nn.Module,
    tokenizer_or_tokens: Any,
    prompts: Optional[Sequence[Prompt]] = None,
    *,
    settings: Optional[GenerationSettings] = None,
    prompt_format: str = "text",
    merge_system_and_user: bool = False,
    engine: Optional[InferenceEngine] = None,
    **setting_overrides: Any,
) -> GenerationResult:
    """Generate completions with a MAS prefill and causal decoding.

    Args:
        model (nn.Module): a torchtune decoder (LoRA or merged), on its device, in eval mode.
        tokenizer_or_tokens: a torchtune tokenizer (then ``prompts`` are strings, dicts or
            messages), or a list of :class:`SegmentedSequence` prompts (then no text is decoded).
        prompts (Optional[Sequence[Prompt]]): the prompts, when a tokenizer is given.
        settings (Optional[GenerationSettings]): sampling, batching, caching.
        prompt_format (str): ``"text"`` or ``"chat"``, as in training.
        merge_system_and_user (bool): as in training (the prefix cache then finds no reusable
            system prompt: nothing before the end of the merged segment is final).
        engine (Optional[InferenceEngine]): run on this engine (its engine-wide settings win;
            ``settings`` then gives the sampling); default: one made for this call and closed.
        **setting_overrides: fields of :class:`GenerationSettings` (e.g. ``max_new_tokens=32``).

    Returns:
        GenerationResult: ids, texts and timings in prompt order.

    Raises:
        DataError: an empty or malformed prompt, or one that does not fit the KV cache (a
            ``UserError``: one line for the user, naming the prompt).

    Example:
        >>> out = mas.generate(model, tokenizer, [{"system": "Be brief.", "user": "Hi"}], max_new_tokens=8)
        >>> out.texts[0]
    """
    settings = replace(settings or GenerationSettings(), **setting_overrides)
    tokenizer = None
    if prompts is None:
        sequences = list(tokenizer_or_tokens)
        if not all(isinstance(s, SegmentedSequence) for s in sequences):
            raise TypeError("without a tokenizer, prompts must be SegmentedSequence objects")
    else:
        tokenizer = tokenizer_or_tokens
        builder = SegmentBuilder(tokenizer, prompt_format=prompt_format, merge_system_and_user=merge_system_and_user)
        sequences = [builder(prompt_messages(p, i), for_generation=True) for i, p in enumerate(prompts)]
    for i, seq in enumerate(sequences):
        if len(seq) == 0:
            raise DataError(f"prompt {i} is empty")
    needed = default_cache_len([len(s) for s in sequences], settings.max_new_tokens, model.max_seq_len)
    own_engine = engine is None
    if engine is None:
        # One cache length for the call: the caches are allocated once and a compiled decode
        # step keeps its shapes.
        engine_settings = settings if settings.max_cache_len is not None else replace(settings, max_cache_len=needed)
        # No more rows than prompts: a free row costs memory, and a compiled step computes it.
        engine_settings = replace(engine_settings, batch_size=min(settings.batch_size, len(sequences)))
        engine = InferenceEngine(model, engine_settings, tokenizer=tokenizer, pad_id=getattr(tokenizer, "pad_id", None) or 0)
    elif engine.settings.max_cache_len is None:
        engine.reserve(needed)
    try:
        return _run(engine, sequences, settings, tokenizer)
    finally:
        if own_engine:
            engine.close()


def _run(engine: InferenceEngine, sequences: List[SegmentedSequence], settings: GenerationSettings, tokenizer: Any) -> GenerationResult:
    """Submit every prompt, step until all are done, collect in prompt order."""
    requests = []
    for i, seq in enumerate(sequences):
        try:
            requests.append(engine.submit(seq, settings.sampling_params(i)))
        except PromptTooLongError as e:
            raise DataError(f"prompt {i}: {e}") from None
    decoded, decode_s, compile_s = engine.decoded_tokens, engine.decode_seconds, engine.compile_seconds
    while engine.has_unfinished():
        engine.step()
    texts = None
    if tokenizer is not None:
        texts = [r.text.text if r.text is not None else tokenizer.decode(r.tokens) for r in requests]
    ttft = [r.first_token_at - r.admitted_at for r in requests if r.first_token_at is not None and r.admitted_at is not None]
    decode_s = engine.decode_seconds - decode_s
    return GenerationResult(
        tokens=[r.tokens for r in requests],
        texts=texts,
        prompts=list(sequences),
        time_to_first_token_s=sum(ttft) / max(len(ttft), 1),
        decode_tokens_per_s=(engine.decoded_tokens - decoded) / decode_s if decode_s > 0 else 0.0,
        system_cache_hits=sum(r.cached_tokens > 0 for r in requests),
        cached_prompt_tokens=sum(r.cached_tokens for r in requests),
        compile_seconds=engine.compile_seconds - compile_s,
        finish_reasons=[r.finish_reason or "" for r in requests],
        logprobs=None if settings.logprobs is None else [r.logprobs for r in requests],
    )
