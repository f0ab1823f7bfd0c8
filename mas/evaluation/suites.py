"""Task suites: how each benchmark names, orders, scores and tabulates its tasks.

A results file, a predictions line and a table all need to know a benchmark's task names (the
eight commonsense tasks, the 57 MMLU subjects, any summarization data set), the per-task metric
(accuracy, ROUGE-L) and the table layout. A :class:`TaskSuite` answers those questions for one
benchmark, and :func:`get_suite` finds it by name. The commonsense suite (the paper's Table 1) is
the base class itself; MMLU's and summarization's are defined next to their benchmarks and
imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from mas.evaluation.tasks import TASK_NAMES, TASKS, get_task

if TYPE_CHECKING:
    from mas.evaluation.results import PredictionRecord

__all__ = [
    "DEFAULT_BENCHMARK",
    "MISSING_CELL",
    "TaskSuite",
    "escape_cell",
    "get_suite",
    "percent",
    "register_suite",
    "score_cells",
    "table_row",
]

MISSING_CELL = "–"  # en dash: a task the run did not evaluate
RESULTS_FORMAT = "mas-commonsense-results/1"
DEFAULT_BENCHMARK = "commonsense"
Runs = Sequence[Tuple[str, Mapping[str, Any]]]


class TaskSuite:
    """How one benchmark names, orders, scores and tabulates its tasks (one subclass each).

    Attributes:
        name (str): the benchmark's name (``benchmark:`` in ``mas_eval`` configs).
        metric (str): the per-task score averaged into the run's ``average``.
        results_format (str): the ``format`` tag of its results JSON.
    """

    name: str = DEFAULT_BENCHMARK
    metric: str = "accuracy"
    results_format: str = RESULTS_FORMAT

    def canonical(self, task: str) -> str:
        """The canonical name of ``task``; ValueError for a task the benchmark does not have."""
        return get_task(task).name

    def order(self, tasks: Iterable[str]) -> List[str]:
        """Canonical task names in table order."""
        present = set(tasks)
        return [n for n in TASK_NAMES if n in present]

    def task_entry(self, records: Sequence[PredictionRecord]) -> Dict[str, Any]:
        """The results entry of one task from its records."""
        correct = sum(bool(r.correct) for r in records)
        no_answer = sum(r.prediction is None for r in records)
        return {"accuracy": correct / len(records), "correct": correct, "total": len(records), "no_answer": no_answer}

    def summary(self, tasks: Mapping[str, Mapping[str, Any]]) -> Dict[str, Any]:
        """Run-level keys of the results JSON besides the average."""
        return {
            "counts": {
                "examples": sum(c["total"] for c in tasks.values()),
                "correct": sum(c["correct"] for c in tasks.values()),
                "no_answer": sum(c["no_answer"] for c in tasks.values()),
            },
            "no_answer": {name: c["no_answer"] for name, c in tasks.items()},
        }

    def markdown_table(self, runs: Runs) -> str:
        """Runs as the paper's Table 1: see :func:`markdown_table`."""
        header = ["Run"] + [TASKS[n].column for n in TASK_NAMES] + ["Avg."]
        lines = [table_row(header), table_row(["---"] + ["---:"] * (len(header) - 1))]
        for label, results in runs:
            tasks = results.get("tasks", {})
            lines.append(table_row([escape_cell(label)] + score_cells(tasks, TASK_NAMES, "accuracy")))
        return "\n".join(lines)


_SUITES: Dict[str, TaskSuite] = {}
# Suites defined next to their benchmark, imported on first use.
_SUITE_MODULES = {"mmlu": "mas.evaluation.mmlu", "summarization": "mas.evaluation.summarization"}


def register_suite(suite: TaskSuite) -> TaskSuite:
    """Make ``suite`` known to :func:`get_suite` under ``suite.name``."""
    _SUITES[suite.name] = suite
    return suite


def get_suite(name: Optional[str]) -> TaskSuite:
    """The suite of benchmark ``name`` (None: commonsense).

    Raises:
        ValueError: an unknown benchmark.
    """
    name = name or DEFAULT_BENCHMARK
    if name not in _SUITES and name in _SUITE_MODULES:
        importlib.import_module(_SUITE_MODULES[name])
    if name not in _SUITES:
        raise ValueError(f"unknown benchmark {name!r}; known: {sorted(set(_SUITES) | set(_SUITE_MODULES))}")
    return _SUITES[name]


register_suite(TaskSuite())



# -- table helpers, shared by the suites -------------------------------------------------------
def percent(value: float) -> str:
    """``0.6125 -> "61.2"``: a score as a table cell."""
    return f"{100.0 * value:.1f}"


def table_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def escape_cell(text: str) -> str:
    return text.replace("|", "\\|")


def score_cells(tasks: Mapping[str, Mapping[str, Any]], names: Sequence[str], metric: str) -> List[str]:
    """One cell per task of ``names`` (``–`` if absent), then the mean over the present ones, with
    ``(k/n)`` after it when some are absent, since such averages are not comparable."""
    values = [tasks[n][metric] for n in names if n in tasks]
    cells = [percent(tasks[n][metric]) if n in tasks else MISSING_CELL for n in names]
    average = MISSING_CELL
    if values:
        average = percent(sum(values) / len(values))
        if len(values) < len(names):
            average += f" ({len(values)}/{len(names)})"
    return cells + [average]
