"""Per-example predictions, per-task scores, results files and tables, for every benchmark.

Files of one evaluation run:

- ``predictions.jsonl``: one :class:`PredictionRecord` per line, appended as examples finish, so
  an interrupted run resumes with :func:`load_done` (a half-written last line is dropped).
- ``results.json``: run metadata (model, config, attention, mode, limit), per-task scores and
  counts, and the average over tasks (the paper's "Avg." column).

Benchmarks differ in their task names, their metric and their table: each has a
:class:`~mas.evaluation.suites.TaskSuite` (:func:`markdown_table` and :func:`load_results` use it).
Records and results files carry their benchmark's name; files without one are commonsense (as
written before other benchmarks existed). :func:`win_rate_row` is the commonsense Table 1's.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from mas.errors import DataError
from mas.evaluation.benchmarks import BENCHMARKS, get_suite
from mas.evaluation.suites import (
    DEFAULT_BENCHMARK,
    MISSING_CELL,
    USER_RESULTS_FORMAT,
    NamedTaskSuite,
    TaskSuite,
    table_row,
)

__all__ = [
    "MODES",
    "EvalResults",
    "PredictionRecord",
    "append_predictions",
    "load_done",
    "load_results",
    "markdown_table",
    "suite_of",
    "win_rate_row",
]

#: Modes a record can be scored in (generate: answer read from a generation, or the generated
#: text scored by ROUGE; loglik: best-scoring option; exact: generated text vs the reference).
MODES = ("generate", "loglik", "exact")
PathLike = Union[str, Path]
Runs = Sequence[Tuple[str, Mapping[str, Any]]]


@dataclass
class PredictionRecord:
    """One scored example.

    Attributes:
        task (str): canonical task name in its benchmark (a commonsense task, an MMLU subject, a
            summarization data set).
        index (int): the row's position in the task file.
        gold (str): the gold label (or reference summary).
        prediction (Optional[str]): the predicted label (or generated summary); None is "no answer".
        correct (Optional[bool]): prediction == gold; None where no answer is right or wrong
            (summarization: see ``scores``).
        mode (str): "generate" (label read from a generation), "loglik" (best-scoring option) or
            "exact" (the generated text matched against the reference).
        generation (str): the raw generated text ('' in loglik mode).
        option_scores (Optional[Dict[str, float]]): loglik mode's score per option label.
        scores (Optional[Dict[str, float]]): per-example metrics (summarization: ROUGE F1s).
        info (Optional[Dict[str, Any]]): anything else worth keeping (e.g. ``truncated_tokens``).
        benchmark (str): the benchmark whose task names and metric apply.
    """

    task: str
    index: int
    gold: str
    prediction: Optional[str]
    correct: Optional[bool]
    mode: str
    generation: str = ""
    option_scores: Optional[Dict[str, float]] = None
    scores: Optional[Dict[str, float]] = None
    info: Optional[Dict[str, Any]] = None
    benchmark: str = DEFAULT_BENCHMARK

    def __post_init__(self) -> None:
        self.task = get_suite(self.benchmark).canonical(self.task)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")

    @property
    def key(self) -> Tuple[str, int]:
        return (self.task, self.index)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PredictionRecord":
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_json(self) -> str:
        """One JSONL line (optional fields that are unset are left out)."""
        data = asdict(self)
        for name in ("scores", "info"):
            if data[name] is None:
                del data[name]
        return json.dumps(data, ensure_ascii=False)


@dataclass
class EvalResults:
    """Accumulates :class:`PredictionRecord`s of one run (one per ``(task, index)``; last wins)."""

    records: Dict[Tuple[str, int], PredictionRecord] = field(default_factory=dict)
    benchmark: str = DEFAULT_BENCHMARK

    @property
    def suite(self) -> TaskSuite:
        return get_suite(self.benchmark)

    def add(self, record: PredictionRecord) -> None:
        if record.benchmark != self.benchmark:
            raise ValueError(f"a {record.benchmark} record cannot join {self.benchmark} results")
        self.records[record.key] = record

    def extend(self, records: Iterable[PredictionRecord]) -> None:
        for record in records:
            self.add(record)

    def task_counts(self) -> Dict[str, Dict[str, Any]]:
        """``{task: entry}`` for the evaluated tasks in table order; commonsense and MMLU entries
        are ``{accuracy, correct, total, no_answer}``."""
        by_task: Dict[str, List[PredictionRecord]] = {}
        for record in self.records.values():
            by_task.setdefault(record.task, []).append(record)
        return {name: self.suite.task_entry(by_task[name]) for name in self.suite.order(by_task)}

    def accuracy(self, task: str) -> Optional[float]:
        """Accuracy on one task (0..1), None when no example of it was scored."""
        entry = self.task_counts().get(self.suite.canonical(task))
        return None if entry is None else entry.get("accuracy")

    def average(self) -> Optional[float]:
        """Mean over tasks of the suite's metric (each task weighs the same, as the paper's Avg.)."""
        values = [c[self.suite.metric] for c in self.task_counts().values()]
        return sum(values) / len(values) if values else None

    def average_accuracy(self) -> Optional[float]:
        """:meth:`average` for accuracy benchmarks; None for others (summarization)."""
        return self.average() if self.suite.metric == "accuracy" else None

    def to_dict(self, *, model: str, attention: str, mode: str, limit: Optional[int] = None,
                config: Optional[str] = None, extra: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
        """The results JSON object: metadata, per-task scores and the average.

        Raises:
            ValueError: ``mode`` is not a known mode, or records were scored in another mode.
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        other_modes = sorted({r.mode for r in self.records.values()} - {mode})
        if other_modes:
            raise ValueError(f"run mode is {mode!r} but some records were scored in {other_modes}")
        tasks = self.task_counts()
        return {
            "format": self.suite.results_format,
            "benchmark": self.benchmark,
            "model": model,
            "config": config,
            "attention": attention,
            "mode": mode,
            "limit": limit,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "tasks": tasks,
            "metric": self.suite.metric,
            "average": self.average(),
            "average_accuracy": self.average_accuracy(),
            **self.suite.summary(tasks),
            **dict(extra or {}),
        }

    def write_json(self, path: PathLike, **metadata: Any) -> Dict[str, Any]:
        """Write :meth:`to_dict` (``metadata`` = its keyword arguments) atomically; returns it."""
        data = self.to_dict(**metadata)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(partial, path)
        return data


def append_predictions(jsonl_path: PathLike, records: Iterable[PredictionRecord]) -> None:
    """Append records to a predictions JSONL file, one line each, flushed to disk.

    A half-written last line (a run killed mid-write) is cut off first, so the new lines start
    on a line of their own.
    """
    path = Path(jsonl_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.seek(0)
                content = f.read()
                f.truncate(content.rfind(b"\n") + 1)
        for record in records:
            f.write((record.to_json() + "\n").encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


def load_done(jsonl_path: PathLike) -> Dict[Tuple[str, int], PredictionRecord]:
    """The records already in a predictions file, by ``(task, index)``; {} if it does not exist.

    A last line without its newline that is not valid JSON is the remnant of an interrupted write
    and is ignored; any other bad line raises :class:`DataError` naming the line.
    """
    path = Path(jsonl_path)
    if not path.exists():
        return {}
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    done: Dict[Tuple[str, int], PredictionRecord] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = PredictionRecord.from_dict(json.loads(line))
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            if number == len(lines):  # unterminated last line: an interrupted append
                break
            raise DataError(f"{path}, line {number}: not a prediction record ({e})") from None
        done[record.key] = record
    return done


def load_results(path: PathLike) -> Dict[str, Any]:
    """Read a results JSON written by :meth:`EvalResults.write_json`, checking its shape."""
    path = Path(path)
    if path.is_dir():
        found = sorted(p.name for p in path.glob("results_*.json"))
        hint = f" ({', '.join(found)} there)" if found else ""
        raise DataError(f"{path} is a folder; give the results_<mode>.json file of a mas_eval run{hint}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"results file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), dict):
        raise DataError(f"{path}: not a results file (no 'tasks' object)")
    try:
        suite = suite_of(data)
    except ValueError as e:
        raise DataError(f"{path}: {e}") from None
    for name, entry in data["tasks"].items():
        try:
            known = suite.canonical(name) == name
        except ValueError:
            known = False
        if not known or not isinstance(entry, dict) or not isinstance(entry.get(suite.metric), (int, float)):
            raise DataError(f"{path}: task entry {name!r} needs a known {suite.name} task name and a numeric '{suite.metric}'")
    return data


def markdown_table(runs: Runs) -> str:
    """Runs as their benchmark's table (all runs must share one benchmark).

    Commonsense (the paper's Table 1): one row per run, tasks in the paper's order, then Avg.
    Cells are accuracies in percent with one decimal; a task the run did not evaluate shows
    ``–``. Avg. is the mean over the tasks the run evaluated; when that is not all eight, the
    count follows it, e.g. ``61.2 (3/8)``, since such averages are not comparable.

    Args:
        runs: ``(label, results)`` pairs, ``results`` as written by :meth:`EvalResults.to_dict`.

    Raises:
        ValueError: runs of different benchmarks.
    """
    return _common_suite([results for _, results in runs]).markdown_table(runs)


def suite_of(results: Mapping[str, Any]) -> TaskSuite:
    """The suite of a results object: its registered benchmark's, or, for a user's own tasks
    read in another process, one rebuilt from the task names the file lists.

    Raises:
        ValueError: an unknown benchmark that is not a user-task results file.
    """
    name = results.get("benchmark") or DEFAULT_BENCHMARK
    if name not in BENCHMARKS and results.get("format") == USER_RESULTS_FORMAT:
        return NamedTaskSuite(name, list(results.get("tasks", {})))
    return get_suite(name)


def _common_suite(results: Sequence[Mapping[str, Any]]) -> TaskSuite:
    benchmarks = {r.get("benchmark") or DEFAULT_BENCHMARK for r in results}
    if len(benchmarks) > 1:
        raise DataError(f"cannot tabulate runs of different benchmarks together: {sorted(benchmarks)}")
    if not results:
        return get_suite(None)
    suite = suite_of(results[0])
    if isinstance(suite, NamedTaskSuite) and suite.name not in BENCHMARKS:
        names = [n for r in results for n in r.get("tasks", {})]
        suite = NamedTaskSuite(suite.name, list(dict.fromkeys(names)))
    return suite


def _win_cell(wins: int, compared: int) -> str:
    return MISSING_CELL if compared == 0 else f"{100.0 * wins / compared:.0f}% ({wins}/{compared})"


def win_rate_row(
    pairs: Sequence[Tuple[Mapping[str, Any], Mapping[str, Any]]], label: str = "MAS win rate"
) -> str:
    """The win-rate row under :func:`markdown_table`: how often the challenger beats the baseline.

    Each pair is ``(baseline, challenger)`` results of the *same model* (e.g. causal and MAS
    fine-tunes of Llama-3.2-3B). A *win* is a strictly higher accuracy (a tie is not a win).

    - Task column: wins / models, over the pairs where both runs evaluated that task.
    - Avg. column: wins / compared over every (model, task) cell, i.e. the overall fraction of
      tasks-and-models where the challenger is better.

    Cells read ``75% (3/4)``; a task no pair evaluated shows ``–``.

    Args:
        pairs: ``(baseline_results, challenger_results)``, one per model.
        label (str): the first cell.
    """
    suite = _common_suite([r for pair in pairs for r in pair])
    names = suite.columns(n for pair in pairs for r in pair for n in r.get("tasks", {}))
    cells: List[str] = []
    total_wins = total_compared = 0
    for name in names:
        wins = compared = 0
        for baseline, challenger in pairs:
            b, c = baseline.get("tasks", {}).get(name), challenger.get("tasks", {}).get(name)
            if b is None or c is None:
                continue
            compared += 1
            wins += c[suite.metric] > b[suite.metric]
        cells.append(_win_cell(wins, compared))
        total_wins, total_compared = total_wins + wins, total_compared + compared
    return table_row([label] + cells + [_win_cell(total_wins, total_compared)])
