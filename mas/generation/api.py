"""``mas.generate``: prompts in, token ids and text out."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn
from torchtune.data import Message

from mas.generation._decoding import (
    GenerationSettings,
    SystemPromptCache,
    default_cache_len,
    generate_batch,
    system_prefix,
)
from mas.generation.kv_cache import clear_kv_caches
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
        time_to_first_token_s (float): mean over batches of prefill + first token.
        decode_tokens_per_s (float): decoded tokens (all rows) per second of decoding.
        system_cache_hits (int): prompts whose system prompt KV came from the system cache.
    """

    tokens: List[List[int]]
    texts: Optional[List[str]]
    prompts: List[SegmentedSequence]
    time_to_first_token_s: float
    decode_tokens_per_s: float
    system_cache_hits: int = 0


def prompt_messages(prompt: Prompt, index: int = 0) -> List[Message]:
    """Normalize a prompt to messages (see :data:`Prompt`).

    Raises:
        ValueError: naming the prompt, for empty or malformed prompts.
    """
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError(f"prompt {index} is empty")
        return [Message("user", prompt, masked=True)]
    if isinstance(prompt, Mapping):
        if "messages" in prompt:
            messages = [m if isinstance(m, Message) else Message(m["role"], m["content"], masked=m["role"] != "assistant") for m in prompt["messages"]]
        else:
            unknown = set(prompt) - {"system", "user"}
            if unknown or "user" not in prompt:
                raise ValueError(f"prompt {index}: expected keys 'system' (optional) and 'user', got {sorted(prompt)}")
            messages = [Message(role, prompt[role], masked=True) for role in ("system", "user") if prompt.get(role) is not None]
    else:
        messages = list(prompt)
    if not messages:
        raise ValueError(f"prompt {index} has no message")
    for m in messages:
        text = "".join(c["content"] for c in m.content if c["type"] == "text")
        if not text.strip():
            raise ValueError(f"prompt {index}: the {m.role} message is empty")
    return messages


def _batches(sequences: Sequence[SegmentedSequence], batch_size: int, *, by_system_prompt: bool) -> List[List[int]]:
    """Prompt indices in batches; with ``by_system_prompt`` each batch shares one system prompt."""
    groups: Dict[Any, List[int]] = {}
    for i, seq in enumerate(sequences):
        prefix = system_prefix(seq) if by_system_prompt else None
        groups.setdefault(tuple(prefix.tokens) if prefix else None, []).append(i)
    return [ids[s : s + batch_size] for ids in groups.values() for s in range(0, len(ids), batch_size)]


def generate(
    model: nn.Module,
    tokenizer_or_tokens: Any,
    prompts: Optional[Sequence[Prompt]] = None,
    *,
    settings: Optional[GenerationSettings] = None,
    prompt_format: str = "text",
    merge_system_and_user: bool = False,
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
        merge_system_and_user (bool): as in training (then no system-prompt cache).
        **setting_overrides: fields of :class:`GenerationSettings` (e.g. ``max_new_tokens=32``).

    Returns:
        GenerationResult: ids, texts and timings in prompt order.

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
            raise ValueError(f"prompt {i} is empty")
    if settings.reuse_system_cache and merge_system_and_user:
        raise ValueError(
            "reuse_system_cache needs the system prompt as its own segment; with "
            "merge_system_and_user=True its tokens attend to the user turn"
        )
    if settings.stop_tokens is None and tokenizer is not None:
        settings = replace(settings, stop_tokens=list(getattr(tokenizer, "stop_tokens", [tokenizer.eos_id])))
    pad_id = getattr(tokenizer, "pad_id", None) or 0
    device = model.tok_embeddings.weight.device
    generator = None
    if settings.seed is not None:
        generator = torch.Generator(device=device).manual_seed(settings.seed)
    system_cache = SystemPromptCache() if settings.reuse_system_cache else None
    if settings.max_cache_len is None:
        # One cache length for every batch: the caches are allocated once and a compiled decode
        # step keeps its shapes.
        lengths = [len(s) for s in sequences]
        settings = replace(settings, max_cache_len=default_cache_len(lengths, settings.max_new_tokens, model.max_seq_len))

    tokens: Dict[int, List[int]] = {}
    ttft, decode_s, decoded, cache_hits = [], 0.0, 0, 0
    for batch_ids in _batches(sequences, settings.batch_size, by_system_prompt=system_cache is not None):
        out = generate_batch(
            model,
            [sequences[i] for i in batch_ids],
            settings,
            pad_id=pad_id,
            system_cache=system_cache,
            generator=generator,
        )
        tokens.update(zip(batch_ids, out.tokens))
        ttft.append(out.time_to_first_token_s)
        decode_s += out.decode_seconds
        decoded += out.decoded_tokens
        cache_hits += len(batch_ids) if out.used_system_cache else 0
    clear_kv_caches(model)  # leave the model as we found it: plain forwards work again
    ordered = [tokens[i] for i in range(len(sequences))]
    texts = [tokenizer.decode(t) for t in ordered] if tokenizer is not None else None
    return GenerationResult(
        tokens=ordered,
        texts=texts,
        prompts=sequences,
        time_to_first_token_s=sum(ttft) / max(len(ttft), 1),
        decode_tokens_per_s=decoded / decode_s if decode_s > 0 else 0.0,
        system_cache_hits=cache_hits,
    )
