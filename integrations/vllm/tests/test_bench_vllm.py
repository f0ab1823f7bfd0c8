"""``tools/bench_vllm.py`` (the GPU benchmark of the plugin) runs on CPU at the tiny shape.

Timings are never asserted; what is checked is what the GPU run will report: every sequence of
both adapters equal to ``mas.generate`` on the backend named, and a MAS and a causal row for
each number of requests at once.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

TOOL = Path(__file__).resolve().parents[3] / "tools" / "bench_vllm.py"


def test_bench_vllm_runs_tiny_on_cpu(capsys):
    spec = importlib.util.spec_from_file_location("bench_vllm", TOOL)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    before = (TOOL.parents[1] / "BENCHMARKS.md").read_text()
    body = bench.main(["--device", "cpu", "--tiny", "--rounds", "1"])
    assert (TOOL.parents[1] / "BENCHMARKS.md").read_text() == before  # a check is never written
    assert re.search(r"\| mas \| 4/4 \| FLEX_ATTENTION \|", body) and re.search(r"\| causal \| 4/4 \| FLEX_ATTENTION \|", body)
    for n in (1, 2, 4):
        assert re.search(rf"\| {n} \| causal \(stock vLLM\) \| [0-9.]+ \| [0-9,]+ \|", body), n
        assert re.search(rf"\| {n} \| MAS \(plugin\) \| [0-9.]+ \| [0-9,]+ \| [0-9.]+ \|", body), n
    assert "BENCHMARKS.md left as it is" in capsys.readouterr().out
