"""Benchmark the fine-tuning recipe single-device vs torchrun FSDP2 at the same global batch.

Runs the real recipes on the embedded tiny model (``tiny_mas`` and ``tiny_mas_distributed``) for a
few dozen steps, reads their ``metrics.jsonl`` and compares tokens/s (median over the steps after
the first few, which compile and warm up). On a single GPU this measures what FSDP2 costs when it
has nothing to shard across (``--nproc 1``); with more devices, the scaling.

Usage::

    python tools/bench_distributed.py --device cuda            # 1 GPU: single vs torchrun x1
    python tools/bench_distributed.py --device cpu --nproc 2   # CPU: gloo, 2 processes
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

import torch

from mas.testing.benchlib import BENCHMARKS_FILE, machine_description, markdown_table, update_section
from mas.training import read_metrics

NAME = "bench_distributed"
TITLE = "Fine-tuning recipe: one device vs torchrun FSDP2 (`tools/bench_distributed.py`)"


def run_recipe(cmd: List[str], out: Path) -> List[Dict]:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    return read_metrics(out / "metrics.jsonl")


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--skip", type=int, default=5, help="first steps left out (compile, warm-up)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench_distributed_"))
    common = [
        f"device={args.device}",
        f"max_steps_per_epoch={args.steps}",
        "epochs=1",
        "save_every_n_steps=null",
        "val_every_n_steps=null",
        "~val_dataset",
        "progress_bar=False",
        "pad_to_multiple_of=128",
        "model.lora_dropout=0.0",
        f"checkpointer.checkpoint_dir={work / 'base'}",
        "checkpointer.pretrain_steps=0",
    ]
    single_out, dist_out = work / "single", work / "dist"
    single = run_recipe(
        [sys.executable, "-m", "mas_lora_finetune", "--config", "tiny_mas", f"output_dir={single_out}", "batch_size=8", *common],
        single_out,
    )
    dist = run_recipe(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
            "-m", "mas_lora_finetune_distributed", "--config", "tiny_mas_distributed", f"output_dir={dist_out}",
            "global_batch_size=8", *common,
        ],
        dist_out,
    )  # fmt: skip

    def median(records: List[Dict], key: str) -> float:
        return statistics.median(r[key] for r in records[args.skip :])

    rows = []
    for name, records in (("mas_lora_finetune (1 process)", single), (f"mas_lora_finetune_distributed (torchrun x{args.nproc})", dist)):
        rows.append(
            {
                "recipe": name,
                "tokens/s (all ranks)": f"{median(records, 'tokens_per_second'):,.0f}",
                "tokens/s per rank": f"{median(records, 'tokens_per_second_per_rank') if 'tokens_per_second_per_rank' in records[-1] else median(records, 'tokens_per_second'):,.0f}",
                "step (ms)": f"{1e3 * median(records, 'step_seconds'):.1f}",
                "final loss": f"{records[-1]['loss']:.4f}",
            }
        )
    ratio = median(dist, "tokens_per_second") / median(single, "tokens_per_second")
    report = "\n".join(
        [
            f"### {args.device}",
            "",
            f"Measured {datetime.date.today().isoformat()} with `python tools/bench_distributed.py --device {args.device} --nproc {args.nproc}`.",
            f"Machine: {machine_description(torch.device(args.device))}.",
            f"The embedded tiny model (random base), the bundled 550 training rows, global batch 8, {args.steps} steps; "
            f"medians over steps {args.skip + 1}-{args.steps}. The tiny model is launch-bound on a GPU: this measures the "
            "recipe's overhead, not a large model's throughput.",
            "",
            markdown_table(rows),
            "",
            f"- torchrun x{args.nproc} / single process tokens/s: {ratio:.2f}",
        ]
    )
    print(report)
    if not args.no_write:
        update_section(BENCHMARKS_FILE, NAME, TITLE, args.device, report)


if __name__ == "__main__":
    main()
