"""Torch-native generation: one MAS prefill over the KV cache, then causal decoding.

``prefill`` runs the whole prompt in one pass under the MAS mask (each prompt segment
bidirectional) and fills the cache; ``decode_one_token`` then appends one causal token per
step. ``generate`` batches prompts, optionally reuses a cached system prompt (MAS keeps the
system segment independent of the user turn, so its keys and values are the same for every
prompt that shares it), samples, stops, and reports time-to-first-token and tokens/s.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Literal, Optional, Sequence, Tuple, get_args

import torch
from torch import Tensor, nn
from torchtune.modules import MultiHeadAttention

from mas.attention import (
    AttentionBackend,
    MASAttention,
    build_attention_mask,
    prefill_tile,
    use_mas_attention,
    validate_attention_backend,
)
from mas.block_mask import round_up_to_tile
from mas.generation.decode_loop import compiled_decode_step, decode_step, decode_tokens, forward_one_token
from mas.generation.gqa_attention import native_gqa_attention
from mas.generation.kv_cache import read_prefix, setup_kv_caches, write_prefix
from mas.generation.layout import PromptBatch, layout_prompts
from mas.lm_head import has_unembed, logits_at_positions
from mas.masks import PAD, AttentionMode, validate_attention_mode
from mas.segments import SegmentedSequence

__all__ = [
    "BatchOutput",
    "CompileMode",
    "DecodeState",
    "GenerationSettings",
    "SystemPromptCache",
    "decode_one_token",
    "default_cache_len",
    "forward_one_token",
    "generate_batch",
    "prefill",
    "system_prefix",
]


#: ``torch.compile`` modes for the decode step.
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


@dataclass
class GenerationSettings:
    """How to generate.

    Attributes:
        attention (str): prefill mask, ``"mas"`` or ``"causal"`` (independent of training).
        max_new_tokens (int): tokens to generate at most per prompt.
        temperature (float): 0 for greedy decoding.
        top_k (Optional[int]), top_p (Optional[float]): sampling filters.
        stop_tokens (Optional[Sequence[int]]): ids that end a row (kept out of the output).
        seed (Optional[int]): sampling seed.
        batch_size (int): prompts per batch.
        reuse_system_cache (bool): prefill a shared system prompt once and reuse its KV cache.
        compile_decode (bool): ``torch.compile`` the decode step (forward, token choice and
            stops; static shapes, one graph per attention-width bucket).
        compile_mode (str): ``torch.compile`` mode for the decode step, one of
            :data:`COMPILE_MODES` (``"reduce-overhead"`` adds CUDA graphs on GPU).
        stop_check_every (int): read "has every row stopped?" from the device every this many
            tokens (the decode loop's only host read).
        max_cache_len (Optional[int]): cache slots; default :func:`default_cache_len` (prompt +
            ``max_new_tokens`` rounded up, at most the model's ``max_seq_len``).
        attention_backend (str): ``auto``/``flex``/``sdpa`` for the prefill.
        native_gqa (bool): grouped-query attention without expanded K/V copies
            (:mod:`mas.generation.gqa_attention`); False runs torchtune's expanding forward (the
            twin the tests compare against).
    """

    attention: AttentionMode = "mas"
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    stop_tokens: Optional[Sequence[int]] = None
    seed: Optional[int] = None
    batch_size: int = 8
    reuse_system_cache: bool = False
    compile_decode: bool = False
    compile_mode: CompileMode = "default"
    stop_check_every: int = 8
    max_cache_len: Optional[int] = None
    attention_backend: AttentionBackend = "auto"
    native_gqa: bool = True

    def __post_init__(self) -> None:
        validate_attention_mode(self.attention)
        validate_attention_backend(self.attention_backend)
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.compile_mode not in get_args(CompileMode):
            raise ValueError(f"compile_mode must be one of {', '.join(get_args(CompileMode))}, got {self.compile_mode!r}")
        if self.stop_check_every < 1:
            raise ValueError(f"stop_check_every must be >= 1, got {self.stop_check_every}")
        if self.max_cache_len is not None and self.max_cache_len < 1:
            raise ValueError(f"max_cache_len must be >= 1 or None, got {self.max_cache_len}")

    def uses_cuda_graphs(self) -> bool:
        """Whether the compiled decode step replays CUDA graphs (whose outputs must be copied)."""
        return self.compile_decode and self.compile_mode in ("reduce-overhead", "max-autotune")


#: Cache lengths are rounded up to a multiple of this (fewer distinct shapes to compile).
CACHE_LEN_MULTIPLE = 256


def default_cache_len(prompt_lengths: Sequence[int], max_new_tokens: int, model_max_seq_len: int) -> int:
    """KV-cache slots when ``max_cache_len`` is unset: the longest prompt + ``max_new_tokens``,
    rounded up to a multiple of :data:`CACHE_LEN_MULTIPLE`, at most ``model_max_seq_len``.

    (The model's ``max_seq_len`` alone is 131,072 slots for Llama 3.2: gigabytes per row.)
    """
    needed = max(prompt_lengths, default=0) + max_new_tokens
    return min(-(-needed // CACHE_LEN_MULTIPLE) * CACHE_LEN_MULTIPLE, model_max_seq_len)


def prompt_slots(sequences: Sequence[SegmentedSequence], prefix_len: int, *, room: int, tile: int) -> int:
    """Prompt slots of a batch: the longest prompt, its query part (after the prefix) rounded up
    to a multiple of ``tile`` (:func:`~mas.attention.prefill_tile`; 0: no rounding), at most
    ``room`` slots.

    A compiled flex kernel compiles once per shape (:data:`~mas.attention.FLEX_SHAPE_BUDGET`),
    so prompts of any length share a few query lengths; the extra slots are left padding,
    never attended, and change no logit.
    """
    longest = max(len(seq) for seq in sequences)
    if not tile:
        return longest
    return round_up_to_tile(longest, start=prefix_len, tile=tile, limit=room)


def _model_dtype(model: nn.Module) -> torch.dtype:
    return model.tok_embeddings.weight.dtype if hasattr(model, "tok_embeddings") else next(model.parameters()).dtype


def _ensure_mas_attention(model: nn.Module, backend: AttentionBackend) -> None:
    for module in model.modules():
        if isinstance(module, MultiHeadAttention):
            if not isinstance(module._attention_call, MASAttention):
                use_mas_attention(model, backend)  # type: ignore[arg-type]
            return


def prefill(
    model: nn.Module,
    batch: PromptBatch,
    *,
    attention: AttentionMode = "mas",
    backend: AttentionBackend = "auto",
    logits_at: Optional[Tensor] = None,
) -> Tensor:
    """Run the prompt slots after the cached prefix in one pass and fill the KV cache.

    The caches must be set up and hold exactly ``batch.prefix_len`` slots already.

    Args:
        model (nn.Module): a torchtune decoder with MAS attention and caches set up.
        batch (PromptBatch): the prompts (on the model's device).
        attention (str): ``"mas"`` or ``"causal"``.
        backend (str): attention backend for the prefill mask.
        logits_at (Optional[Tensor]): ``[b]`` long, on the model's device: per row, the prefilled
            slot (0 is slot ``prefix_len``) whose next-token logits are wanted, e.g. its last
            prompt token. The LM head then runs on those ``b`` positions only
            (:func:`mas.lm_head.logits_at_positions`), not on every slot. None: every slot.

    Returns:
        Tensor: with ``logits_at``, ``[b, vocab]`` fp32 logits; else ``[b, P - prefix_len, vocab]``
        logits of the prefilled slots.
    """
    start = batch.prefix_len
    # Prompt widths change every batch: compiling the block tables per shape would not pay.
    mask = build_attention_mask(
        batch.segment_ids,
        attention=attention,
        backend=backend,
        query_start=start,
        query_len=batch.num_slots - start,
        compile_block_tables=False,
    )
    tokens, positions = batch.tokens[:, start:], batch.positions[:, start:]
    if logits_at is None:
        return _as_logits(model(tokens, mask=mask, input_pos=positions))
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    if not has_unembed(model):  # every slot, then the chosen ones (the slow twin)
        return _as_logits(model(tokens, mask=mask, input_pos=positions))[rows, logits_at].float()
    return logits_at_positions(model, tokens, rows, logits_at, mask=mask, input_pos=positions)


def _as_logits(output: Any) -> Tensor:
    """Model output as one ``[b, s, vocab]`` tensor (a model set up for the chunked training loss
    returns a list of sequence chunks)."""
    return torch.cat(output, dim=1) if isinstance(output, list) else output


@dataclass
class DecodeState:
    """What decoding needs between steps.

    Attributes:
        valid_slots (Tensor): ``[b, L]`` bool, True where the cache holds a token.
        next_slot (int): the slot the next token is written to.
        next_position (Tensor): ``[b]`` RoPE position of the next token.
        full_width_mask (bool): attend over all ``L`` slots (static shapes for compile) rather
            than the ``next_slot + 1`` written ones.
    """

    valid_slots: Tensor
    next_slot: int
    next_position: Tensor
    full_width_mask: bool = False

    @classmethod
    def after_prefill(cls, batch: PromptBatch, cache_len: int, full_width_mask: bool = False) -> "DecodeState":
        valid = torch.zeros((batch.tokens.shape[0], cache_len), dtype=torch.bool, device=batch.tokens.device)
        valid[:, : batch.num_slots] = batch.segment_ids != PAD
        return cls(valid, batch.num_slots, batch.lengths.clone(), full_width_mask)


def decode_one_token(
    model: nn.Module,
    tokens: Tensor,
    state: DecodeState,
    forward: Callable[[nn.Module, Tensor, Tensor, Tensor], Tensor] = forward_one_token,
) -> Tensor:
    """Append one causal token per row and return the next-token logits.

    The slot bookkeeping stays in Python here; ``forward`` sees only tensors of fixed shapes
    (with ``full_width_mask``), so a compiled ``forward`` never recompiles between steps.

    Args:
        model (nn.Module): the model with filled caches.
        tokens (Tensor): ``[b]`` the tokens to append (written to ``state.next_slot``).
        state (DecodeState): updated in place.
        forward: :func:`forward_one_token` or a compiled version of it.

    Returns:
        Tensor: ``[b, vocab]`` logits for the token after ``tokens``.
    """
    slot = state.next_slot
    state.valid_slots[:, slot] = True
    width = state.valid_slots.shape[1] if state.full_width_mask else slot + 1
    # [b, L] -> [b, 1, width]: a generated token is causal, so in either attention mode it sees
    # every written slot, itself included (the row of build_attention_mask for query ``slot``,
    # read off the slot bookkeeping without a mask build per token: tests/unit/generation/test_generation).
    mask = state.valid_slots[:, None, :width]
    logits = forward(model, tokens[:, None], mask, state.next_position[:, None])
    state.next_slot += 1
    state.next_position += 1
    return logits


class SystemPromptCache:
    """KV caches of system prompts, computed once and reused by every prompt that shares one.

    Exact under MAS only when the system prompt is its own segment (its tokens attend to
    nothing after them); with ``merge_system_and_user`` the system tokens see the user turn and
    the cache would be wrong, so the builder refuses that combination.

    Each system prompt's own prefill is right-padded to a multiple of ``prefill_tile`` slots (the
    padding slots are ``PAD``, never attended, and not kept), so a compiled FlexAttention kernel
    sees a few shapes rather than one per system-prompt length.

    Args:
        prefill_tile (Optional[int]): the multiple; None: the flex tile where FlexAttention runs
            the prefill, else no padding; 0: none.
    """

    def __init__(self, prefill_tile: Optional[int] = None) -> None:
        self._entries: Dict[Tuple[int, ...], List[Tuple[Tensor, Tensor]]] = {}
        self.prefill_tile = prefill_tile
        self.hits = 0
        self.misses = 0

    def get(
        self, model: nn.Module, prefix: SegmentedSequence, *, attention: AttentionMode, backend: AttentionBackend, cache_len: int
    ) -> List[Tuple[Tensor, Tensor]]:
        key = tuple(prefix.tokens)
        if key in self._entries:
            self.hits += 1
            return self._entries[key]
        self.misses += 1
        device = model.tok_embeddings.weight.device
        tile = prefill_tile(backend, device) if self.prefill_tile is None else self.prefill_tile
        batch = layout_prompts([prefix], pad_id=0)
        if tile:
            batch = batch.padded_right(round_up_to_tile(len(prefix), tile=tile, limit=cache_len), pad_id=0)
        setup_kv_caches(model, 1, cache_len, _model_dtype(model))
        # Only the keys and values are kept: the head runs on one slot, not on every one.
        prefill(model, batch.to(device), attention=attention, backend=backend, logits_at=torch.zeros(1, dtype=torch.long, device=device))
        self._entries[key] = read_prefix(model, len(prefix))
        return self._entries[key]


def system_prefix(sequence: SegmentedSequence) -> Optional[SegmentedSequence]:
    """The leading system prompt of a prompt, when its keys and values can be cached alone.

    Read from the spans the builder recorded: the first span, if it is a ``system`` message
    with a segment of its own (not merged with the user turn) and something follows it. Under
    MAS its tokens attend to nothing after them, so its cache serves every prompt that starts
    with it. A sequence built by hand (roles not recorded) has no system prefix.

    Returns:
        Optional[SegmentedSequence]: the prefix (BOS included), or None.
    """
    spans = sequence.spans
    if len(spans) < 2 or spans[0].role != "system" or spans[1].segment_id == spans[0].segment_id:
        return None
    return sequence.head(spans[0].end)


@dataclass
class BatchOutput:
    """Generated ids per row (stop token excluded) and timings."""

    tokens: List[List[int]]
    time_to_first_token_s: float
    decode_seconds: float
    decoded_tokens: int
    stopped: List[bool] = field(default_factory=list)
    used_system_cache: bool = False


@torch.inference_mode()
def generate_batch(
    model: nn.Module,
    sequences: Sequence[SegmentedSequence],
    settings: GenerationSettings,
    *,
    pad_id: int = 0,
    system_cache: Optional[SystemPromptCache] = None,
    step: Optional[Callable[..., Any]] = None,
    generator: Optional[torch.Generator] = None,
) -> BatchOutput:
    """Generate for one batch of segmented prompts.

    Args:
        model (nn.Module): a torchtune decoder (MAS attention is installed if missing).
        sequences (Sequence[SegmentedSequence]): prompts from ``SegmentBuilder(..., for_generation=True)``.
        settings (GenerationSettings): sampling and stopping.
        pad_id (int): id written for padding slots.
        system_cache (Optional[SystemPromptCache]): reuse shared system prompts from here.
        step: the decode step; default :func:`~mas.generation.decode_loop.decode_step`, compiled
            with ``settings.compile_mode`` when ``settings.compile_decode``.
        generator (Optional[torch.Generator]): sampling RNG.

    Returns:
        BatchOutput: the generated ids.

    Raises:
        ValueError: an empty prompt, or a prompt that leaves no room for ``max_new_tokens``.
    """
    model.eval()
    _ensure_mas_attention(model, settings.attention_backend)
    with native_gqa_attention(model) if settings.native_gqa else contextlib.nullcontext():
        return _generate_batch(model, sequences, settings, pad_id=pad_id, system_cache=system_cache, step=step, generator=generator)


def _generate_batch(
    model: nn.Module,
    sequences: Sequence[SegmentedSequence],
    settings: GenerationSettings,
    *,
    pad_id: int,
    system_cache: Optional[SystemPromptCache],
    step: Optional[Callable[..., Any]],
    generator: Optional[torch.Generator],
) -> BatchOutput:
    device = model.tok_embeddings.weight.device
    cache_len = settings.max_cache_len or default_cache_len([len(s) for s in sequences], settings.max_new_tokens, model.max_seq_len)
    if step is None:
        step = compiled_decode_step(settings.compile_mode) if settings.compile_decode else decode_step
    start_time = time.perf_counter()

    prefix = None
    if system_cache is not None:
        prefixes = [system_prefix(s) for s in sequences]
        if prefixes[0] is not None and all(p is not None and p.tokens == prefixes[0].tokens for p in prefixes):
            prefix = prefixes[0]
    prefix_len = len(prefix) if prefix else 0
    tile = prefill_tile(settings.attention_backend, device)
    slots = prompt_slots(sequences, prefix_len, room=cache_len - settings.max_new_tokens, tile=tile)
    batch = layout_prompts(sequences, pad_id, prefix_len=prefix_len, num_slots=slots)
    needed = batch.num_slots + settings.max_new_tokens
    if needed > cache_len:
        longest = max(range(len(sequences)), key=lambda i: len(sequences[i]))
        raise ValueError(
            f"prompt {longest} needs {batch.num_slots} cache slots + max_new_tokens "
            f"{settings.max_new_tokens} = {needed} > the {cache_len}-slot KV cache (model max_seq_len "
            f"{model.max_seq_len}); shorten the prompt or lower max_new_tokens"
        )
    batch = batch.to(device)
    if prefix is not None:
        cached = system_cache.get(model, prefix, attention=settings.attention, backend=settings.attention_backend, cache_len=cache_len)
        setup_kv_caches(model, len(sequences), cache_len, _model_dtype(model))
        write_prefix(model, cached)
    else:
        setup_kv_caches(model, len(sequences), cache_len, _model_dtype(model))
    # Every row ends at the last slot (left padding): the head on that slot only.
    last_slot = torch.full((batch.tokens.shape[0],), batch.num_slots - batch.prefix_len - 1, dtype=torch.long, device=device)
    logits = prefill(model, batch, attention=settings.attention, backend=settings.attention_backend, logits_at=last_slot)

    first_token_time = 0.0

    def first_token_chosen() -> None:
        nonlocal first_token_time
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        first_token_time = time.perf_counter()

    out = decode_tokens(
        model,
        logits,
        batch,
        cache_len=cache_len,
        max_new_tokens=settings.max_new_tokens,
        stop_tokens=settings.stop_tokens or (),
        temperature=settings.temperature,
        top_k=settings.top_k,
        top_p=settings.top_p,
        stop_check_every=settings.stop_check_every,
        step=step,
        keep_outputs=settings.uses_cuda_graphs(),
        generator=generator,
        on_first_token=first_token_chosen,
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    end_time = time.perf_counter()
    return BatchOutput(
        tokens=out.rows(),
        time_to_first_token_s=first_token_time - start_time,
        decode_seconds=end_time - first_token_time,
        decoded_tokens=out.steps * len(sequences),
        stopped=out.done.tolist(),
        used_system_cache=prefix is not None,
    )
