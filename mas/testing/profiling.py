"""What limits a benchmarked step: a ``torch.profiler`` summary the benchmark scripts print.

:func:`profile_calls` runs a function a few times under the profiler (:class:`ProfilerWindow`
profiles a window that a loop opens and closes) and returns a :class:`ProfileSummary`: on CUDA the top device kernels by total time, how many kernels one call
launches, and the fraction of the calls' wall time the GPU was busy (the union of kernel and
copy intervals, so overlapping streams are not counted twice). A low busy fraction means the
step is launch- or host-bound; a high one with a GEMM on top means it is compute-bound. On a CPU
there are no device kernels; the summary lists the top operators by self CPU time instead.

The device part is read from the profiler's Chrome trace (``"cat": "kernel"`` events with
``ts``/``dur`` in microseconds), the format ``torch.profiler`` writes on every version; a pure
function (:func:`device_activity`) turns its events into the summary, so the tests check it on
a hand-written trace without a GPU.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch

__all__ = ["DEVICE_CATEGORIES", "ProfileSummary", "ProfilerWindow", "busy_microseconds", "device_activity", "profile_calls"]

#: Chrome-trace categories of work on the device: kernels, copies and fills.
DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
#: Kernel names are C++ template signatures; the table keeps this many characters.
NAME_WIDTH = 96


@dataclass
class ProfileSummary:
    """A profiled run of ``calls`` calls.

    Attributes:
        calls (int): calls profiled (steps, or decoded tokens).
        wall_ms (float): host wall time of the calls, synchronised before and after (the
            profiler's own overhead included).
        kind (str): what ``top`` lists: ``"CUDA kernels"`` or ``"CPU ops (self time)"``.
        top (List[Tuple[str, float, int]]): ``(name, total ms, count)``, largest total first.
        device_events (int): device kernels, copies and fills (0 on a CPU).
        busy_ms (Optional[float]): union of the device events' intervals; None on a CPU.
    """

    calls: int
    wall_ms: float
    kind: str
    top: List[Tuple[str, float, int]] = field(default_factory=list)
    device_events: int = 0
    busy_ms: Optional[float] = None

    @property
    def busy_fraction(self) -> Optional[float]:
        """GPU-busy time / wall time of the profiled calls (None on a CPU)."""
        if self.busy_ms is None or self.wall_ms <= 0:
            return None
        return self.busy_ms / self.wall_ms

    def markdown(self, what: str, per: str = "step", measured_ms: Optional[float] = None) -> str:
        """A few Markdown lines: the headline figures, then the top entries as a table.

        Args:
            what (str): what was profiled (a sentence fragment).
            per (str): the unit of one call ("step", "token").
            measured_ms (Optional[float]): the same call's time measured without the profiler;
                then GPU-busy time is also given as a fraction of it.
        """
        lines = [f"Profile of {what} ({self.calls} {per}s, `torch.profiler`):", ""]
        if self.busy_ms is not None:
            per_call = self.busy_ms / max(self.calls, 1)
            line = (
                f"- GPU busy {self.busy_ms:.1f} ms of {self.wall_ms:.1f} ms profiled wall time "
                f"({self.busy_fraction:.0%}); {per_call:.3f} ms of kernels per {per}"
            )
            if measured_ms:
                line += f" = {per_call / measured_ms:.0%} of the {measured_ms:.3f} ms measured without the profiler"
            lines.append(line)
            lines.append(f"- {self.device_events / max(self.calls, 1):,.1f} device kernels and copies per {per}")
        else:
            lines.append(f"- {self.wall_ms / max(self.calls, 1):.2f} ms wall time per {per} under the profiler")
        total = sum(ms for _, ms, _ in self.top) or 1.0
        rows = ["", f"| top {self.kind} | total ms | count | share of listed |", "|---|---|---|---|"]
        for name, ms, count in self.top:
            short = name if len(name) <= NAME_WIDTH else name[: NAME_WIDTH - 3] + "..."
            short = short.replace("|", "\\|")
            rows.append(f"| `{short}` | {ms:.2f} | {count} | {ms / total:.0%} |")
        return "\n".join(lines + rows)


def busy_microseconds(intervals: Iterable[Tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals (overlaps counted once)."""
    busy = 0.0
    current_start = current_end = None
    for start, end in sorted(intervals):
        if current_end is None or start > current_end:
            if current_end is not None:
                busy += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_end is not None:
        busy += current_end - current_start
    return busy


def device_activity(events: Iterable[Dict[str, Any]], top: int = 10) -> Tuple[List[Tuple[str, float, int]], int, float]:
    """Device work of a Chrome trace.

    Args:
        events: the trace's ``traceEvents``.
        top (int): entries to keep.

    Returns:
        Tuple: ``[(name, total ms, count)]`` of the ``top`` largest totals, the number of
        device events, and their busy time (union of intervals) in microseconds.
    """
    totals: Dict[str, List[float]] = {}
    intervals = []
    for event in events:
        if event.get("ph") != "X" or event.get("cat") not in DEVICE_CATEGORIES:
            continue
        start, duration = float(event["ts"]), float(event.get("dur", 0.0))
        intervals.append((start, start + duration))
        entry = totals.setdefault(event.get("name", "?"), [0.0, 0])
        entry[0] += duration
        entry[1] += 1
    ranked = sorted(totals.items(), key=lambda item: -item[1][0])[:top]
    return [(name, us / 1e3, int(count)) for name, (us, count) in ranked], len(intervals), busy_microseconds(intervals)


def _cpu_top(profiler: torch.profiler.profile, top: int) -> List[Tuple[str, float, int]]:
    averages = sorted(profiler.key_averages(), key=lambda a: -a.self_cpu_time_total)[:top]
    return [(a.key, a.self_cpu_time_total / 1e3, a.count) for a in averages]


class ProfilerWindow:
    """``torch.profiler`` over a window that a loop opens and closes itself (e.g. a few decode
    steps in the middle of a generation): :meth:`start`, the calls, then :meth:`stop`.

    Args:
        device (torch.device): CUDA adds device activity and synchronises at both ends.
        top (int): entries of the top list.
        trace_path (Optional[os.PathLike]): also keep the Chrome trace there (gzip-compressed
            when the name ends in ``.gz``); open it in https://ui.perfetto.dev.
    """

    def __init__(self, device: torch.device, *, top: int = 10, trace_path: Optional[os.PathLike] = None) -> None:
        self.device, self.top, self.trace_path = device, top, trace_path
        self.on_cuda = device.type == "cuda"
        self._profiler: Optional[torch.profiler.profile] = None
        self._begin = 0.0

    def start(self) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.on_cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.synchronize(self.device)
        self._profiler = torch.profiler.profile(activities=activities)
        self._profiler.start()
        self._begin = time.perf_counter()

    def stop(self, calls: int) -> ProfileSummary:
        """End the window of ``calls`` calls and summarise it."""
        if self._profiler is None:
            raise RuntimeError("ProfilerWindow.stop() before start()")
        if self.on_cuda:
            torch.cuda.synchronize(self.device)
        wall_ms = (time.perf_counter() - self._begin) * 1e3
        profiler, self._profiler = self._profiler, None
        profiler.stop()
        with tempfile.TemporaryDirectory(prefix="mas_profile_") as tmp:
            raw = Path(tmp) / "trace.json"
            profiler.export_chrome_trace(str(raw))
            events = json.loads(raw.read_text()).get("traceEvents", [])
            if self.trace_path is not None:
                _keep_trace(raw, Path(self.trace_path))
        kernels, count, busy_us = device_activity(events, self.top)
        if count:
            return ProfileSummary(calls, wall_ms, "CUDA kernels", kernels, count, busy_us / 1e3)
        return ProfileSummary(calls, wall_ms, "CPU ops (self time)", _cpu_top(profiler, self.top))


def _keep_trace(raw: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.name.endswith(".gz"):
        with raw.open("rb") as source, gzip.open(target, "wb") as sink:
            shutil.copyfileobj(source, sink)
    else:
        shutil.copyfile(raw, target)


def profile_calls(
    fn: Callable[[], object],
    calls: int,
    device: torch.device,
    *,
    top: int = 10,
    trace_path: Optional[os.PathLike] = None,
) -> ProfileSummary:
    """Run ``fn()`` ``calls`` times under ``torch.profiler`` and summarise what ran.

    Args:
        fn: one call (a training step, a decode step); warm it up (compile) beforehand.
        calls (int): calls to profile.
        device (torch.device): CUDA adds device activity and synchronises around the calls.
        top (int): entries of the top list.
        trace_path (Optional[os.PathLike]): also keep the Chrome trace there (see
            :class:`ProfilerWindow`).

    Returns:
        ProfileSummary: the summary.
    """
    window = ProfilerWindow(device, top=top, trace_path=trace_path)
    window.start()
    for _ in range(calls):
        fn()
    return window.stop(calls)
