"""Task suites: how each benchmark names, orders, scores and tabulates its tasks.

A results file, a predictions line and a table all need to know a benchmark's task names (the
eight commonsense tasks, the 57 MMLU subjects, any summarization data set, a user's own tasks),
the per-task metric (accuracy, ROUGE-L) and the table layout. A :class:`TaskSuite` answers those
questions for one benchmark; each benchmark of :mod:`mas.evaluation.benchmarks` carries its
suite. The commonsense suite (the paper's Table 1) is the base class itself.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Optional, Protocol, Sequence, Tuple

from mas.evaluation.tasks import TASK_NAMES, TASKS, get_task
from mas.errors import ConfigError


class ScoredRecord(Protocol):
    """What a suite reads of a record (:class:`mas.evaluation.results.PredictionRecord` is one;
    a protocol keeps this module below the results module)."""

    task: str
    prediction: Optional[str]
    correct: Optional[bool]
    scores: Optional[Dict[str, float]]
    info: Optional[Dict[str, Any]]


__all__ = [
    "DEFAULT_BENCHMARK",
    "MISSING_CELL",
    "NamedTaskSuite",
    "ScoredRecord",
    "TaskSuite",
    "USER_RESULTS_FORMAT",
    "escape_cell",
    "percent",
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

    def columns(self, present: Iterable[str]) -> List[str]:
        """The task columns of a table of runs that evaluated ``present`` (the paper's eight
        for commonsense, whatever was run; suites of a variable task list show only those)."""
        return list(TASK_NAMES)

    def header(self, task: str) -> str:
        """A task's column header."""
        return TASKS[task].column

    def task_entry(self, records: Sequence[ScoredRecord]) -> Dict[str, Any]:
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
        """One row per run, one column per task of :meth:`columns`, then the average (the
        paper's Table 1 for commonsense)."""
        names = self.columns(name for _, results in runs for name in results.get("tasks", {}))
        header = ["Run"] + [self.header(n) for n in names] + ["Avg."]
        lines = [table_row(header), table_row(["---"] + ["---:"] * (len(header) - 1))]
        for label, results in runs:
            tasks = results.get("tasks", {})
            lines.append(table_row([escape_cell(label)] + score_cells(tasks, names, self.metric)))
        return "\n".join(lines)


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


#: ``format`` of the results JSON of a user's own tasks (its task list travels in the file).
USER_RESULTS_FORMAT = "mas-user-results/1"


class NamedTaskSuite(TaskSuite):
    """A benchmark of named tasks (a user's own): tasks in declared order, accuracy, and the
    accuracy per group of rows (``group_by``) when the rows have groups.

    Tables show only the tasks that were run, under the user's names.

    Args:
        name (str): the benchmark's name.
        tasks (Sequence[str]): the task names, in table order.
    """

    metric = "accuracy"
    results_format = USER_RESULTS_FORMAT

    def __init__(self, name: str, tasks: Sequence[str]) -> None:
        self.name = name
        self.tasks = tuple(tasks)

    def canonical(self, task: str) -> str:
        if task not in self.tasks:
            raise ConfigError(f"unknown task '{task}' of benchmark {self.name}; its tasks: {', '.join(self.tasks)}")
        return task

    def order(self, tasks: Iterable[str]) -> List[str]:
        present = set(tasks)
        return [n for n in self.tasks if n in present]

    def columns(self, present: Iterable[str]) -> List[str]:
        return self.order(present)

    def header(self, task: str) -> str:
        return task

    def task_entry(self, records: Sequence[ScoredRecord]) -> Dict[str, Any]:
        entry = super().task_entry(records)
        groups: Dict[str, List[ScoredRecord]] = {}
        for record in records:
            group = (record.info or {}).get("group")
            if group is not None:
                groups.setdefault(str(group), []).append(record)
        if groups:
            entry["groups"] = {
                g: {"accuracy": sum(bool(r.correct) for r in rs) / len(rs), "correct": sum(bool(r.correct) for r in rs), "total": len(rs)}
                for g, rs in sorted(groups.items())
            }
        return entry

    def markdown_table(self, runs: Runs) -> str:
        """The task table, then per task with groups: one row per group, one column per run."""
        lines = [super().markdown_table(runs)]
        names = self.columns(name for _, results in runs for name in results.get("tasks", {}))
        for task in names:
            groups = sorted({g for _, r in runs for g in r.get("tasks", {}).get(task, {}).get("groups", {})})
            if not groups:
                continue
            lines += ["", table_row([f"{escape_cell(task)}: group"] + [escape_cell(label) for label, _ in runs])]
            lines.append(table_row(["---"] + ["---:"] * len(runs)))
            for group in groups:
                cells = []
                for _, results in runs:
                    entry = results.get("tasks", {}).get(task, {}).get("groups", {}).get(group)
                    cells.append(MISSING_CELL if entry is None else f"{percent(entry['accuracy'])} ({entry['total']})")
                lines.append(table_row([escape_cell(group)] + cells))
        return "\n".join(lines)
