"""Regenerate the tiny Llama 3 tokenizer that ships in ``mas/assets/tiny_tokenizer``.

A byte-level BPE (992 tokens, Llama 3 pre-tokenization) trained on the bundled commonsense rows,
in tiktoken's format, with Llama 3's special tokens at ids 992-1023 (``special_tokens.json``).
Training is deterministic: re-running reproduces the committed files.

Usage:
    python tools/make_tiny_tokenizer.py [--out mas/assets/tiny_tokenizer]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mas.testing import write_llama3_tiktoken

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "mas" / "assets" / "tiny_tokenizer")
    args = parser.parse_args()
    out = write_llama3_tiktoken(args.out)
    print(f"wrote {out / 'tokenizer.model'} and {out / 'special_tokens.json'}")


if __name__ == "__main__":
    main()
