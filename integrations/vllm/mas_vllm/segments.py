"""Prompt segments as vLLM multimodal items of the modality ``mas_segment``.

vLLM's multimodal prefix-LM path (``is_mm_prefix_lm``) lets a token attend to every earlier
token and to every token of the same per-request range: with each prompt segment as one range,
that is the MAS rule (Eq. 14). An item here is a segment that is already in the prompt: its
placeholder is its own tokens (nothing is inserted), its "embedding" is the tokens' own
embedding (:meth:`MasSegmentsMixin.embed_multimodal`), and its hash covers its start and its
token ids, so a prefix-cache block that a segment touches is reused only by a request with the
same segment (the keys of a segment's first block depend on the segment's later tokens).

Item format (what the renderer puts in ``multi_modal_data``, and what an offline ``LLM`` user
may pass with ``prompt_token_ids``)::

    {"mas_segment": [{"start": 0, "token_ids": [...]}, {"start": 12, "token_ids": [...]}]}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Dict, List, Sequence, Tuple

import torch
from vllm.inputs.engine import mm_input
from vllm.multimodal.inputs import (
    MultiModalBatchedField,
    MultiModalFieldElem,
    MultiModalKwargsItem,
    MultiModalKwargsItems,
    PlaceholderRange,
)
from vllm.multimodal.parse import MultiModalDataParser, ProcessorBatchItems
from vllm.multimodal.processing import BaseDummyInputsBuilder, BaseMultiModalProcessor, BaseProcessingInfo

__all__ = ["MODALITY", "SEGMENT_IDS_KEY", "MasSegmentDummyInputs", "MasSegmentInfo", "MasSegmentProcessor", "segment_items", "segment_ranges"]

#: The modality name of a prompt segment.
MODALITY = "mas_segment"
#: The keyword argument that carries a segment's token ids to ``embed_multimodal``.
SEGMENT_IDS_KEY = "mas_segment_token_ids"


def segment_ranges(segment_ids: Sequence[int]) -> List[Tuple[int, int]]:
    """``[start, end)`` of each prompt segment: each run of one segment id ``>= 0``.

    Args:
        segment_ids (Sequence[int]): ``[s]`` ids from ``SegmentBuilder`` (``CAUSAL`` < 0 for
            answer tokens).

    Returns:
        List[Tuple[int, int]]: the runs, in order.
    """
    ranges: List[Tuple[int, int]] = []
    start = 0
    for i in range(1, len(segment_ids) + 1):
        if i == len(segment_ids) or segment_ids[i] != segment_ids[start]:
            if segment_ids[start] >= 0:
                ranges.append((start, i))
            start = i
    return ranges


def segment_items(tokens: Sequence[int], segment_ids: Sequence[int]) -> List[Dict[str, Any]]:
    """The ``mas_segment`` items of a segmented prompt (see the module docstring)."""
    return [{"start": s, "token_ids": list(tokens[s:e])} for s, e in segment_ranges(segment_ids)]


class _SegmentItems(ProcessorBatchItems[Dict[str, Any]]):
    def __init__(self, data: Sequence[Dict[str, Any]]) -> None:
        super().__init__(list(data), MODALITY)


class _SegmentParser(MultiModalDataParser):
    def _parse_segments(self, data: Any) -> _SegmentItems:
        items = [data] if isinstance(data, Mapping) else list(data)
        for i, item in enumerate(items):
            if not (isinstance(item, Mapping) and isinstance(item.get("start"), int) and item.get("token_ids")):
                raise ValueError(f"{MODALITY}[{i}]: expected {{'start': int, 'token_ids': [int, ...]}}")
        return _SegmentItems(items)

    def _get_subparsers(self) -> Mapping[str, Any]:
        return {MODALITY: self._parse_segments}


class MasSegmentInfo(BaseProcessingInfo):
    """What vLLM asks about the ``mas_segment`` modality."""

    def get_data_parser(self) -> MultiModalDataParser:
        return _SegmentParser()

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {MODALITY: None}

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        # A segment may fill the context; it is prefilled in one step (the config hook keeps
        # the token budget at least the context).
        return {MODALITY: seq_len}


class MasSegmentDummyInputs(BaseDummyInputsBuilder[MasSegmentInfo]):
    """Profiling input: one segment as long as vLLM asks."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return ""

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options: Any = None) -> Dict[str, Any]:
        count = max(1, mm_counts.get(MODALITY, 1))
        length = max(1, seq_len // count)
        return {MODALITY: [{"start": i * length, "token_ids": [0] * length} for i in range(count)]}


class MasSegmentProcessor(BaseMultiModalProcessor[MasSegmentInfo]):
    """Segments in, placeholder ranges out; the prompt is never changed."""

    def get_dummy_inputs(self, seq_len: int, mm_counts: Mapping[str, int], mm_options: Any) -> Any:
        from vllm.multimodal.processing.inputs import ProcessorInputs

        data = self.dummy_inputs.get_dummy_mm_data(seq_len, mm_counts, mm_options)
        items = self.info.parse_mm_data(data, validate=False)
        length = sum(len(item["token_ids"]) for item in data[MODALITY])
        return ProcessorInputs(prompt=[0] * length, mm_data_items=items)

    def _get_mm_fields_config(self, hf_inputs: Any, hf_processor_mm_kwargs: Mapping[str, object]) -> Mapping[str, Any]:
        raise NotImplementedError("mas_segment items are built by apply(), without a Hugging Face processor")

    def _get_prompt_updates(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("mas_segment items are built by apply(), without prompt updates")

    def apply(self, inputs: Any, timing_ctx: Any = None) -> Any:
        """Check each segment against the prompt and present it as one placeholder range.

        Raises:
            ValueError: a segment outside the prompt, overlapping another, or whose token ids
                differ from the prompt's there.
        """
        prompt: List[int] = list(inputs.prompt)
        segments = inputs.mm_data_items[MODALITY].get_all() if MODALITY in inputs.mm_data_items else []
        end_of_previous = 0
        kwargs_items, ranges = [], []
        for i, segment in enumerate(segments):
            start, ids = segment["start"], list(segment["token_ids"])
            if start < end_of_previous or start + len(ids) > len(prompt) or prompt[start : start + len(ids)] != ids:
                raise ValueError(
                    f"{MODALITY}[{i}] (start {start}, {len(ids)} tokens) does not match the prompt: segments must be "
                    "in order, disjoint, and hold the prompt's own token ids"
                )
            end_of_previous = start + len(ids)
            elem = MultiModalFieldElem(data=torch.tensor(ids, dtype=torch.long), field=MultiModalBatchedField())
            kwargs_items.append(MultiModalKwargsItem({SEGMENT_IDS_KEY: elem}))
            ranges.append(PlaceholderRange(offset=start, length=len(ids)))
        hashes = inputs.get_mm_hashes(self.info.model_id, self.info.ctx.get_mm_config().mm_hasher_algorithm)
        return mm_input(
            prompt_token_ids=prompt,
            mm_kwargs=MultiModalKwargsItems({MODALITY: kwargs_items}),
            mm_hashes=hashes,
            mm_placeholders={MODALITY: ranges},
        )
