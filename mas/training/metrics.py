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
    """Append-only ``metrics.jsonl``: one JSON object per logged step (plots and tests read it)."""

    def __init__(self, path: str | Path, *, resume: bool) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a" if resume else "w")

    def write(self, record: Dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(path: str | Path, kind: Optional[str] = "train") -> list[Dict[str, Any]]:
    """Records of one ``kind`` ("train", "val") from a ``metrics.jsonl``; the last write of a step wins."""
    by_step: Dict[tuple, Dict[str, Any]] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            if kind is None or record.get("kind") == kind:
                by_step[(record.get("kind"), record["step"])] = record
    return [by_step[k] for k in sorted(by_step, key=lambda k: k[1])]
