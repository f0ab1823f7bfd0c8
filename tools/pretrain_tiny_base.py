"""Pre-train a small causal base model on your own rows and write it as a Hugging Face checkpoint.

Usage::

    python tools/pretrain_tiny_base.py my_rows.jsonl /tmp/own/base --steps 300 --seed 0
    python tools/pretrain_tiny_base.py notes.txt /tmp/own/base --embed-dim 128 --num-layers 4
    python tools/pretrain_tiny_base.py my_rows.jsonl /tmp/own/format_base --random-answers yes no

Rows: ``.json``/``.jsonl`` (``text``, commonsense/Alpaca ``instruction``/``input``/``output``,
or chat ``messages``) or a ``.txt`` file; see :mod:`mas.models.pretrain_base`. It prints the
overrides that make ``mas_lora_finetune``, ``mas_eval`` and ``mas_generate`` load the base
(``docs/own_task.md``: the whole path from your JSONL to a MAS-vs-causal table).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Optional, Sequence

from mas.errors import UserError
from mas.models.pretrain_base import BASE_RECIPE_FILE, CHECKPOINTER_OVERRIDES, write_tiny_base

_DIMS = ("embed_dim", "num_layers", "num_heads", "num_kv_heads", "intermediate_dim")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rows", help="a .json/.jsonl file of rows or a .txt file")
    parser.add_argument("out", help="the checkpoint folder to write")
    parser.add_argument("--steps", type=int, default=300, help="pre-training steps (default 300)")
    parser.add_argument("--seed", type=int, default=0, help="init and data-order seed (default 0)")
    parser.add_argument("--include-answers", action="store_true", help="also learn the answers of prompt/answer rows")
    parser.add_argument(
        "--random-answers", nargs="+", metavar="LABEL",
        help="a format-only base: learn whole rows with each row's answer replaced by one of these labels, drawn at random",
    )  # fmt: skip
    parser.add_argument("--max-len", type=int, default=256, help="tokens kept per row (default 256)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    for dim in _DIMS:
        parser.add_argument(f"--{dim.replace('_', '-')}", type=int, help=f"model {dim} (default: the embedded tiny model's)")
    args = parser.parse_args(argv)
    dims = {d: getattr(args, d) for d in _DIMS if getattr(args, d) is not None}
    start = time.perf_counter()
    print(f"pre-training a base on {args.rows} for {args.steps} steps (the default 300 take about 2 minutes on 2 CPU cores) ...", flush=True)
    try:
        folder = write_tiny_base(
            args.rows, args.out, steps=args.steps, seed=args.seed, include_answers=args.include_answers,
            random_answers=args.random_answers, max_len=args.max_len, batch_size=args.batch_size, lr=args.lr, dims=dims,
        )  # fmt: skip
    except (UserError, OSError) as e:  # anything else is a bug: its traceback stays
        print(f"pretrain_tiny_base: {e}", file=sys.stderr)
        return 2
    recipe = json.loads((folder / BASE_RECIPE_FILE).read_text())
    loss = recipe["loss"] or {"first": float("nan"), "last": float("nan")}
    print(f"wrote {folder} ({recipe['rows']} rows, {args.steps} steps, loss {loss['first']:.2f} -> {loss['last']:.2f}, {time.perf_counter() - start:.0f} s)")
    overrides = [o.format(dir=folder) for o in CHECKPOINTER_OVERRIDES] + [f"model.{k}={v}" for k, v in dims.items()]
    print("load it in any recipe with:\n  " + " ".join(f"'{o}'" if o.startswith("~") or "[" in o else o for o in overrides))
    return 0


if __name__ == "__main__":
    sys.exit(main())
