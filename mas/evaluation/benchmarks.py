"""The benchmarks ``mas_eval`` can run, by name.

A benchmark is a function ``(BenchmarkContext) -> EvalResults``: it reads its data and options
from the context's config, prompts through the shared segment builder, writes per-example
predictions to ``context.predictions_path`` (appending, so reruns resume), and returns the
scored records.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict

from omegaconf import DictConfig
from torch import nn

from mas.evaluation.commonsense import ANSWER_TEMPLATE, CommonsenseRun, evaluate_commonsense
from mas.evaluation.results import EvalResults
from mas.evaluation.tasks import SAMPLE_SOURCE, TASK_NAMES
from mas.generation import GenerationSettings
from mas.segments import SegmentBuilder

__all__ = ["BENCHMARKS", "BenchmarkContext", "register_benchmark"]


@dataclass
class BenchmarkContext:
    """Everything a benchmark needs."""

    model: nn.Module
    tokenizer: Any
    builder: SegmentBuilder
    settings: GenerationSettings
    cfg: DictConfig
    mode: str
    predictions_path: Path
    progress: bool = True


Benchmark = Callable[[BenchmarkContext], EvalResults]
BENCHMARKS: Dict[str, Benchmark] = {}


def register_benchmark(name: str) -> Callable[[Benchmark], Benchmark]:
    def register(fn: Benchmark) -> Benchmark:
        BENCHMARKS[name] = fn
        return fn

    return register


@register_benchmark("commonsense")
def commonsense(context: BenchmarkContext) -> EvalResults:
    cfg = context.cfg
    run = CommonsenseRun(
        tasks=list(cfg.get("tasks") or TASK_NAMES),
        source=str(cfg.get("data_dir") or SAMPLE_SOURCE),
        mode=context.mode,
        limit=cfg.get("limit"),
        batch_size=int(cfg.get("batch_size", 16)),
        answer_template=cfg.get("answer_template", ANSWER_TEMPLATE),
    )
    return evaluate_commonsense(
        context.model,
        context.tokenizer,
        context.builder,
        context.settings,
        run,
        context.predictions_path,
        progress=context.progress,
    )
