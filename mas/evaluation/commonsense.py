"""The commonsense benchmark (the paper's Table 1): its rows as evaluation items.

Every example is prompted with the fine-tuning template and segments (the shared
:class:`~mas.segments.SegmentBuilder`), so a model is evaluated the way it was trained. Two
modes, both built by :mod:`mas.evaluation.records`:

- ``generate``: greedy generation, then the LLM-Adapters answer extraction over the task's
  vocabulary;
- ``loglik``: each candidate label of the row's "Answer format" is scored as the answer
  ``"the correct answer is <label>"``; the most likely wins (no extraction failure).

Predictions are appended to a JSONL file after every batch; a rerun skips what is there
(:mod:`mas.evaluation.loop`).
"""

from __future__ import annotations

from pathlib import Path
from typing import List

from mas.data.formats import instruction_messages
from mas.errors import ConfigError
from mas.evaluation.benchmarks import register_benchmark
from mas.evaluation.records import extraction_records, loglik_records
from mas.evaluation.spec import ANSWER_TEMPLATE, Benchmark, BenchmarkContext, EvalItem
from mas.evaluation.suites import TaskSuite
from mas.evaluation.tasks import SAMPLE_SOURCE, TASK_NAMES, TaskData, load_task, parse_options

__all__ = ["COMMONSENSE", "commonsense_items"]


def _items(data: TaskData, mode: str, answer_template: str) -> List[EvalItem]:
    items = []
    for example in data.examples:
        # loglik scores the row's own options, read from its instruction only when needed, so a
        # row whose options cannot be parsed still runs in generate mode.
        options = tuple(parse_options(data.task, example.instruction, example.where)) if mode == "loglik" else ()
        items.append(EvalItem(
            data.task.name, example.index, tuple(instruction_messages(example.instruction, example.input)),
            example.answer, labels=data.task.answer_labels, options=options, answer_template=answer_template,
            where=example.where,
        ))  # fmt: skip
    return items


def commonsense_items(context: BenchmarkContext) -> List[EvalItem]:
    """The items of the configured commonsense tasks (default: the eight, on the bundled sample).

    Raises:
        ValueError: an unknown task name.
        DataError: a missing file or a bad row (naming the file and row).
    """
    data = context.data
    if data.source and Path(data.source).expanduser().is_file():
        # One file would be read as every task's rows (another task's rows scored where labels fit).
        raise ConfigError(
            f"data_dir={data.source} is a file; the commonsense benchmark reads a folder with one file per "
            "task (<task>/test.json or <task>.json): set data_dir to that folder"
        )
    source = data.source or str(SAMPLE_SOURCE)
    template = data.answer_template or ANSWER_TEMPLATE
    items: List[EvalItem] = []
    for name in data.tasks or TASK_NAMES:
        items += _items(load_task(name, source, data.limit), context.mode, template)
    return items


COMMONSENSE = register_benchmark(
    Benchmark(
        name="commonsense",
        suite=TaskSuite(),
        items=commonsense_items,
        modes={"generate": extraction_records, "loglik": loglik_records},
    )
)
