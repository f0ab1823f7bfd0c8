"""Segment-aware data: row formats, datasets, packing and collation."""

from mas.data.collate import collate_segmented, pad_token_id
from mas.data.dataset import (
    DatasetStats,
    SegmentedDataset,
    alpaca_dataset,
    chat_dataset,
    commonsense_dataset,
)
from mas.data.formats import AlpacaRows, ChatRows, CommonsenseRows, instruction_messages
from mas.data.packing import pack_sequences
from mas.data.rows import DataError, RowSource, load_rows

__all__ = [
    "AlpacaRows",
    "ChatRows",
    "CommonsenseRows",
    "DataError",
    "DatasetStats",
    "RowSource",
    "SegmentedDataset",
    "alpaca_dataset",
    "chat_dataset",
    "collate_segmented",
    "commonsense_dataset",
    "instruction_messages",
    "load_rows",
    "pack_sequences",
    "pad_token_id",
]
