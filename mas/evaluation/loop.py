"""The one resumable evaluation loop, for every benchmark and mode.

Skip what the predictions file already holds (records of this benchmark and mode whose
``(task, index)`` is asked for), score the rest in batches with the mode's record builder, and
append after every batch, so an interrupted run resumes where it stopped. Whether the file may
be reused at all (same model, adapter and settings) is decided before, by
:mod:`mas.evaluation.identity`.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

from mas.evaluation.benchmarks import benchmark_modes
from mas.evaluation.results import EvalResults, PredictionRecord, append_predictions, load_done
from mas.evaluation.spec import Benchmark, BenchmarkContext, EvalItem, RecordBuilder
from mas.progress import Progress

__all__ = ["evaluate_benchmark", "run_resumable"]


def run_resumable(context: BenchmarkContext, benchmark: str, items: List[EvalItem], build: RecordBuilder) -> EvalResults:
    """Score ``items`` in batches of ``context.settings.batch_size``, appending their records to
    ``context.predictions_path``.

    Records of this benchmark and mode already in the file are reused (not rescored) for the
    items whose key they match; records of other items (say, a larger ``limit`` earlier) are left
    in the file but not reported.

    Args:
        context (BenchmarkContext): model, mode, predictions file, progress bar switch.
        benchmark (str): the records' benchmark.
        items (List[EvalItem]): the examples, in evaluation order.
        build (RecordBuilder): the mode's record builder.

    Returns:
        EvalResults: every item's record, resumed ones included.
    """
    wanted = {item.key for item in items}
    done: Dict[Tuple[str, int], PredictionRecord] = {
        k: r for k, r in load_done(context.predictions_path).items()
        if r.mode == context.mode and r.benchmark == benchmark and k in wanted
    }  # fmt: skip
    results = EvalResults(benchmark=benchmark)
    results.extend(done.values())
    todo = [item for item in items if item.key not in done]
    desc = f"{benchmark} [{context.mode}, {context.settings.attention}]"
    bar = Progress(len(items), desc, initial=len(items) - len(todo), unit="examples", enabled=context.progress)
    metric = results.suite.metric
    batch_size = context.settings.batch_size
    for start in range(0, len(todo), batch_size):
        records = build(context, benchmark, todo[start : start + batch_size])
        append_predictions(context.predictions_path, records)
        results.extend(records)
        bar.update(len(records))
        average = results.average()
        bar.set_postfix(**{f"avg_{metric}": f"{100 * average:.1f}" if average is not None else "-"})
    bar.close()
    return results


def evaluate_benchmark(benchmark: Benchmark, context: BenchmarkContext) -> EvalResults:
    """Run ``benchmark`` in ``context.mode``: its items, its mode's builder, the resumable loop.

    Raises:
        ConfigError: a mode the benchmark does not have (before any file is written).
    """
    benchmark_modes(benchmark, context.mode)
    items = benchmark.items(context)
    return run_resumable(context, benchmark.name, items, benchmark.modes[context.mode])
