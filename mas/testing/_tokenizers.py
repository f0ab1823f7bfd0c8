"""Tiny offline tokenizers of each model family, trained on the bundled commonsense rows.

The paper's models use three tokenizer families: Llama 3 (tiktoken BPE), Qwen2/2.5 (GPT-2 style
byte-level BPE, ``vocab.json`` + ``merges.txt``) and Mistral (SentencePiece). Tests and the
embedded default cannot download the real ones, so this module trains small ones and writes them
in each family's on-disk format, which torchtune's own tokenizer classes then load unchanged.
Special tokens go right after the base vocabulary, so a model with a ~1K vocabulary suffices.

The Llama 3 one ships in ``mas/assets/tiny_tokenizer`` (``tools/make_tiny_tokenizer.py``); the
others are written on demand (:func:`mas.testing.write_tiny_checkpoint`, ``tests/conftest.py``).
"""

from __future__ import annotations

import base64
import collections
import json
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import regex
import sentencepiece as spm
from torchtune.models.qwen2._tokenizer import PRETOKENIZE_REGEX

from mas.assets import commonsense_train_rows

__all__ = [
    "LLAMA3_PATTERN",
    "LLAMA3_SPECIAL_TOKEN_NAMES",
    "QWEN2_5_SPECIAL_TOKEN_NAMES",
    "corpus_texts",
    "train_byte_bpe",
    "write_llama3_tiktoken",
    "write_mistral_sentencepiece",
    "write_qwen2_bpe",
]

# Llama 3's pre-tokenization pattern (torchtune's CL100K_PATTERN).
LLAMA3_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
LLAMA3_SPECIAL_TOKEN_NAMES = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
]
QWEN2_5_SPECIAL_TOKEN_NAMES = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
]
_TEMPLATE_TEXT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n\n### Response:\nthe correct answer is "
)


def corpus_texts() -> List[str]:
    """The tokenizer training text: the bundled commonsense rows plus the prompt template."""
    rows = commonsense_train_rows()
    texts = [_TEMPLATE_TEXT] * 50
    for row in rows:
        texts += [row["instruction"], row["input"], row["output"]]
    return texts


def train_byte_bpe(texts: Sequence[str], vocab_size: int, pattern: str = LLAMA3_PATTERN) -> List[Tuple[bytes, bytes]]:
    """Byte-level BPE training.

    Returns:
        List[Tuple[bytes, bytes]]: the merges in rank order; token ``256 + i`` is
        ``merges[i][0] + merges[i][1]``.
    """
    words = collections.Counter()
    for text in texts:
        for piece in regex.findall(pattern, text):
            words[piece.encode("utf-8")] += 1
    split = {w: tuple(bytes([b]) for b in w) for w in words}
    merges: List[Tuple[bytes, bytes]] = []
    while 256 + len(merges) < vocab_size:
        pairs = collections.Counter()
        for word, count in words.items():
            parts = split[word]
            for a, b in zip(parts, parts[1:]):
                pairs[(a, b)] += count
        if not pairs:
            break
        # Most frequent pair; ties broken by the bytes themselves, so training is deterministic.
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merges.append((a, b))
        merged = a + b
        for word, parts in split.items():
            if len(parts) < 2:
                continue
            out, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                    out.append(merged)
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            split[word] = tuple(out)
    return merges


def _special_tokens_json(names: Sequence[str], first_id: int, path: Path) -> Dict[str, int]:
    added = [{"id": first_id + i, "content": name, "special": True} for i, name in enumerate(names)]
    path.write_text(json.dumps({"added_tokens": added}, indent=1) + "\n")
    return {a["content"]: a["id"] for a in added}


def write_llama3_tiktoken(out_dir: Path, base_vocab: int = 992, special_slots: int = 32) -> Path:
    """``tokenizer.model`` (tiktoken) + ``special_tokens.json`` for torchtune's ``llama3_tokenizer``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    merges = train_byte_bpe(corpus_texts(), base_vocab)
    tokens = [bytes([i]) for i in range(256)] + [a + b for a, b in merges]
    lines = [f"{base64.b64encode(tok).decode()} {rank}" for rank, tok in enumerate(tokens)]
    (out_dir / "tokenizer.model").write_text("\n".join(lines) + "\n")
    names = LLAMA3_SPECIAL_TOKEN_NAMES + [
        f"<|reserved_special_token_{i}|>" for i in range(special_slots - len(LLAMA3_SPECIAL_TOKEN_NAMES))
    ]
    _special_tokens_json(names, len(tokens), out_dir / "special_tokens.json")
    return out_dir


def _gpt2_byte_to_unicode() -> Dict[int, str]:
    # GPT-2's reversible map from bytes to printable unicode characters (Qwen2's vocab.json keys).
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def write_qwen2_bpe(out_dir: Path, base_vocab: int = 1000) -> Path:
    """``vocab.json`` + ``merges.txt`` + ``tokenizer.json`` (special tokens) for Qwen2/2.5."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    merges = train_byte_bpe(corpus_texts(), base_vocab, pattern=PRETOKENIZE_REGEX)
    to_unicode = _gpt2_byte_to_unicode()

    def show(token: bytes) -> str:
        return "".join(to_unicode[b] for b in token)

    vocab = {to_unicode[b]: b for b in range(256)}
    for i, (a, b) in enumerate(merges):
        vocab[show(a + b)] = 256 + i
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out_dir / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(f"{show(a)} {show(b)}" for a, b in merges) + "\n", encoding="utf-8"
    )
    _special_tokens_json(QWEN2_5_SPECIAL_TOKEN_NAMES, len(vocab), out_dir / "tokenizer.json")
    return out_dir


def write_mistral_sentencepiece(out_dir: Path, vocab_size: int = 1000) -> Path:
    """``tokenizer.model`` (SentencePiece BPE, Mistral's ids: unk 0, bos 1, eos 2)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = out_dir / "corpus.txt"
    corpus.write_text("\n".join(t.replace("\n", " ") for t in corpus_texts()), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(out_dir / "tokenizer"),
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    corpus.unlink()
    (out_dir / "tokenizer.vocab").unlink(missing_ok=True)
    return out_dir
