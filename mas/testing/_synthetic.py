"""Synthetic inputs for benchmarks and figures: segment layouts, batches, prompts, models.

A *layout* is a ``[b, s]`` tensor of segment ids: ``0`` the system prompt, ``1`` the user prompt,
:data:`~mas.masks.CAUSAL` the answer, :data:`~mas.masks.PAD` padding. The tools in ``tools/``
share these so that every benchmark and figure describes its input in one of a few named ways.
Also here: the paper's reference mask (Python loops over segments), re-implemented as the
baseline the benchmarks compare against.

Segment layout of one row (system 2, user 3, answer 2, padding 1)::

    0 0 1 1 1 C C P
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import Tensor, nn
from torchtune import training
from torchtune.models.llama3_2 import llama3_2_1b, lora_llama3_2_1b
from torchtune.modules.peft import get_adapter_params, set_trainable_params

from mas.masks import CAUSAL, PAD
from mas.models import lora_tiny_llama3_2, tiny_llama3_2
from mas.segments import IGNORE_INDEX, SegmentedSequence

__all__ = [
    "BENCHMARK_MODELS",
    "PAPER_LORA",
    "benchmark_model",
    "causal_layout",
    "loop_additive_mask",
    "random_prompt",
    "segment_row",
    "staggered_prompt_layout",
    "tokens_for_layout",
    "uniform_prompt_layout",
]

#: The paper's LoRA setting (q and v, r=32, alpha=64), with dropout off for reproducible timings.
PAPER_LORA: Dict[str, Any] = dict(lora_attn_modules=["q_proj", "v_proj"], lora_rank=32, lora_alpha=64, lora_dropout=0.0)

#: Model shapes the benchmarks build with random weights: the embedded tiny model (CPU) and
#: Llama-3.2-1B (GPU).
BENCHMARK_MODELS = ("tiny", "llama3_2_1b")


def segment_row(system: int, user: int, answer: int, pad: int = 0) -> List[int]:
    """One row's segment ids: ``system`` zeros, ``user`` ones, ``answer`` CAUSAL, ``pad`` PAD."""
    return [0] * system + [1] * user + [CAUSAL] * answer + [PAD] * pad


def uniform_prompt_layout(batch_size: int, seq_len: int, system: int, user: int) -> Tensor:
    """``[b, s]``: every row the same, filled to ``seq_len`` (the answer takes the rest)."""
    row = segment_row(system, user, seq_len - system - user)
    return torch.tensor([row] * batch_size)


def staggered_prompt_layout(batch_size: int, seq_len: int, padded: bool) -> Tensor:
    """``[b, s]``: rows of different lengths, as in a real batch (deterministic).

    Row ``i`` has a system prompt of ``s/8 + 3i`` tokens, a user prompt of ``s/2 - 5i``, an answer
    taking the rest and, if ``padded``, ``(s/16) * (i mod 4)`` padding tokens at the end.
    """
    rows = []
    for row in range(batch_size):
        pad = (seq_len // 16) * (row % 4) if padded else 0
        system = seq_len // 8 + 3 * row
        user = seq_len // 2 - 5 * row
        rows.append(segment_row(system, user, seq_len - pad - system - user, pad))
    return torch.tensor(rows)


def causal_layout(batch_size: int, seq_len: int) -> Tensor:
    """``[b, s]`` all ``CAUSAL``: MAS reduces to the causal mask."""
    return torch.full((batch_size, seq_len), CAUSAL)


def tokens_for_layout(segment_ids: Tensor, vocab_size: int, seed: int = 0) -> Dict[str, Tensor]:
    """A training batch over a layout: random tokens, labels on the answer (``CAUSAL``) tokens only.

    Args:
        segment_ids (Tensor): ``[b, s]`` layout.
        vocab_size (int): tokens are drawn from ``[0, vocab_size)``.
        seed (int): generator seed.

    Returns:
        Dict[str, Tensor]: ``tokens``, ``labels`` (``IGNORE_INDEX`` off the answer) and
        ``segment_ids``, each ``[b, s]``.
    """
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, tuple(segment_ids.shape), generator=generator)
    labels = torch.where(segment_ids == CAUSAL, tokens, torch.full_like(tokens, IGNORE_INDEX))
    return {"tokens": tokens, "labels": labels, "segment_ids": segment_ids}


def random_prompt(length: int, vocab_size: int, system: int, seed: int = 0) -> SegmentedSequence:
    """A prompt of random tokens: a system segment of ``system`` tokens, then a user segment."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (length,), generator=generator).tolist()
    return SegmentedSequence(tokens, [IGNORE_INDEX] * length, segment_row(system, length - system, 0))


def loop_additive_mask(segment_ids: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The dense additive MAS mask, built the way the paper's reference code does it.

    Start from the causal additive mask, then loop over rows and over each row's prompt
    segments in Python, zeroing the segment's square so its tokens see each other; padding keys
    get ``-inf``. Rebuilt every forward: the baseline that ``mas.block_mask`` replaces.

    Args:
        segment_ids (Tensor): ``[b, s]``.
        dtype (torch.dtype): mask dtype (the attention dtype; below fp32 the most negative
            finite value stands for ``-inf``).

    Returns:
        Tensor: ``[b, 1, s, s]``, 0 where allowed and ``-inf`` where masked.
    """
    batch_size, seq_len = segment_ids.shape
    neg_inf = torch.finfo(dtype).min if dtype != torch.float32 else float("-inf")
    mask = torch.full((batch_size, 1, seq_len, seq_len), neg_inf, dtype=dtype, device=segment_ids.device)
    mask.triu_(1)  # 0 on and below the diagonal: causal
    ids = segment_ids.tolist()
    for row in range(batch_size):
        start = 0
        while start < seq_len:
            end = start
            while end < seq_len and ids[row][end] == ids[row][start]:
                end += 1
            if ids[row][start] >= 0:
                mask[row, 0, start:end, start:end] = 0.0
            elif ids[row][start] == PAD:
                mask[row, 0, :, start:end] = neg_inf
            start = end
    return mask


def benchmark_model(
    name: str, device: torch.device, dtype: torch.dtype, lora: Optional[Mapping[str, Any]] = None
) -> nn.Module:
    """A model of a :data:`BENCHMARK_MODELS` shape with random weights, built on ``device``.

    Args:
        name (str): ``tiny`` or ``llama3_2_1b``.
        device (torch.device), dtype (torch.dtype): where and in what precision.
        lora (Optional[Mapping[str, Any]]): LoRA builder arguments (e.g. :data:`PAPER_LORA`); then
            only the adapters are trainable. None: the plain model in eval mode.

    Raises:
        ValueError: an unknown ``name``.
    """
    if name not in BENCHMARK_MODELS:
        raise ValueError(f"unknown benchmark model {name!r}; choose from {', '.join(BENCHMARK_MODELS)}")
    with training.set_default_dtype(dtype), device:
        if lora is None:
            model = tiny_llama3_2() if name == "tiny" else llama3_2_1b()
            return model.eval()
        model = lora_tiny_llama3_2(**lora) if name == "tiny" else lora_llama3_2_1b(**lora)
    set_trainable_params(model, get_adapter_params(model))
    return model
