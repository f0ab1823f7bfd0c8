"""Test fixtures: tiny stand-ins of every model family, tiny tokenizers, synthetic inputs.

Nothing in the product imports this package (``tests/unit/test_layering.py`` enforces it); the
tests and ``tools/`` do. It may import the product (:mod:`mas.models` for the demo model's
dimensions and the HF writer), never the reverse.
"""

from mas.testing._families import TINY_FAMILIES, TinyCheckpoint, TinyFamily, write_tiny_checkpoint
from mas.testing._tokenizers import (
    LLAMA3_PATTERN,
    LLAMA3_SPECIAL_TOKEN_NAMES,
    QWEN2_5_SPECIAL_TOKEN_NAMES,
    corpus_texts,
    train_byte_bpe,
    write_llama3_tiktoken,
    write_mistral_sentencepiece,
    write_qwen2_bpe,
)

__all__ = [
    "LLAMA3_PATTERN",
    "LLAMA3_SPECIAL_TOKEN_NAMES",
    "QWEN2_5_SPECIAL_TOKEN_NAMES",
    "TINY_FAMILIES",
    "TinyCheckpoint",
    "TinyFamily",
    "corpus_texts",
    "train_byte_bpe",
    "write_llama3_tiktoken",
    "write_mistral_sentencepiece",
    "write_qwen2_bpe",
    "write_tiny_checkpoint",
]
