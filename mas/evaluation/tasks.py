"""The eight commonsense tasks of the paper, in the LLM-Adapters format, and their loader.

Each task's ``test.json`` is a JSON list of rows::

    {"instruction": "Please choose the correct solution to the question: ornament\\n\\n"
                    "Solution1: can decorate tree \\n\\nSolution2: can decorate desk  \\n\\n"
                    "Answer format: solution1/solution2",
     "input": "", "output": "the correct answer is solution1", "answer": "solution1"}

A task's *answer vocabulary* is the list of labels LLM-Adapters' evaluation searches a generation
for (``true``/``false``, ``solution1``/``2``, ``answer1``..``5``, ``ending1``..``4``,
``option1``/``2``). SIQA, ARC and OBQA share ``answer1``..``answer5``, as in LLM-Adapters, so a
SIQA generation naming ``answer4`` is a (wrong) answer, not "no answer". The labels a single row
offers come from its own instruction: :func:`parse_options`.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

from mas.data.rows import DataError, RowSource, load_rows, optional_text, require_text
from mas.errors import ConfigError

__all__ = [
    "SAMPLE_SOURCE",
    "TASKS",
    "TASK_NAMES",
    "CommonsenseTask",
    "TaskData",
    "TaskExample",
    "get_task",
    "load_task",
    "parse_options",
]

#: The 25-rows-per-task real sample bundled with the package (flat ``<name>.json`` files).
SAMPLE_SOURCE = Path(__file__).resolve().parents[1] / "assets" / "commonsense" / "test_sample"


@dataclass(frozen=True)
class CommonsenseTask:
    """One evaluation task.

    Attributes:
        name (str): the LLM-Adapters dataset folder name, e.g. ``"ARC-Easy"``.
        column (str): the paper's column header, e.g. ``"ARC-e"``.
        answer_labels (Tuple[str, ...]): the answer vocabulary, in order.
        option_marker (Optional[str]): how the instruction introduces option k (``"Solution"`` for
            ``"Solution1: ..."``); None when each label is its own option text (BoolQ).
    """

    name: str
    column: str
    answer_labels: Tuple[str, ...]
    option_marker: Optional[str]


def _numbered(prefix: str, count: int) -> Tuple[str, ...]:
    return tuple(f"{prefix}{k}" for k in range(1, count + 1))


_TASK_LIST = [
    CommonsenseTask("boolq", "BoolQ", ("true", "false"), None),
    CommonsenseTask("piqa", "PIQA", _numbered("solution", 2), "Solution"),
    CommonsenseTask("social_i_qa", "SIQA", _numbered("answer", 5), "Answer"),
    CommonsenseTask("hellaswag", "HellaSwag", _numbered("ending", 4), "Ending"),
    CommonsenseTask("winogrande", "WinoGrande", _numbered("option", 2), "Option"),
    CommonsenseTask("ARC-Easy", "ARC-e", _numbered("answer", 5), "Answer"),
    CommonsenseTask("ARC-Challenge", "ARC-c", _numbered("answer", 5), "Answer"),
    CommonsenseTask("openbookqa", "OBQA", _numbered("answer", 5), "Answer"),
]
#: The tasks by canonical name, in the paper's column order.
TASKS: Dict[str, CommonsenseTask] = {t.name: t for t in _TASK_LIST}
TASK_NAMES: Tuple[str, ...] = tuple(TASKS)
# Case-insensitive names and the paper's headers also resolve ("siqa", "ARC-e", "OBQA").
_ALIASES = {alias.lower(): t for t in _TASK_LIST for alias in (t.name, t.column)}


def get_task(name: Union[str, CommonsenseTask]) -> CommonsenseTask:
    """The task called ``name`` (canonical name or paper header, any case).

    Raises:
        ValueError: an unknown name; the message lists the valid names and the closest one.
    """
    if isinstance(name, CommonsenseTask):
        return name
    task = _ALIASES.get(str(name).strip().lower())
    if task is None:
        close = difflib.get_close_matches(str(name).lower(), list(_ALIASES), n=1, cutoff=0.5)
        hint = f" Did you mean '{_ALIASES[close[0]].name}'?" if close else ""
        raise ConfigError(f"unknown commonsense task '{name}'; valid tasks: {', '.join(TASK_NAMES)}.{hint}")
    return task


@dataclass(frozen=True)
class TaskExample:
    """One validated test row.

    Attributes:
        index (int): position of the row in its file (stable key for resuming a run).
        instruction (str): the question, its options and the answer format.
        input (str): usually empty.
        output (str): the reference response ("the correct answer is X"); may be empty.
        answer (str): the gold label, lower case, from the task's vocabulary.
        where (str): file and row, for messages.
    """

    index: int
    instruction: str
    input: str
    output: str
    answer: str
    where: str


@dataclass(frozen=True)
class TaskData:
    """The examples of one task and where they came from."""

    task: CommonsenseTask
    source: str
    examples: Tuple[TaskExample, ...]

    def __len__(self) -> int:
        return len(self.examples)


_ANSWER_FORMAT = "Answer format:"


def parse_options(
    task: Union[str, CommonsenseTask], instruction: str, where: str = "instruction"
) -> Dict[str, str]:
    """The candidate answers of one row: ``{label: option text}``, in label order.

    BoolQ's labels are their own texts (``{"true": "true", "false": "false"}``). Otherwise the
    text after the last ``"Answer format:"`` is dropped, and option k is the text between
    ``"{Marker}k:"`` and ``"{Marker}k+1:"`` (stripped), searched in order from the first
    ``"{Marker}1:"``; the number of options must match the labels listed after ``"Answer
    format:"`` when that line exists.

    Args:
        task (str | CommonsenseTask): the task.
        instruction (str): the row's instruction.
        where (str): file and row, for messages.

    Returns:
        Dict[str, str]: e.g. ``{"solution1": "can decorate tree", "solution2": "can decorate desk"}``.

    Raises:
        DataError: no options found, an empty option, a label outside the vocabulary, or a count
            that disagrees with the answer-format line.
    """
    task = get_task(task)
    if task.option_marker is None:
        return {label: label for label in task.answer_labels}
    cut = instruction.rfind(_ANSWER_FORMAT)
    body = instruction if cut < 0 else instruction[:cut]
    starts: List[Tuple[int, int]] = []  # (marker start, text start) of options 1, 2, ...
    position = 0
    while True:
        # Not preceded by a letter/digit, so "Answer1:" is not found inside "XAnswer1:".
        marker = re.compile(rf"(?<![^\W_]){task.option_marker}{len(starts) + 1}:")
        found = marker.search(body, position)
        if found is None:
            break
        starts.append((found.start(), found.end()))
        position = found.end()
    if not starts:
        raise DataError(f"{where}: no '{task.option_marker}1:' option found in the {task.name} instruction")
    options: Dict[str, str] = {}
    for k, (_, text_start) in enumerate(starts):
        text_end = starts[k + 1][0] if k + 1 < len(starts) else len(body)
        label = f"{task.option_marker.lower()}{k + 1}"
        text = body[text_start:text_end].strip()
        if label not in task.answer_labels:
            raise DataError(f"{where}: option '{label}' is outside the {task.name} answers {list(task.answer_labels)}")
        if not text:
            raise DataError(f"{where}: option '{label}' has no text")
        options[label] = text
    if cut >= 0:
        listed = [s for s in re.split(r"[/\s]+", instruction[cut + len(_ANSWER_FORMAT) :].strip().lower()) if s]
        if listed and listed != list(options):
            raise DataError(f"{where}: found options {list(options)} but the answer format lists {listed}")
    return options


def _task_rows(task: CommonsenseTask, source: str) -> RowSource:
    """The rows of ``task`` from a file, an LLM-Adapters ``dataset/`` folder, a flat folder or a hub id."""
    path = Path(source).expanduser()
    if path.is_file():
        return load_rows(str(path))
    if path.is_dir():
        candidates = [path / task.name / f"test{ext}" for ext in (".json", ".jsonl")]
        candidates += [path / f"{task.name}{ext}" for ext in (".json", ".jsonl")]
        for candidate in candidates:
            if candidate.is_file():
                return load_rows(str(candidate))
        tried = ", ".join(str(c) for c in candidates)
        raise DataError(f"no test file for task '{task.name}' under {path} (looked for {tried})")
    if str(source).startswith((".", "/", "~")) or path.suffix in (".json", ".jsonl"):
        raise DataError(f"task source not found: {source}")
    # A hub dataset laid out like LLM-Adapters' dataset/ folder: <repo>/<task>/test.json.
    return load_rows(str(source), split="test", data_files={"test": f"{task.name}/test.json"})


def load_task(
    name: Union[str, CommonsenseTask],
    source: Union[str, Path] = SAMPLE_SOURCE,
    limit: Optional[int] = None,
    *,
    check_options: bool = False,
) -> TaskData:
    """Load and validate one task's test rows.

    ``source`` is looked up in this order: a file (the task's rows themselves); a folder holding
    ``<name>/test.json`` (LLM-Adapters' ``dataset/`` layout) or ``<name>.json`` (flat, like
    :data:`SAMPLE_SOURCE`), ``.jsonl`` accepted too; else a hub dataset id whose files follow the
    LLM-Adapters layout (needs network).

    Args:
        name (str | CommonsenseTask): the task (see :func:`get_task`).
        source (str | Path): where the rows are. Default: the bundled 25-row sample.
        limit (Optional[int]): keep only the first ``limit`` rows (only those are validated).
        check_options (bool): also parse every row's options (for log-likelihood scoring) and check
            that the gold answer is one of them. Default False.

    Returns:
        TaskData: the validated examples, ``index`` = position in the file.

    Raises:
        ValueError: an unknown task name or a ``limit`` below 1.
        DataError: a missing file, or a row without a non-empty ``instruction`` or ``answer``, or an
            answer outside the task's vocabulary; the message names the file, row and field.
    """
    task = get_task(name)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit must be a positive integer or None, got {limit!r}")
    rows = _task_rows(task, str(source))
    count = len(rows) if limit is None else min(limit, len(rows))
    examples = []
    for i in range(count):
        row, where = rows.rows[i], rows.where(i)
        instruction = require_text(row, "instruction", where)
        answer = require_text(row, "answer", where).strip().lower()
        if answer not in task.answer_labels:
            raise DataError(
                f"{where}: field 'answer' is {row['answer']!r}, not one of the {task.name} "
                f"answers {list(task.answer_labels)}"
            )
        if check_options:
            options = parse_options(task, instruction, where)
            if answer not in options:
                raise DataError(f"{where}: answer '{answer}' is not among the row's options {list(options)}")
        input_text = optional_text(row, "input", where)
        output = optional_text(row, "output", where)
        examples.append(TaskExample(i, instruction, input_text, output, answer, where))
    return TaskData(task, rows.name, tuple(examples))
