"""Benchmark log-likelihood scoring (``mas_eval`` in ``loglik`` mode): the LM head and softmax on
the answer rows only (the default) against the same forward over the full ``[b, s, vocab]`` logits.

A candidate is a prompt followed by one answer sentence ("the correct answer is false"); only
the ~6-9 positions that predict an answer token have a score, so the full path spends its LM
head and an fp32 ``[b, s, 128256]`` log-softmax on positions nobody reads. Both paths run
:func:`mas.evaluation.loglik.answer_logprobs` on the same candidates, timed in turn.

Candidates copy the segment layouts of the bundled Commonsense170K rows (tokenized with the tiny
tokenizer: prompt, then the answer sentence), with random ids of Llama 3's vocabulary. The model
is the Llama-3.2-1B shape (tied head) with random weights in bf16; on a CPU only its first
``--layers`` layers (default 2), so the head weighs more there than in the whole model.

Usage::

    python tools/bench_scoring.py                  # CPU, 2 of the 16 layers
    python tools/bench_scoring.py --device cuda    # GPU, the whole model
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
from pathlib import Path
from typing import Dict, List, Optional

import torch
from bench_training import LLAMA3_2_1B

from mas.assets import COMMONSENSE_TRAIN_SAMPLE
from mas.attention import use_mas_attention
from mas.data import instruction_messages
from mas.evaluation.loglik import answer_logprobs
from mas.models import tiny_llama3_2, tiny_llama3_tokenizer
from mas.segments import SegmentBuilder, SegmentedSequence, counts_as_target
from mas.testing.benchlib import BENCHMARKS_FILE, machine_description, markdown_table, repeated_times_ms, update_section

NAME = "bench_scoring"
TITLE = "Log-likelihood scoring: the LM head on answer rows only (`tools/bench_scoring.py`)"


def candidates(count: int, vocab_size: int, seed: int = 0) -> List[SegmentedSequence]:
    """``count`` candidates with the layouts of the bundled rows (prompt + answer sentence) and
    random ids below ``vocab_size``."""
    rows = json.loads(Path(COMMONSENSE_TRAIN_SAMPLE).read_text())[:count]
    builder = SegmentBuilder(tiny_llama3_tokenizer())
    generator = torch.Generator().manual_seed(seed)
    out = []
    for row in rows:
        layout = builder(instruction_messages(row["instruction"], row["input"], row["output"]))
        tokens = torch.randint(vocab_size, (len(layout),), generator=generator).tolist()
        out.append(SegmentedSequence(tokens, [t if counts_as_target(s) else -100 for t, s in zip(tokens, layout.segment_ids)], layout.segment_ids))
    return out


def bench(args: argparse.Namespace) -> str:
    device = torch.device(args.device)
    layers = args.layers or (LLAMA3_2_1B["num_layers"] if device.type == "cuda" else 2)
    vocab = args.vocab or LLAMA3_2_1B["vocab_size"]
    with torch.random.fork_rng(devices=[]), device:
        torch.manual_seed(0)
        model = tiny_llama3_2(**{**LLAMA3_2_1B, "num_layers": layers, "vocab_size": vocab})
    model = use_mas_attention(model.to(torch.bfloat16)).eval()
    cands = candidates(args.candidates, vocab)
    paths = {"LM head on answer rows (default)": True, "full logits": False}
    calls = {name: (lambda rows=rows: answer_logprobs(model, cands, batch_size=args.batch_size, head_on_answers_only=rows)) for name, rows in paths.items()}
    scores = {name: call() for name, call in calls.items()}
    worst = max(abs(a - b) / max(abs(b), 1.0) for a, b in zip(*scores.values()))
    peak: Dict[str, Optional[float]] = {}
    for name, call in calls.items():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            call()
            peak[name] = torch.cuda.max_memory_allocated(device) / 2**20
        else:
            peak[name] = None
    times = repeated_times_ms(calls, device, warmup=1, min_repeats=args.rounds, max_repeats=args.rounds)
    answer_rows = sum(sum(counts_as_target(s) for s in c.segment_ids) for c in cands)
    batches = -(-len(cands) // args.batch_size)
    longest = max(len(c) for c in cands)
    table = []
    for name, rows_only in paths.items():
        ms = statistics.median(times[name])
        # The largest tensor of each path: the fp32 log-softmax over its rows.
        logit_rows = (answer_rows / batches) if rows_only else args.batch_size * (longest - 1)
        table.append(
            {
                "scoring": name,
                f"ms per {len(cands)} candidates": f"{ms:.0f}",
                "candidates/s": f"{len(cands) / ms * 1e3:.1f}",
                "fp32 log-probs per batch (MiB)": f"{logit_rows * vocab * 4 / 2**20:.0f}",
                "peak memory (MiB)": f"{peak[name]:.0f}" if peak[name] is not None else "not measured (CPU)",
            }
        )
    ratio = statistics.median(times["full logits"]) / statistics.median(times["LM head on answer rows (default)"])
    when = datetime.date.today().isoformat()
    return "\n\n".join(
        [
            f"### {device.type}",
            f"Measured {when} with `python tools/bench_scoring.py --device {device.type} --layers {layers} --candidates {len(cands)} "
            f"--batch-size {args.batch_size} --rounds {args.rounds}`.",
            f"Machine: {machine_description(device)}.",
            f"Model: the Llama-3.2-1B shape ({layers} of its 16 layers), random weights, bf16, tied LM head of {vocab:,} "
            f"tokens. Candidates: the layouts of the first {len(cands)} bundled Commonsense170K rows (prompt, then the answer "
            f"sentence; {answer_rows / len(cands):.1f} answer tokens and up to {longest} tokens each), random ids; "
            f"`answer_logprobs` in batches of {args.batch_size}, both paths timed in turn, medians of {args.rounds} rounds.",
            markdown_table(table),
            f"- answer rows only / full logits: {ratio:.2f}x the candidates/s; largest relative score difference "
            f"{worst:.1e} (bf16 model, fp32 softmax)",
            *(
                [f"- {layers} of the 16 layers ran: the LM head is a larger share of the work than in the whole model, "
                 "so the whole model gains less (not measured on a GPU yet)"]
                if layers < LLAMA3_2_1B["num_layers"] else []
            ),
        ]
    )


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--layers", type=int, default=None, help="layers of the 1B shape (default: 16 on CUDA, 2 on CPU)")
    parser.add_argument("--candidates", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16, help="candidates per forward (mas_eval's batch_size)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=None, help="a smaller vocabulary than the 1B shape's 128,256: a check of the script, never written")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    report = bench(args)
    print(report)
    if args.vocab not in (None, LLAMA3_2_1B["vocab_size"]):
        print("a shrunk vocabulary (--vocab) is a check, not a benchmark: BENCHMARKS.md is left as it is")
    elif not args.no_write:
        update_section(BENCHMARKS_FILE, NAME, TITLE, torch.device(args.device).type, report)


if __name__ == "__main__":
    main()
