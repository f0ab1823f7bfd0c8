"""Step metrics: throughput, peak memory, a JSONL record and the progress-bar text."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch

__all__ = ["MetricsFile", "StepTimer", "peak_memory_gib", "read_metrics"]


def peak_memory_gib(device: torch.device, reset: bool = True) -> Dict[str, float]:
    """Peak memory since the last reset: CUDA allocator peaks, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        stats = {
            "peak_memory_alloc_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "peak_memory_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
        }
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
        return stats
    # ru_maxrss is KiB on Linux, bytes on macOS; it never resets.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024
    return {"peak_rss_gib": rss * scale / 2**30}


class StepTimer:
    """Wall time between optimizer steps (synchronizing CUDA so the time is the step's)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._start = time.perf_counter()

    def lap(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        elapsed, self._start = now - self._start, now
        return elapsed


class MetricsFile:
    """Append-only ``metrics.jsonl``: one JSON object per logged step (plots and tests read it).

    Always valid JSON lines: non-finite numbers are refused (``allow_nan=False``), and a resumed
    run first keeps only the complete records up to its checkpoint's step, so replayed steps are
    not written twice and a line torn by a kill is dropped.

    Args:
        path: the file.
        resume_step (Optional[int]): None starts a new file; else the global step of the
            checkpoint being resumed.
    """

    def __init__(self, path: str | Path, *, resume_step: Optional[int] = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = _records_up_to(self.path, resume_step) if resume_step is not None else []
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)
        self._file = open(self.path, "a")

    def write(self, record: Dict[str, Any]) -> None:
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _records_up_to(path: Path, step: int) -> list[str]:
    """Complete JSON lines of ``path`` whose step is at most ``step`` (a torn last line is dropped)."""
    if not path.exists():
        return []
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and int(record.get("step", 0)) <= step:
            kept.append(line)
    return kept


def read_metrics(path: str | Path, kind: Optional[str] = "train") -> list[Dict[str, Any]]:
    """Records of one ``kind`` ("train", "val") from a ``metrics.jsonl``; the last write of a step wins."""
    by_step: Dict[tuple, Dict[str, Any]] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            if kind is None or record.get("kind") == kind:
                by_step[(record.get("kind"), record["step"])] = record
    return [by_step[k] for k in sorted(by_step, key=lambda k: k[1])]
