"""Test fixtures: tiny stand-ins of every model family, tiny tokenizers, synthetic inputs.

Nothing in the product imports this package (``tests/unit/test_layering.py`` enforces it); the
tests and ``tools/`` do. It may import the product (:mod:`mas.models` for the demo model's
dimensions and the HF writer), never the reverse.

Two submodules are imported by name, not re-exported here, so that the tests do not load
matplotlib: :mod:`mas.testing.benchlib` (timing, tables, BENCHMARKS.md sections) and
:mod:`mas.testing.drawing` (mask panels of the figures).
"""

from mas.testing._families import TINY_FAMILIES, TinyCheckpoint, TinyFamily, write_tiny_checkpoint
from mas.testing._synthetic import (
    BENCHMARK_MODELS,
    PAPER_LORA,
    benchmark_model,
    causal_layout,
    loop_additive_mask,
    random_prompt,
    segment_row,
    staggered_prompt_layout,
    tokens_for_layout,
    uniform_prompt_layout,
)
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
    "BENCHMARK_MODELS",
    "LLAMA3_PATTERN",
    "LLAMA3_SPECIAL_TOKEN_NAMES",
    "PAPER_LORA",
    "QWEN2_5_SPECIAL_TOKEN_NAMES",
    "TINY_FAMILIES",
    "TinyCheckpoint",
    "TinyFamily",
    "benchmark_model",
    "causal_layout",
    "corpus_texts",
    "loop_additive_mask",
    "random_prompt",
    "segment_row",
    "staggered_prompt_layout",
    "tokens_for_layout",
    "train_byte_bpe",
    "uniform_prompt_layout",
    "write_llama3_tiktoken",
    "write_mistral_sentencepiece",
    "write_qwen2_bpe",
    "write_tiny_checkpoint",
]
