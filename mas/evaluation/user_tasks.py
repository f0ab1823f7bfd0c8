"""Your own evaluation tasks, declared in the eval config or a small YAML file of their own.

A task file (lm-evaluation-harness style; ``docs/own_task.md`` walks through one)::

    benchmark: letters            # optional: the name mas_eval's `benchmark` key must give
    tasks:
      - name: letters
        rows: letters_test.jsonl  # a .json/.jsonl file, a folder (<name>.jsonl or <name>/<split>.jsonl)
                                  # or a hub id; relative paths are relative to this file
        format: commonsense       # how training prompted: commonsense | alpaca | chat | template
        labels: [a, b, c]         # the answer vocabulary (or option_marker: Option, read per row)
        modes: [generate, loglik, exact]
        group_by: category        # optional: accuracy per value of this field

Keys of one task (:class:`UserTask`): ``name``, ``rows``, ``split`` (default ``test``),
``format``, ``template`` (``format: template``: a ``str.format`` text over the row's fields,
the user segment) and ``system`` (its optional system segment), ``answer_field`` (the gold;
default ``answer``, ``output`` for alpaca, the last assistant message for chat), ``labels`` or
``option_marker``, ``modes``, ``group_by``, ``answer_template`` (loglik answer sentence).

Modes: ``generate`` (greedy generation, then the first label found in the response, as for the
commonsense tasks), ``loglik`` (each label's answer sentence scored after the prompt; the most
likely wins), ``exact`` (the first line of the response equals the gold answer, ignoring case,
spaces and surrounding punctuation). ``generate`` and ``loglik`` need ``labels`` or
``option_marker``; a free-form task has ``exact`` only.

The tasks become one :class:`~mas.evaluation.spec.Benchmark` in the registry, with a
:class:`~mas.evaluation.suites.NamedTaskSuite`: results and tables use the task names and show
only the tasks that were run; the resumable loop, sweeps and ``compare_results`` work unchanged.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Literal, Mapping, Optional, Sequence, Tuple

import yaml
from torchtune.data import Message

from mas.config import ConfigError, suggest
from mas.data.formats import ChatRows, instruction_messages
from mas.data.rows import RowSource, load_rows, optional_text, require_text
from mas.errors import DataError
from mas.evaluation.benchmarks import BENCHMARKS, register_benchmark
from mas.evaluation.identity import data_identity
from mas.evaluation.records import exact_match, extraction_records, loglik_records, text_records
from mas.evaluation.spec import ANSWER_TEMPLATE, Benchmark, BenchmarkContext, EvalItem
from mas.evaluation.suites import NamedTaskSuite
from mas.evaluation.tasks import CommonsenseTask, parse_options

__all__ = ["BUILT_IN_BENCHMARKS", "USER_MODES", "UserTask", "load_task_file", "parse_user_tasks", "register_user_tasks", "user_task_items"]

#: Benchmarks a user's tasks cannot be named after.
BUILT_IN_BENCHMARKS = ("commonsense", "mmlu", "summarization")
USER_MODES = ("generate", "loglik", "exact")
Format = Literal["commonsense", "alpaca", "chat", "template"]
_FORMATS = ("commonsense", "alpaca", "chat", "template")
_MAX_OPTIONS = 26


class _TaskFileLoader(yaml.SafeLoader):
    """YAML with YAML 1.2 booleans: only true/false are booleans, so ``labels: [yes, no]`` stays
    two words (YAML 1.1, and so PyYAML and OmegaConf, read yes/no/on/off as booleans)."""


_TaskFileLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_TaskFileLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


@dataclass(frozen=True)
class UserTask:
    """One declared task (see the module docstring for each key)."""

    name: str
    rows: str
    split: str = "test"
    format: Format = "commonsense"
    template: Optional[str] = None
    system: Optional[str] = None
    answer_field: Optional[str] = None
    labels: Optional[Tuple[str, ...]] = None
    option_marker: Optional[str] = None
    modes: Optional[Tuple[str, ...]] = None
    group_by: Optional[str] = None
    answer_template: Optional[str] = None

    @property
    def scoring_modes(self) -> Tuple[str, ...]:
        """The declared modes, or every mode the task can be scored in."""
        if self.modes:
            return self.modes
        return USER_MODES if (self.labels or self.option_marker) else ("exact",)

    @property
    def gold_field(self) -> Optional[str]:
        if self.answer_field:
            return self.answer_field
        return {"commonsense": "answer", "alpaca": "output", "template": "answer"}.get(self.format)

    def vocabulary(self) -> CommonsenseTask:
        """The task as the commonsense option parser sees it (labels, option marker)."""
        labels = self.labels or tuple(f"{self.option_marker.lower()}{k}" for k in range(1, _MAX_OPTIONS + 1))
        return CommonsenseTask(self.name, self.name, labels, self.option_marker)


def _check_task(raw: Mapping[str, Any], where: str, base_dir: Optional[Path]) -> UserTask:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: a task is a mapping of keys (name, rows, labels, ...), got {raw!r}")
    known = [f.name for f in dataclasses.fields(UserTask)]
    for key in raw:
        if key not in known:
            raise ConfigError(f"{where}: unknown task key '{key}'{suggest(str(key), known)}; task keys: {', '.join(known)}")
    for key in ("name", "rows"):
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            raise ConfigError(f"{where}: '{key}' is required (a non-empty string)")
    name = raw["name"].strip()
    where = f"{where} ('{name}')"
    values: Dict[str, Any] = dict(raw)
    values["name"] = name
    rows = Path(raw["rows"]).expanduser()
    if base_dir is not None and not rows.is_absolute() and (base_dir / rows).exists():
        rows = base_dir / rows
    values["rows"] = str(rows.resolve()) if rows.exists() else raw["rows"]
    if values.get("format", "commonsense") not in _FORMATS:
        fmt = values["format"]
        raise ConfigError(f"{where}: format must be one of {', '.join(_FORMATS)}, got {fmt!r}{suggest(str(fmt), _FORMATS)}")
    if values.get("template") is not None:
        values.setdefault("format", "template")
    if values.get("format") == "template" and not isinstance(values.get("template"), str):
        raise ConfigError(f"{where}: format template needs 'template', a text with {{field}} places for the row's fields")
    for key in ("labels", "modes"):
        value = values.get(key)
        if value is None:
            continue
        if key == "labels" and isinstance(value, Sequence) and not isinstance(value, str):
            # An unquoted true/false in a config is a boolean: BoolQ-style labels (quote yes/no in a
            # config: OmegaConf reads them as booleans too).
            value = [str(v).lower() if isinstance(v, bool) else v for v in value]
        if isinstance(value, str) or not isinstance(value, Sequence) or not value or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: '{key}' must be a non-empty list of strings, got {value!r}")
        values[key] = tuple(v.strip().lower() if key == "labels" else v for v in value)
    bad = [m for m in values.get("modes") or () if m not in USER_MODES]
    if bad:
        raise ConfigError(f"{where}: unknown mode '{bad[0]}'{suggest(bad[0], USER_MODES)}; modes: {', '.join(USER_MODES)}")
    task = UserTask(**values)
    if not (task.labels or task.option_marker) and set(task.scoring_modes) & {"generate", "loglik"}:
        raise ConfigError(
            f"{where}: modes generate and loglik read a label out of the answer: give 'labels' (the answer "
            "vocabulary) or 'option_marker', or use modes: [exact]"
        )
    if task.answer_template is not None and "{label}" not in task.answer_template:
        raise ConfigError(f"{where}: answer_template must contain {{label}}, got {task.answer_template!r}")
    return task


def parse_user_tasks(declared: Any, where: str, base_dir: Optional[Path] = None) -> List[UserTask]:
    """Check declared tasks (a list of mappings) and return them.

    Args:
        declared: the ``tasks`` list of a task file, or ``user_tasks`` of the eval config.
        where (str): where they were declared, for messages.
        base_dir (Optional[Path]): relative ``rows`` paths are looked up here first.

    Raises:
        ConfigError: a missing or unknown key (with the closest one), a bad value, a repeated name.
    """
    if not isinstance(declared, Sequence) or isinstance(declared, str) or not declared:
        raise ConfigError(f"{where}: expected a non-empty list of tasks, got {declared!r}")
    tasks = [_check_task(raw, f"{where}, task {i}", base_dir) for i, raw in enumerate(declared)]
    names = [t.name for t in tasks]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"{where}: task name '{repeated[0]}' is declared twice")
    return tasks


def load_task_file(path: str | Path) -> Tuple[Optional[str], List[UserTask]]:
    """Read a task file: its ``benchmark`` name (None if it has none) and its tasks.

    Raises:
        ConfigError: a missing or unreadable file, or a bad declaration (naming file and task).
    """
    path = Path(path).expanduser()
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_TaskFileLoader)
    except FileNotFoundError:
        raise ConfigError(f"task_file not found: {path}") from None
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read the task file ({type(e).__name__}: {e})") from None
    if not isinstance(data, Mapping) or "tasks" not in data:
        raise ConfigError(f"{path}: a task file is a mapping with a 'tasks' list (and an optional 'benchmark' name)")
    unknown = [k for k in data if k not in ("benchmark", "tasks")]
    if unknown:
        raise ConfigError(f"{path}: unknown key '{unknown[0]}'{suggest(str(unknown[0]), ['benchmark', 'tasks'])}; a task file has benchmark and tasks")
    name = data.get("benchmark")
    if name is not None and not isinstance(name, str):
        raise ConfigError(f"{path}: 'benchmark' must be a name, got {name!r}")
    return name, parse_user_tasks(data["tasks"], str(path), base_dir=path.parent)


def _task_rows(task: UserTask) -> RowSource:
    path = Path(task.rows)
    if path.is_dir():
        for candidate in (path / f"{task.name}.jsonl", path / f"{task.name}.json", path / task.name / f"{task.split}.jsonl",
                          path / task.name / f"{task.split}.json", path / f"{task.split}.jsonl", path / f"{task.split}.json"):  # fmt: skip
            if candidate.is_file():
                return load_rows(str(candidate))
        raise DataError(f"no rows for task '{task.name}' under {path} (looked for {task.name}.jsonl, {task.name}/{task.split}.jsonl, {task.split}.jsonl and .json)")
    return load_rows(task.rows, split=task.split)


def _prompt(task: UserTask, row: Mapping[str, Any], where: str) -> Tuple[List[Message], str]:
    """The prompt messages of a row (no answer) and the text its options are written in."""
    if task.format in ("commonsense", "alpaca"):
        instruction = require_text(row, "instruction", where)
        return instruction_messages(instruction, optional_text(row, "input", where)), instruction
    if task.format == "chat":
        messages = ChatRows()(row, where, with_answer=False)
        user = [m for m in messages if m.role == "user"]
        return messages, user[-1].text_content if user else ""
    try:
        text = task.template.format(**row)
    except KeyError as e:
        raise DataError(f"{where}: the template of task '{task.name}' uses field {e}, which the row lacks (row has {sorted(row)})") from None
    except (IndexError, ValueError) as e:
        raise ConfigError(f"task '{task.name}': bad template ({e}); use {{field}} places for the row's fields") from None
    messages = [Message("system", task.system, masked=True)] if task.system else []
    return messages + [Message("user", text, masked=True)], text


def _gold(task: UserTask, row: Mapping[str, Any], where: str) -> str:
    field = task.gold_field
    if field is not None:
        value = row.get(field)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{where}: missing gold answer field '{field}' (row has {sorted(row)}); set answer_field")
        return value
    answer = ChatRows()(row, where, with_answer=True)[-1]
    return answer.text_content


def _task_items(task: UserTask, mode: str, limit: Optional[int], default_template: str) -> List[EvalItem]:
    rows = _task_rows(task)
    count = len(rows) if limit is None else min(limit, len(rows))
    template = task.answer_template or default_template
    vocabulary = task.vocabulary() if (task.labels or task.option_marker) else None
    items = []
    for i in range(count):
        row, where = rows.rows[i], rows.where(i)
        messages, options_text = _prompt(task, row, where)
        gold = _gold(task, row, where).strip()
        labels: Tuple[str, ...] = ()
        if vocabulary is not None and mode != "exact":
            labels = tuple(parse_options(vocabulary, options_text, where)) if task.option_marker else vocabulary.answer_labels
            gold = gold.lower()
            if gold not in labels:
                raise DataError(f"{where}: gold answer '{gold}' is not one of the labels {list(labels)} of task '{task.name}'")
        info = None
        if task.group_by is not None:
            if row.get(task.group_by) is None:
                raise DataError(f"{where}: missing group_by field '{task.group_by}' (row has {sorted(row)})")
            info = {"group": str(row[task.group_by])}
        items.append(EvalItem(
            task.name, i, tuple(messages), gold, labels=labels, options=labels if mode == "loglik" else (),
            answer_template=template, where=where, info=info,
        ))  # fmt: skip
    return items


def user_task_items(tasks: Sequence[UserTask], context: BenchmarkContext) -> List[EvalItem]:
    """The items of the tasks (those asked for by ``context.data.tasks``) that have ``context.mode``.

    Raises:
        ConfigError: an unknown task name, or no asked-for task has the mode.
        DataError: a bad row (naming file and row).
    """
    by_name = {t.name: t for t in tasks}
    wanted = list(context.data.tasks) if context.data.tasks else list(by_name)
    for name in wanted:
        if name not in by_name:
            raise ConfigError(f"tasks: unknown task '{name}'{suggest(name, by_name)}; your tasks: {', '.join(by_name)}")
    chosen = [by_name[n] for n in wanted if context.mode in by_name[n].scoring_modes]
    if not chosen:
        raise ConfigError(f"none of the tasks {wanted} is scored in mode {context.mode}; their modes: "
                          + "; ".join(f"{n}: {', '.join(by_name[n].scoring_modes)}" for n in wanted))  # fmt: skip
    template = context.data.answer_template or ANSWER_TEMPLATE
    items: List[EvalItem] = []
    for task in chosen:
        items += _task_items(task, context.mode, context.data.limit, template)
    return items


def register_user_tasks(name: str, tasks: Sequence[UserTask]) -> Benchmark:
    """Register the tasks as benchmark ``name`` (replacing an earlier user benchmark of that name).

    Raises:
        ConfigError: ``name`` is a built-in benchmark.
    """
    if name in BUILT_IN_BENCHMARKS:
        raise ConfigError(f"your tasks need a benchmark name of their own, not the built-in '{name}': set benchmark=<your name>")
    modes = [m for m in USER_MODES if any(m in t.scoring_modes for t in tasks)]
    builders = {"generate": extraction_records, "loglik": loglik_records, "exact": text_records(exact_match, "exact")}
    identity = {
        "tasks": [dataclasses.asdict(t) for t in tasks],
        "rows": {t.name: data_identity(t.rows, t.split, None) for t in tasks},
    }
    benchmark = Benchmark(
        name=name,
        suite=NamedTaskSuite(name, [t.name for t in tasks]),
        items=lambda context: user_task_items(tasks, context),
        modes={m: builders[m] for m in modes},
        mode_note="modes come from the tasks' declarations",
        identity=identity,
    )
    return register_benchmark(benchmark, replace=name in BENCHMARKS)
