"""Benchmark MAS mask construction and MAS attention; print a Markdown table, update BENCHMARKS.md.

Two measurements, each the median of repeated timings after warm-up:

(a) Mask build per batch (8 x 256 and 8 x 1024 tokens, a system prompt, a user prompt, an
    answer and right padding per row):

    - ``create_mas_block_mask`` (ours): ``O(s)`` from per-block segment summaries, no
      ``[s, s]`` tensor;
    - ``create_block_mask`` eager and compiled (``torch.compile(create_block_mask,
      dynamic=False)``, what the deprecated ``_compile=True`` now stands for, but with static
      shapes): evaluates the mask_mod on every (query, key) pair;
    - the paper's reference approach, re-implemented here: a dense float additive mask
      ``[b, 1, s, s]`` (0 / -inf) filled by Python loops over rows and segments, rebuilt every
      forward;
    - ``dense_mas_mask``: the vectorized dense bool twin (SDPA fallback).

(b) Attention forward, MAS vs causal on the same path: compiled FlexAttention with a BlockMask
    from ``create_mas_block_mask`` for a MAS layout and for an all-CAUSAL layout, and SDPA with
    the dense masks, at 256 / 1024 / 4096 tokens.

The script owns the part of BENCHMARKS.md between ``<!-- bench_masks:begin -->`` and
``<!-- bench_masks:end -->``; inside it, each device (cpu, cuda) has its own subsection, so a
GPU run adds its numbers next to the CPU ones. Usage::

    python tools/bench_masks.py                  # CPU, updates BENCHMARKS.md
    python tools/bench_masks.py --device cuda    # GPU (bf16, larger attention shapes)
    python tools/bench_masks.py --no-write       # print only
"""

from __future__ import annotations

import argparse
import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from mas.block_mask import create_mas_block_mask, create_mas_block_mask_reference
from mas.masks import dense_mas_mask, mas_mask_mod
from mas.testing import causal_layout, loop_additive_mask, staggered_prompt_layout
from mas.testing.benchlib import (
    BENCHMARKS_FILE,
    interleaved_median_ms,
    machine_description,
    markdown_table,
    median_and_min_ms,
    update_section,
)

NAME = "bench_masks"
TITLE = "MAS masks: build time and attention speed (`tools/bench_masks.py`)"

MASK_BUILD_SHAPES = [(8, 256), (8, 1024)]
ATTENTION_SEQ_LENS = [256, 1024, 4096]
#: Target for ours on CPU (a training step builds one mask per batch).
TARGET_MS = 1.0


@dataclass(frozen=True)
class AttentionShape:
    batch_size: int
    num_heads: int
    head_dim: int
    dtype: torch.dtype


ATTENTION_SHAPES = {
    # Small enough that 4096 tokens run in seconds on a few CPU cores.
    "cpu": AttentionShape(batch_size=1, num_heads=4, head_dim=64, dtype=torch.float32),
    "cuda": AttentionShape(batch_size=8, num_heads=16, head_dim=64, dtype=torch.bfloat16),
}


# ----------------------------------------------------------------------------------------------
# Measurements.
# ----------------------------------------------------------------------------------------------


def _block_mask_bytes(block_mask) -> int:
    tensors = [t for t in block_mask.as_tuple(flatten=True) if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def _mib(n_bytes: float) -> str:
    if n_bytes < 1024**2:
        return f"{n_bytes / 1024:.1f} KiB"
    return f"{n_bytes / 1024**2:.1f} MiB"


def _compiled_create_block_mask() -> Callable[[torch.Tensor], object]:
    """``create_block_mask`` under ``torch.compile(dynamic=False)``: one static graph per shape.

    ``create_block_mask(..., _compile=True)`` is deprecated in favour of compiling it; with the
    default (automatic dynamic) a second sequence length recompiles it with dynamic shapes,
    whose CPU code was 5x slower here and varied from run to run.
    """
    compiled = torch.compile(create_block_mask, dynamic=False)

    def build(segment_ids: torch.Tensor):
        batch_size, seq_len = segment_ids.shape
        mask_mod = mas_mask_mod(segment_ids)
        return compiled(mask_mod, batch_size, None, seq_len, seq_len, device=segment_ids.device)

    return build


def bench_mask_build(device: torch.device, dtype: torch.dtype) -> List[Dict[str, str]]:
    """One row per builder: median ms per shape, and memory of what it builds at the largest."""
    builders: Dict[str, Callable[[torch.Tensor], object]] = {
        "`create_mas_block_mask` (ours, O(s))": create_mas_block_mask,
        "ours, ids checked on the CPU batch (training path)": lambda ids: create_mas_block_mask(ids, validate=False),
        "ours, `compile=True`": lambda ids: create_mas_block_mask(ids, validate=False, compile=True),
        "`create_block_mask` eager": lambda ids: create_mas_block_mask_reference(ids),
        "`create_block_mask` compiled (static shapes)": _compiled_create_block_mask(),
        "paper's approach: Python-loop float mask": lambda ids: loop_additive_mask(ids, dtype),
        "`dense_mas_mask` (bool, vectorized)": dense_mas_mask,
    }
    rows = []
    for name, build in builders.items():
        # One builder at a time: interleaving them would let the 32 MiB masks of the dense
        # builders evict the caches that the small builds run from.
        row = {"builder": name}
        for batch_size, seq_len in MASK_BUILD_SHAPES:
            ids = staggered_prompt_layout(batch_size, seq_len, padded=True).to(device)
            row[f"{batch_size} x {seq_len}"] = median_and_min_ms(lambda: build(ids), device)
        built = build(ids)  # the largest shape
        if isinstance(built, torch.Tensor):
            row["memory"] = _mib(built.numel() * built.element_size())
        else:
            row["memory"] = _mib(_block_mask_bytes(built)) + " (block tables)"
        rows.append(row)
        print(row, flush=True)
    return rows


def bench_attention(device: torch.device) -> List[Dict[str, str]]:
    """Forward time of compiled flex (MAS vs causal BlockMask) and SDPA (dense masks)."""
    shape = ATTENTION_SHAPES[device.type]
    # dynamic=False: a dynamic-shape recompile breaks the CPU kernel in torch 2.13.
    flex = torch.compile(flex_attention, dynamic=False)
    rows = []
    for seq_len in ATTENTION_SEQ_LENS:
        generator = torch.Generator(device=device).manual_seed(seq_len)
        q, k, v = (
            torch.randn(
                shape.batch_size, shape.num_heads, seq_len, shape.head_dim,
                device=device, dtype=shape.dtype, generator=generator,
            )
            for _ in range(3)
        )
        mas_ids = staggered_prompt_layout(shape.batch_size, seq_len, padded=False).to(device)
        causal_ids = causal_layout(shape.batch_size, seq_len).to(device)
        mas_block_mask = create_mas_block_mask(mas_ids)
        causal_block_mask = create_mas_block_mask(causal_ids)
        mas_dense = dense_mas_mask(mas_ids)[:, None]  # [b, 1, s, s]
        budget = 4.0 if device.type == "cpu" else 1.0
        with torch.no_grad():
            times = interleaved_median_ms(
                {
                    "flex MAS": lambda: flex(q, k, v, block_mask=mas_block_mask),
                    "flex causal": lambda: flex(q, k, v, block_mask=causal_block_mask),
                    "SDPA dense MAS": lambda: F.scaled_dot_product_attention(
                        q, k, v, attn_mask=mas_dense
                    ),
                    "SDPA causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                },
                device,
                budget_s=budget,
            )
        row = {"seq": str(seq_len)}
        row.update({f"{name} (ms)": f"{ms:.2f}" for name, ms in times.items()})
        row["flex MAS / causal"] = f"{times['flex MAS'] / times['flex causal']:.2f}"
        row["tiles computed MAS / causal"] = (
            f"{_computed_tiles(mas_block_mask)} / {_computed_tiles(causal_block_mask)}"
        )
        rows.append(row)
        print(row, flush=True)
    return rows


def _computed_tiles(block_mask) -> int:
    """Tiles the kernel visits (partial + full), summed over the batch."""
    return int(block_mask.kv_num_blocks.sum() + block_mask.full_kv_num_blocks.sum())


# ----------------------------------------------------------------------------------------------
# Report.
# ----------------------------------------------------------------------------------------------


def report(device: torch.device, build_rows, attention_rows, command: str) -> str:
    shape = ATTENTION_SHAPES[device.type]
    largest = f"{MASK_BUILD_SHAPES[-1][0]} x {MASK_BUILD_SHAPES[-1][1]}"
    ours_ms = float(build_rows[0][largest].split()[0])  # the median
    target = "met" if ours_ms <= TARGET_MS else "NOT met"
    dtype_name = str(shape.dtype).replace("torch.", "")
    return "\n".join(
        [
            f"### {device.type}",
            "",
            f"Measured {datetime.date.today().isoformat()} with "
            f"`{command}`.",
            f"Machine: {machine_description(device)}.",
            "Times are medians of repeated calls after warm-up (CUDA: events, synchronised). Mask "
            "builders are timed one after another; the attention variants of one size are timed "
            "in turn, round after round, so a change in machine load hits them alike.",
            "",
            "**(a) Mask build per batch** (ms, median (minimum): the minimum is the cost on an "
            "idle machine, the median what it cost among the machine's other jobs; rows: system "
            f"prompt, user prompt, answer, right padding; memory is what the builder returns at "
            f"{largest}, masks in {dtype_name} for the float mask):",
            "",
            markdown_table(build_rows),
            "",
            f"Target for ours: <= {TARGET_MS:g} ms at 8 x 1024 on CPU ({device.type}: {ours_ms:.2f} ms, "
            f"{target if device.type == 'cpu' else 'target stated for CPU'}). Ours creates no "
            "[seq, seq] tensor: it reduces per-block minima/maxima of the ids and compares them "
            "per tile.",
            "",
            f"**(b) Attention forward** (batch {shape.batch_size}, {shape.num_heads} heads, head dim "
            f"{shape.head_dim}, {dtype_name}; MAS layout: system 1/8, user ~1/2, answer the rest, "
            "no padding; causal: the same length all CAUSAL; flex is `torch.compile(flex_attention, "
            "dynamic=False)` with a BlockMask from `create_mas_block_mask`; SDPA takes the dense "
            "bool MAS mask or `is_causal=True`):",
            "",
            markdown_table(attention_rows),
        ]
    )


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Benchmark MAS mask builders and attention.")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md")
    parser.add_argument(
        "--output", type=Path, default=BENCHMARKS_FILE, help="Markdown file to update"
    )
    parser.add_argument("--skip-attention", action="store_true", help="only the mask builds")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice). On a machine shared with other jobs, "
        "1 avoids threads waiting on each other for a core and gives steadier numbers",
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")

    dtype = ATTENTION_SHAPES[device.type].dtype
    build_rows = bench_mask_build(device, dtype)
    attention_rows = [] if args.skip_attention else bench_attention(device)
    if not attention_rows:
        attention_rows = [{"seq": "-", "note": "attention skipped (--skip-attention)"}]
    command = f"python tools/bench_masks.py --device {device.type}"
    if args.threads is not None:
        command += f" --threads {args.threads}"
    section = report(device, build_rows, attention_rows, command)
    print()
    print(section)
    if not args.no_write:
        update_section(args.output, NAME, TITLE, device.type, section)
        print(f"\nupdated {args.output}")


if __name__ == "__main__":
    main()
