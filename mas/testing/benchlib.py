"""Benchmark harness of the scripts in tools/: timing, tables, machine facts, BENCHMARKS.md.

Each script owns one section of BENCHMARKS.md, delimited by ``<!-- NAME:begin -->`` and
``<!-- NAME:end -->``; inside it each device type (cpu, cuda) has its own subsection, so a GPU run
adds its numbers beside the CPU ones without touching them.
"""

from __future__ import annotations

import os
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

__all__ = [
    "BENCHMARKS_FILE",
    "interleaved_median_ms",
    "machine_description",
    "markdown_table",
    "median_and_min_ms",
    "repeated_times_ms",
    "time_once_ms",
    "update_section",
]

#: The source checkout (the tools run from one; an installed wheel has no BENCHMARKS.md).
REPO_ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS_FILE = REPO_ROOT / "BENCHMARKS.md"
BENCHMARKS_HEADER = """# Benchmarks

Measured by the scripts in `tools/`. Each script rewrites only its own section (between its
`<!-- name:begin -->` / `<!-- name:end -->` markers); numbers depend on the machine stated in
each section. Ratios are measured side by side in one run; absolute times hold only for the
machine named.
"""


def time_once_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call in ms (CUDA: events around it, synchronised)."""
    if device.type == "cuda":
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(stop)
    begin = time.perf_counter()
    fn()
    return (time.perf_counter() - begin) * 1e3


def repeated_times_ms(
    fns: Dict[str, Callable[[], object]],
    device: torch.device,
    warmup: int = 3,
    min_repeats: int = 5,
    max_repeats: int = 50,
    budget_s: float = 1.0,
) -> Dict[str, List[float]]:
    """Times (ms) of each ``fn()`` after ``warmup`` calls of each.

    The functions are called in turn (A, B, A, B, ...), so a change in machine load hits all of
    them alike and their ratios stay meaningful. Rounds repeat until ``budget_s`` is spent (at
    least ``min_repeats``, at most ``max_repeats``).
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    spent, rounds = 0.0, 0
    while rounds < max_repeats and (rounds < min_repeats or spent < budget_s):
        for name, fn in fns.items():
            elapsed = time_once_ms(fn, device)
            times[name].append(elapsed)
            spent += elapsed / 1e3
        rounds += 1
    return times


def interleaved_median_ms(fns: Dict[str, Callable[[], object]], device: torch.device, **kwargs) -> Dict[str, float]:
    """Median ms of each ``fn()``, timed in turn (see :func:`repeated_times_ms`)."""
    return {name: statistics.median(v) for name, v in repeated_times_ms(fns, device, **kwargs).items()}


def median_and_min_ms(fn: Callable[[], object], device: torch.device, **kwargs) -> str:
    """``"median (min)"`` ms of ``fn()``: the minimum is the idle-machine cost, the median what it
    cost among the machine's other jobs."""
    times = repeated_times_ms({"fn": fn}, device, **kwargs)["fn"]
    return f"{statistics.median(times):.2f} ({min(times):.2f})"


def markdown_table(rows: List[Dict[str, str]]) -> str:
    """A Markdown table of ``rows`` (the first row's keys are the header)."""
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(row[h]) for h in header) + " |" for row in rows]
    return "\n".join(lines)


def machine_description(device: torch.device) -> str:
    """CPU model, threads, torch version, device, load; GPU name and memory when on CUDA."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    parts = [f"CPU {cpu} ({os.cpu_count()} cores)", f"{torch.get_num_threads()} torch threads", f"torch {torch.__version__}"]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        parts.append(f"GPU {props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs)")
    if hasattr(os, "getloadavg"):
        parts.append(f"1-min load average {os.getloadavg()[0]:.1f}")
    parts.append(f"Python {platform.python_version()}")
    return ", ".join(parts)


def update_section(path: Path, name: str, title: str, device_type: str, body: str) -> None:
    """Replace (or add) ``device_type``'s subsection of section ``name`` in ``path``."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    sub_begin, sub_end = f"<!-- {name}:{device_type}:begin -->", f"<!-- {name}:{device_type}:end -->"
    text = path.read_text() if path.exists() else BENCHMARKS_HEADER
    if begin not in text or end not in text:
        text = text.rstrip("\n") + f"\n\n## {title}\n\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    inside, tail = rest.split(end, 1)
    subsection = f"{sub_begin}\n{body.strip()}\n{sub_end}"
    pattern = re.compile(re.escape(sub_begin) + r".*?" + re.escape(sub_end), re.DOTALL)
    if pattern.search(inside):
        inside = pattern.sub(lambda _: subsection, inside)
    else:
        parts = [p for p in (inside.strip("\n"),) if p]
        # cpu first, then cuda: a stable order.
        parts = [subsection] + parts if device_type == "cpu" else parts + [subsection]
        inside = "\n\n".join(parts)
    path.write_text(f"{head}{begin}\n{inside.strip(chr(10))}\n{end}{tail}")
