"""Per-example predictions, accuracies, results files and the paper's table.

Files of one evaluation run:

- ``predictions.jsonl``: one :class:`PredictionRecord` per line, appended as examples finish, so
  an interrupted run resumes with :func:`load_done` (a half-written last line is dropped).
- ``results.json``: run metadata (model, config, attention, mode, limit), per-task accuracy,
  counts and no-answer counts, and the average over tasks (the paper's "Avg." column).

:func:`markdown_table` lays runs out as the paper's Table 1 and :func:`win_rate_row` adds the row
comparing a challenger (MAS) with a baseline (causal) model by model.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from mas.data.rows import DataError
from mas.evaluation.tasks import TASK_NAMES, TASKS, get_task

__all__ = [
    "MISSING_CELL",
    "MODES",
    "EvalResults",
    "PredictionRecord",
    "append_predictions",
    "load_done",
    "load_results",
    "markdown_table",
    "win_rate_row",
]

MODES = ("generate", "loglik")
MISSING_CELL = "–"  # en dash: a task the run did not evaluate
RESULTS_FORMAT = "mas-commonsense-results/1"
PathLike = Union[str, Path]


@dataclass
class PredictionRecord:
    """One scored example.

    Attributes:
        task (str): canonical task name.
        index (int): the row's position in the task file.
        gold (str): the gold label.
        prediction (Optional[str]): the predicted label; None is "no answer" (wrong).
        correct (bool): prediction == gold.
        mode (str): "generate" (label read from a generation) or "loglik" (best-scoring option).
        generation (str): the raw generated text ('' in loglik mode).
        option_scores (Optional[Dict[str, float]]): loglik mode's score per option label.
    """

    task: str
    index: int
    gold: str
    prediction: Optional[str]
    correct: bool
    mode: str
    generation: str = ""
    option_scores: Optional[Dict[str, float]] = None

    def __post_init__(self) -> None:
        self.task = get_task(self.task).name
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")

    @property
    def key(self) -> Tuple[str, int]:
        return (self.task, self.index)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PredictionRecord":
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class EvalResults:
    """Accumulates :class:`PredictionRecord`s of one run (one per ``(task, index)``; last wins)."""

    records: Dict[Tuple[str, int], PredictionRecord] = field(default_factory=dict)

    def add(self, record: PredictionRecord) -> None:
        self.records[record.key] = record

    def extend(self, records: Iterable[PredictionRecord]) -> None:
        for record in records:
            self.add(record)

    def task_counts(self) -> Dict[str, Dict[str, Any]]:
        """``{task: {accuracy, correct, total, no_answer}}`` for the evaluated tasks, paper order."""
        counts: Dict[str, Dict[str, Any]] = {}
        for name in TASK_NAMES:
            mine = [r for r in self.records.values() if r.task == name]
            if not mine:
                continue
            correct = sum(r.correct for r in mine)
            no_answer = sum(r.prediction is None for r in mine)
            counts[name] = {
                "accuracy": correct / len(mine), "correct": correct, "total": len(mine), "no_answer": no_answer
            }
        return counts

    def accuracy(self, task: str) -> Optional[float]:
        """Accuracy on one task (0..1), None when no example of it was scored."""
        entry = self.task_counts().get(get_task(task).name)
        return None if entry is None else entry["accuracy"]

    def average_accuracy(self) -> Optional[float]:
        """Mean of the per-task accuracies (each task weighs the same, as the paper's Avg.)."""
        accuracies = [c["accuracy"] for c in self.task_counts().values()]
        return sum(accuracies) / len(accuracies) if accuracies else None

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
            "format": RESULTS_FORMAT,
            "model": model,
            "config": config,
            "attention": attention,
            "mode": mode,
            "limit": limit,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "tasks": tasks,
            "average_accuracy": self.average_accuracy(),
            "counts": {
                "examples": sum(c["total"] for c in tasks.values()),
                "correct": sum(c["correct"] for c in tasks.values()),
                "no_answer": sum(c["no_answer"] for c in tasks.values()),
            },
            "no_answer": {name: c["no_answer"] for name, c in tasks.items()},
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
            f.write((json.dumps(asdict(record), ensure_ascii=False) + "\n").encode("utf-8"))
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
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"results file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), dict):
        raise DataError(f"{path}: not a results file (no 'tasks' object)")
    for name, entry in data["tasks"].items():
        if name not in TASKS or not isinstance(entry, dict) or not isinstance(entry.get("accuracy"), (int, float)):
            raise DataError(f"{path}: task entry {name!r} needs a known task name and a numeric 'accuracy'")
    return data


def _percent(value: float) -> str:
    return f"{100.0 * value:.1f}"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown_table(runs: Sequence[Tuple[str, Mapping[str, Any]]]) -> str:
    """Runs as the paper's Table 1: one row per run, tasks in the paper's order, then Avg.

    Cells are accuracies in percent with one decimal; a task the run did not evaluate shows
    ``–``. Avg. is the mean over the tasks the run evaluated; when that is not all eight, the
    count follows it, e.g. ``61.2 (3/8)``, since such averages are not comparable.

    Args:
        runs: ``(label, results)`` pairs, ``results`` as written by :meth:`EvalResults.to_dict`.
    """
    header = ["Run"] + [TASKS[n].column for n in TASK_NAMES] + ["Avg."]
    lines = [_row(header), _row(["---"] + ["---:"] * (len(header) - 1))]
    for label, results in runs:
        tasks = results.get("tasks", {})
        accuracies = [tasks[n]["accuracy"] for n in TASK_NAMES if n in tasks]
        cells = [_percent(tasks[n]["accuracy"]) if n in tasks else MISSING_CELL for n in TASK_NAMES]
        average = MISSING_CELL
        if accuracies:
            average = _percent(sum(accuracies) / len(accuracies))
            if len(accuracies) < len(TASK_NAMES):
                average += f" ({len(accuracies)}/{len(TASK_NAMES)})"
        lines.append(_row([label.replace("|", "\\|")] + cells + [average]))
    return "\n".join(lines)


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
    cells: List[str] = []
    total_wins = total_compared = 0
    for name in TASK_NAMES:
        wins = compared = 0
        for baseline, challenger in pairs:
            b, c = baseline.get("tasks", {}).get(name), challenger.get("tasks", {}).get(name)
            if b is None or c is None:
                continue
            compared += 1
            wins += c["accuracy"] > b["accuracy"]
        cells.append(_win_cell(wins, compared))
        total_wins, total_compared = total_wins + wins, total_compared + compared
    return _row([label] + cells + [_win_cell(total_wins, total_compared)])
