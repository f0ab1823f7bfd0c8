"""Train the tiny byte-level BPE tokenizer that ships in ``mas/assets/tiny_tokenizer``.

The embedded default (``tiny_*`` configs, tests) needs a real tokenizer without downloads. This
script trains a small byte-level BPE (Llama 3's pre-tokenization pattern) on the bundled
commonsense rows and writes it in tiktoken's format, plus a Hugging Face style
``special_tokens.json`` that places Llama 3's special tokens right after the base vocabulary, so
torchtune's ``llama3_tokenizer(path, special_tokens_path=...)`` loads it unchanged. The output is
deterministic; re-running it reproduces the committed files.

Usage:
    python tools/make_tiny_tokenizer.py [--base-vocab 992] [--out mas/assets/tiny_tokenizer]
"""

from __future__ import annotations

import argparse
import base64
import collections
import json
from pathlib import Path

import regex

# Llama 3's pre-tokenization pattern (the one torchtune's Llama3Tokenizer applies).
PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
SPECIAL_TOKENS = [
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
NUM_SPECIAL_SLOTS = 32
REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "mas" / "assets" / "commonsense" / "train_sample" / "commonsense_train_600.json"
TEMPLATE_TEXT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n\n### Response:\nthe correct answer is "
)


def corpus_texts() -> list[str]:
    rows = json.loads(CORPUS.read_text())
    texts = [TEMPLATE_TEXT] * 50
    for row in rows:
        texts += [row["instruction"], row["input"], row["output"]]
    return texts


def train_bpe(texts: list[str], base_vocab: int) -> list[bytes]:
    """Byte-level BPE: returns the token byte strings in rank order (256 bytes, then merges)."""
    words = collections.Counter()
    for text in texts:
        for piece in regex.findall(PATTERN, text):
            words[piece.encode("utf-8")] += 1
    # Each word as a tuple of current token byte strings.
    split = {w: tuple(bytes([b]) for b in w) for w in words}
    vocab = [bytes([i]) for i in range(256)]
    while len(vocab) < base_vocab:
        pairs = collections.Counter()
        for word, count in words.items():
            parts = split[word]
            for a, b in zip(parts, parts[1:]):
                pairs[(a, b)] += count
        if not pairs:
            break
        # Most frequent pair; ties broken by the bytes themselves for determinism.
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merged = a + b
        vocab.append(merged)
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
    return vocab


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-vocab", type=int, default=1024 - NUM_SPECIAL_SLOTS)
    parser.add_argument("--out", type=Path, default=REPO / "mas" / "assets" / "tiny_tokenizer")
    args = parser.parse_args()
    vocab = train_bpe(corpus_texts(), args.base_vocab)
    args.out.mkdir(parents=True, exist_ok=True)
    lines = [f"{base64.b64encode(tok).decode()} {rank}" for rank, tok in enumerate(vocab)]
    (args.out / "tokenizer.model").write_text("\n".join(lines) + "\n")
    names = SPECIAL_TOKENS + [
        f"<|reserved_special_token_{i}|>" for i in range(NUM_SPECIAL_SLOTS - len(SPECIAL_TOKENS))
    ]
    added = [{"id": len(vocab) + i, "content": name, "special": True} for i, name in enumerate(names)]
    (args.out / "special_tokens.json").write_text(json.dumps({"added_tokens": added}, indent=1) + "\n")
    print(f"wrote {len(vocab)} BPE tokens + {len(added)} special tokens to {args.out}")


if __name__ == "__main__":
    main()
