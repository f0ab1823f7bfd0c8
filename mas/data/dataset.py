"""Segment-aware fine-tuning datasets: rows -> messages -> ``tokens``/``labels``/``segment_ids``.

Rows are tokenized once, up front, so every malformed or over-long row is reported (or counted)
before the first step instead of crashing an epoch in. Each item is a dict of equal-length
lists::

    {"tokens": [...], "labels": [...], "segment_ids": [...]}                 # one example
    {..., "document_ids": [...], "input_pos": [...]}                        # a pack (packed=True)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional

from torch.utils.data import Dataset

from mas.data.formats import AlpacaRows, ChatRows, CommonsenseRows
from mas.data.collate import pad_token_id
from mas.data.packing import pack_sequences, packing_stats
from mas.data.rows import DataError, RowSource, load_rows, select_rows
from mas.errors import ConfigError
from mas.segments import PromptFormat, SegmentBuilder, SegmentedSequence, SegmentSettings, TooLongError

__all__ = [
    "DatasetStats",
    "SegmentedDataset",
    "alpaca_dataset",
    "chat_dataset",
    "commonsense_dataset",
]

log = logging.getLogger(__name__)

OnBadRow = Literal["error", "skip"]


@dataclass
class DatasetStats:
    """What happened to the rows of a dataset. Logged by the recipes."""

    source: str
    rows: int = 0
    examples: int = 0
    skipped_bad: int = 0
    dropped_too_long: int = 0
    truncated: int = 0
    packs: Optional[int] = None
    pack_length: Optional[int] = None
    pack_fill: Optional[float] = None
    first_problems: List[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{self.source}: {self.examples}/{self.rows} rows used"]
        if self.truncated:
            parts.append(f"{self.truncated} prompts truncated to fit max_seq_len")
        if self.dropped_too_long:
            parts.append(f"{self.dropped_too_long} rows dropped as too long")
        if self.skipped_bad:
            parts.append(f"{self.skipped_bad} malformed rows skipped")
        if self.packs is not None:
            parts.append(f"packed into {self.packs} sequences of {self.pack_length} tokens ({self.pack_fill:.0%} real tokens)")
        return ", ".join(parts)


class SegmentedDataset(Dataset):
    """Tokenized MAS examples (optionally packed).

    Args:
        rows (RowSource): the raw rows.
        to_messages: a row format (:class:`CommonsenseRows`, :class:`AlpacaRows`, :class:`ChatRows`).
        builder (SegmentBuilder): the shared prompt/segment builder.
        on_bad_row (str): ``"error"`` raises on the first malformed row (naming file, row and
            field); ``"skip"`` skips it and counts it, with a warning.
        packed (bool): pack whole examples into fixed-length sequences (never splitting one).
        max_seq_len (Optional[int]): the example cutoff (required when packed).
        pack_length (Optional[int]): tokens per pack; default ``max_seq_len``. At least
            ``max_seq_len``, so every example fits.

    Attributes:
        builder (SegmentBuilder): the builder that made the examples.
        segment_settings (SegmentSettings): its settings (recorded in checkpoints).
    """

    def __init__(
        self,
        rows: RowSource,
        to_messages: Any,
        builder: SegmentBuilder,
        *,
        on_bad_row: OnBadRow = "error",
        packed: bool = False,
        max_seq_len: Optional[int] = None,
        pack_length: Optional[int] = None,
    ) -> None:
        if on_bad_row not in ("error", "skip"):
            raise ConfigError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
        if packed and not max_seq_len:
            raise ConfigError("packed=True needs max_seq_len (set tokenizer.max_seq_len)")
        pack_length = pack_length or max_seq_len
        if packed and pack_length < max_seq_len:  # type: ignore[operator]
            raise ConfigError(
                f"dataset.pack_length={pack_length} is shorter than max_seq_len={max_seq_len}: an example "
                f"might not fit in a pack; set dataset.pack_length >= {max_seq_len} or lower tokenizer.max_seq_len"
            )
        self.builder = builder
        self.stats = DatasetStats(source=rows.name, rows=len(rows))
        self.examples: List[SegmentedSequence] = []
        for index, row in enumerate(rows):
            where = rows.where(index)
            try:
                sequence = builder(to_messages(row, where))
            except DataError as e:
                if on_bad_row == "error":
                    raise
                self._count_problem("skipped_bad", str(e))
                continue
            except TooLongError as e:
                self._count_problem("dropped_too_long", f"{where}: {e}")
                continue
            if not any(label >= 0 for label in sequence.labels):
                message = f"{where}: no answer token to learn from"
                if on_bad_row == "error":
                    raise DataError(message)
                self._count_problem("skipped_bad", message)
                continue
            self.stats.truncated += sequence.num_truncated > 0
            self.examples.append(sequence)
        self.stats.examples = len(self.examples)
        if not self.examples:
            raise DataError(f"{rows.name}: no usable rows ({self.stats.summary()})")
        self._items = [self._as_item(s) for s in self.examples]
        if packed:
            self._items = pack_sequences(self.examples, pack_length, pad_id=pad_token_id(builder.tokenizer))
            self.stats.packs, self.stats.pack_length = len(self._items), pack_length
            self.stats.pack_fill = packing_stats(self._items).fill
        if self.stats.skipped_bad or self.stats.dropped_too_long:
            log.warning("%s; first: %s", self.stats.summary(), self.stats.first_problems[0])

    @property
    def segment_settings(self) -> SegmentSettings:
        return self.builder.settings

    def _count_problem(self, counter: str, message: str) -> None:
        setattr(self.stats, counter, getattr(self.stats, counter) + 1)
        if len(self.stats.first_problems) < 5:
            self.stats.first_problems.append(message)

    @staticmethod
    def _as_item(sequence: SegmentedSequence) -> Dict[str, List[int]]:
        return {"tokens": sequence.tokens, "labels": sequence.labels, "segment_ids": sequence.segment_ids}

    @property
    def longest_item(self) -> int:
        """Tokens of the longest item (a pack's length when packed), before batch padding."""
        return max(len(item["tokens"]) for item in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> Dict[str, List[int]]:
        return self._items[index]


def _build(
    row_format: Any,
    tokenizer: Any,
    source: str,
    *,
    split: str,
    prompt_format: PromptFormat,
    merge_system_and_user: bool,
    max_seq_len: Optional[int],
    truncation: Literal["prompt", "drop"],
    on_bad_row: OnBadRow,
    packed: bool,
    pack_length: Optional[int],
    train_on_input: bool,
    rows: Optional[str],
    hub_args: Optional[Dict[str, Any]],
) -> SegmentedDataset:
    if train_on_input:
        log.warning(
            "train_on_input=True is ignored: a prompt token sees its successor inside a MAS "
            "segment, so prompt labels never count (leakage guard)"
        )
    max_seq_len = max_seq_len if max_seq_len is not None else getattr(tokenizer, "max_seq_len", None)
    builder = SegmentBuilder(
        tokenizer,
        prompt_format=prompt_format,
        merge_system_and_user=merge_system_and_user,
        max_seq_len=max_seq_len,
        truncation=truncation,
    )
    rows = select_rows(load_rows(source, split, **dict(hub_args or {})), rows)
    return SegmentedDataset(
        rows, row_format, builder, on_bad_row=on_bad_row, packed=packed, max_seq_len=max_seq_len, pack_length=pack_length
    )


def _dataset_builder(row_format: Any, doc: str):
    def builder(
        tokenizer: Any,
        source: str,
        *,
        split: str = "train",
        prompt_format: PromptFormat = "text",
        merge_system_and_user: bool = False,
        max_seq_len: Optional[int] = None,
        truncation: Literal["prompt", "drop"] = "prompt",
        on_bad_row: OnBadRow = "error",
        packed: bool = False,
        pack_length: Optional[int] = None,
        train_on_input: bool = False,
        rows: Optional[str] = None,
        hub_args: Optional[Dict[str, Any]] = None,
    ) -> SegmentedDataset:
        return _build(
            row_format,
            tokenizer,
            source,
            split=split,
            prompt_format=prompt_format,
            merge_system_and_user=merge_system_and_user,
            max_seq_len=max_seq_len,
            truncation=truncation,
            on_bad_row=on_bad_row,
            packed=packed,
            pack_length=pack_length,
            train_on_input=train_on_input,
            rows=rows,
            hub_args=hub_args,
        )

    builder.__doc__ = doc + _COMMON_ARGS
    return builder


_COMMON_ARGS = """

    Args:
        tokenizer: a torchtune model tokenizer.
        source (str): a local ``.json``/``.jsonl`` file, a folder with ``{split}.json``, or a hub id.
        split (str): hub split or file name in a folder. Default "train".
        prompt_format (str): ``"text"`` (plain template, the paper's setting) or ``"chat"``.
        merge_system_and_user (bool): one segment for system + user (Appendix C.2 ablation).
        max_seq_len (Optional[int]): cutoff; default the tokenizer's ``max_seq_len``.
        truncation (str): over-long rows: ``"prompt"`` shortens the user segment (the answer is
            kept whole), ``"drop"`` drops the row. Both are counted and logged.
        on_bad_row (str): ``"error"`` (default) or ``"skip"`` (counted warning).
        packed (bool): pack whole examples into fixed-length sequences with the document mask
            (MAS AND same document; positions restart per example).
        pack_length (Optional[int]): tokens per pack (default ``max_seq_len``; at least it).
        train_on_input (bool): accepted for torchtune compatibility; prompt labels never count.
        rows (Optional[str]): a ``"start:stop"`` slice of the rows (held-out splits of one file).
        hub_args (Optional[Dict[str, Any]]): more arguments of ``datasets.load_dataset`` for hub
            ids (e.g. ``{name: all}``). Every other argument is named, so a misspelt key is an
            error, not silently passed on.

    Returns:
        SegmentedDataset: items with ``tokens``, ``labels``, ``segment_ids``.
"""

commonsense_dataset = _dataset_builder(
    CommonsenseRows(),
    "LLM-Adapters commonsense rows (Commonsense170K format): preamble | instruction | answer.",
)
alpaca_dataset = _dataset_builder(AlpacaRows(), "Alpaca rows: preamble | instruction + input | output.")
chat_dataset = _dataset_builder(ChatRows(), "Chat rows: one segment per system/user message.")
for _f, _n in ((commonsense_dataset, "commonsense_dataset"), (alpaca_dataset, "alpaca_dataset"), (chat_dataset, "chat_dataset")):
    _f.__name__ = _f.__qualname__ = _n
