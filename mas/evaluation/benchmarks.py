"""The benchmarks ``mas_eval`` can run, by name.

A benchmark is a function ``(BenchmarkContext) -> EvalResults``: it reads its data and options
from the context's config, prompts through the shared segment builder, writes per-example
predictions to ``context.predictions_path`` (appending, so reruns resume), and returns the
scored records. :func:`run_resumable` is that loop for any benchmark: skip what the predictions
file already holds, score the rest in batches, append after every batch.

==================  ===========================================  ==========================
name                module                                       modes
==================  ===========================================  ==========================
``commonsense``     :mod:`mas.evaluation.commonsense` (Table 1)  generate, loglik
``mmlu``            :mod:`mas.evaluation.mmlu` (Table 4)         generate, loglik
``summarization``   :mod:`mas.evaluation.summarization` (Tab. 5) generate
==================  ===========================================  ==========================
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Hashable, List, Sequence, Tuple, TypeVar

from omegaconf import DictConfig
from torch import nn
from tqdm import tqdm

from mas.evaluation.commonsense import ANSWER_TEMPLATE, CommonsenseRun, evaluate_commonsense
from mas.evaluation.results import EvalResults, PredictionRecord, append_predictions, load_done
from mas.evaluation.tasks import SAMPLE_SOURCE, TASK_NAMES
from mas.generation import GenerationSettings
from mas.segments import SegmentBuilder

__all__ = ["BENCHMARKS", "BenchmarkContext", "register_benchmark", "run_resumable"]

Item = TypeVar("Item")


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


def run_resumable(
    context: BenchmarkContext,
    benchmark: str,
    items: Sequence[Item],
    key: Callable[[Item], Tuple[str, int]],
    score: Callable[[List[Item]], List[PredictionRecord]],
    batch_size: int,
) -> EvalResults:
    """Score ``items`` in batches, appending records to ``context.predictions_path``.

    Records of this benchmark and mode already in the file are reused (not rescored) for the
    items whose ``key`` they match; records of other items (say, a larger ``limit`` earlier) are
    left in the file but not reported.

    Args:
        context (BenchmarkContext): model, mode, predictions file, progress bar switch.
        benchmark (str): the records' benchmark (its :class:`~mas.evaluation.suites.TaskSuite`).
        items: the examples, in evaluation order.
        key: ``(task, index)`` of an item, as its record will have it.
        score: records for a batch of items, in any order.
        batch_size (int): items per ``score`` call.

    Returns:
        EvalResults: every item's record, resumed ones included.
    """
    wanted = {key(item) for item in items}
    done: Dict[Hashable, PredictionRecord] = {
        k: r for k, r in load_done(context.predictions_path).items()
        if r.mode == context.mode and r.benchmark == benchmark and k in wanted
    }
    results = EvalResults(benchmark=benchmark)
    results.extend(done.values())
    todo = [item for item in items if key(item) not in done]
    desc = f"{benchmark} [{context.mode}, {context.settings.attention}]"
    bar = tqdm(total=len(items), initial=len(items) - len(todo), desc=desc, disable=not context.progress, dynamic_ncols=True)
    metric = results.suite.metric
    for start in range(0, len(todo), batch_size):
        records = score(todo[start : start + batch_size])
        append_predictions(context.predictions_path, records)
        results.extend(records)
        bar.update(len(records))
        average = results.average()
        bar.set_postfix({f"avg_{metric}": f"{100 * average:.1f}" if average is not None else "-"})
    bar.close()
    return results


@register_benchmark("mmlu")
def mmlu(context: BenchmarkContext) -> EvalResults:
    from mas.evaluation.mmlu import evaluate_mmlu

    return evaluate_mmlu(context)


@register_benchmark("summarization")
def summarization(context: BenchmarkContext) -> EvalResults:
    from mas.evaluation.summarization import evaluate_summarization

    return evaluate_summarization(context)
