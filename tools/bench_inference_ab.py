"""Before/after on one machine: the inference engine of this checkout against an older revision.

Runs each revision's own ``tools/bench_generation.py`` and ``tools/bench_serve.py`` (``--no-write``)
in alternating rounds (before, after, before, after, ...), plus a server probe that both
revisions' public API can run (time to first token of 8 requests arriving at once; the stall of a
running stream while a long multi-segment prompt arrives), and reports medians side by side:

- offline decode tokens/s, batch 1, eager and compiled (``mas.generate``);
- prefill latency of 8 x 256-token prompts (MAS);
- server tokens/s at 1, 8 and 32 clients;
- server time to first token of 8 requests at once, and the running stream's longest gap.

The older revision is checked out with ``git worktree`` into a temporary folder and imported
through ``PYTHONPATH``; nothing in this checkout changes.

Usage::

    python tools/bench_inference_ab.py --before d850815           # CPU, 2 rounds
    python tools/bench_inference_ab.py --before d850815 --rounds 3 --no-write
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
NAME = "bench_inference_ab"
TITLE = "One inference engine: before vs after on the same machine (`tools/bench_inference_ab.py`)"

#: The server probe: version-agnostic (it builds the engine through whichever constructor the
#: revision has) so both revisions run the same measurement.
PROBE = r'''
import inspect, json, statistics, threading, time
import torch
from mas.segments import SegmentedSequence
from mas.serving import Engine, SamplingParams, SequenceHandle
from mas.testing import benchmark_model, random_prompt

NEW = "settings" in inspect.signature(Engine.__init__).parameters

class Silent:
    stop_tokens = []
    eos_id = -1
    def decode(self, ids):
        return ""

def make(model, rows, max_len):
    if NEW:
        from mas.generation import GenerationSettings
        settings = GenerationSettings(attention="mas", batch_size=rows, max_cache_len=max_len, reuse_system_cache=False)
        return Engine(model, Silent(), settings).start()
    return Engine(model, Silent(), attention="mas", rows=rows, max_len=max_len, prefix_cache=None).start()

def run(engine, prompt, n):
    done = threading.Event()
    handle = SequenceHandle(prompt, SamplingParams(max_tokens=n, ignore_stop_tokens=True), lambda e: done.set() if e.kind in ("finish", "error") else None)
    engine.submit([handle])
    done.wait()
    return handle

model = benchmark_model("tiny", torch.device("cpu"), torch.float32)
vocab = model.tok_embeddings.num_embeddings
prompts = [random_prompt(64 + (i % 4) * 8, vocab, system=16, seed=i) for i in range(8)]
engine = make(model, 8, 256)
medians = []
for repeat in range(6):
    done = [threading.Event() for _ in prompts]
    handles = [SequenceHandle(p, SamplingParams(max_tokens=2, ignore_stop_tokens=True), lambda e, d=d: d.set() if e.kind in ("finish", "error") else None) for p, d in zip(prompts, done)]
    engine.submit(handles)
    for d in done:
        d.wait()
    if repeat:
        medians.append(statistics.median((h.first_token_at - h.submitted_at) * 1e3 for h in handles))
engine.stop()
segments, length = 7, 128
long_prompt = random_prompt(segments * length, vocab, system=length, seed=99)
long_prompt = SegmentedSequence(long_prompt.tokens, long_prompt.labels, [i // length for i in range(segments * length)])
running = random_prompt(64, vocab, system=16, seed=98)
engine = make(model, 2, 1024)
run(engine, long_prompt, 2)
run(engine, running, 2)
stalls = []
for repeat in range(3):
    stamps, finished = [], threading.Event()
    def on_event(event):
        stamps.append(time.perf_counter())
        if event.kind in ("finish", "error"):
            finished.set()
    engine.submit([SequenceHandle(running, SamplingParams(max_tokens=128, ignore_stop_tokens=True), on_event)])
    while len(stamps) < 8:
        time.sleep(0.001)
    arrived = time.perf_counter()
    prefilled = run(engine, long_prompt, 1).first_token_at
    finished.wait()
    stalls.append(max(b - a for a, b in zip(stamps, stamps[1:]) if b >= arrived and a <= prefilled) * 1e3)
engine.stop()
print(json.dumps({"ttft8_ms": statistics.median(medians), "stall_ms": statistics.median(stalls)}))
'''


def _run(tree: Path, args: List[str]) -> str:
    env = dict(os.environ, PYTHONPATH=f"{tree}{os.pathsep}{tree / 'recipes'}")
    result = subprocess.run([sys.executable, *args], cwd=tempfile.gettempdir(), env=env, capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:1])} failed in {tree}:\n{result.stderr[-3000:]}")
    return result.stdout


def _cell(markdown: str, row: str, column: int) -> float:
    """The number in ``column`` of the table row whose first cell is ``row``."""
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == row:
            return float(cells[column].replace(",", ""))
    raise ValueError(f"no row {row!r} in the output")


def measure(tree: Path) -> Dict[str, float]:
    """One round of every measurement on the revision in ``tree``."""
    generation = _run(tree, [str(tree / "tools/bench_generation.py"), "--no-write", "--prompt-lens", "256", "--batch-sizes", "8", "--new-tokens", "64", "--rounds", "3", "--profile-steps", "0"])
    serve = _run(tree, [str(tree / "tools/bench_serve.py"), "--no-write", "--ttft-repeats", "2"])
    probe = json.loads(_run(tree, ["-c", PROBE]).strip().splitlines()[-1])
    prefill_line = next(line for line in generation.splitlines() if line.startswith("| 256 | 8 |"))
    return {
        "decode eager, tokens/s": _cell(generation, "MAS", 1),
        "decode compiled (default), tokens/s": _cell(generation, "MAS compiled (default)", 1),
        "prefill 8 x 256 MAS, ms": float(prefill_line.strip("|").split("|")[2]),
        "server 1 client, tokens/s": _cell(serve, "1 (engine)", 1),
        "server 8 clients, tokens/s": _cell(serve, "8 (engine)", 1),
        "server 32 clients, tokens/s": _cell(serve, "32 (engine)", 1),
        "server TTFT, 8 requests at once, ms": probe["ttft8_ms"],
        "server stall of a running stream (896-token arrival), ms": probe["stall_ms"],
    }


def report(before: str, after: str, rounds: int, results: Dict[str, List[Dict[str, float]]]) -> str:
    lower_is_better = ("ms",)
    rows = []
    for key in results["before"][0]:
        b = statistics.median(r[key] for r in results["before"])
        a = statistics.median(r[key] for r in results["after"])
        better = a / b if not key.endswith(lower_is_better) else b / a
        rows.append(f"| {key} | {b:,.1f} | {a:,.1f} | {better:.2f} |")
    return "\n".join(
        [
            f"### cpu ({datetime.date.today().isoformat()})",
            "",
            f"`python tools/bench_inference_ab.py --before {before} --rounds {rounds}`: revision {before} (before) and {after} "
            f"(after) run alternately, {rounds} rounds each, medians. Each round runs the revision's own `bench_generation.py` "
            "(batch-1 decode of 64 tokens after a 256-token prompt; prefill of 8 x 256 tokens) and `bench_serve.py` (64 requests of "
            "64-88 prompt tokens, 32 new tokens each, clients back to back), and a server probe both revisions run unchanged. "
            "Tiny model, random weights, fp32, 2-core CPU; a 2-core machine's run-to-run spread is several percent.",
            "",
            "| measurement | before | after | after vs before (>1: better) |",
            "|---|---|---|---|",
            *rows,
        ]
    )


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="the older revision (a commit or tag)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    after = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"before": Path(tmp) / "before", "after": Path(tmp) / "after"}
        subprocess.run(["git", "worktree", "add", "--detach", "-f", str(trees["before"]), args.before], cwd=REPO, check=True, capture_output=True)
        subprocess.run(["git", "worktree", "add", "--detach", "-f", str(trees["after"]), "HEAD"], cwd=REPO, check=True, capture_output=True)
        try:
            results: Dict[str, List[Dict[str, float]]] = {"before": [], "after": []}
            for round_index in range(args.rounds):
                for side in ("before", "after") if round_index % 2 == 0 else ("after", "before"):
                    print(f"round {round_index + 1}: {side}", flush=True)
                    results[side].append(measure(trees[side]))
        finally:
            for tree in trees.values():
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, capture_output=True)
    text = report(args.before, after, args.rounds, results)
    print(text)
    if not args.no_write:
        from mas.testing.benchlib import BENCHMARKS_FILE, update_section

        update_section(BENCHMARKS_FILE, NAME, TITLE, "cpu", text)


if __name__ == "__main__":
    main()
