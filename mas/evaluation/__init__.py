"""Evaluation: the paper's benchmarks (commonsense, MMLU, summarization), scoring and results.

``mas_eval`` runs a benchmark by name through :data:`mas.evaluation.benchmarks.BENCHMARKS`; each
prompts with the shared segment builder (as in training), writes resumable per-example JSONL and
returns :class:`EvalResults`, which write the results JSON and the paper-layout Markdown table.
"""

from mas.evaluation.answers import answer_pattern, extract_answer, is_correct
from mas.evaluation.results import (
    EvalResults,
    PredictionRecord,
    append_predictions,
    load_done,
    load_results,
    markdown_table,
    win_rate_row,
)
from mas.evaluation.suites import TaskSuite, get_suite
from mas.evaluation.tasks import (
    SAMPLE_SOURCE,
    TASK_NAMES,
    TASKS,
    CommonsenseTask,
    TaskData,
    TaskExample,
    get_task,
    load_task,
    parse_options,
)

__all__ = [
    "SAMPLE_SOURCE",
    "TASKS",
    "TASK_NAMES",
    "CommonsenseTask",
    "EvalResults",
    "PredictionRecord",
    "TaskData",
    "TaskExample",
    "TaskSuite",
    "answer_pattern",
    "append_predictions",
    "extract_answer",
    "get_suite",
    "get_task",
    "is_correct",
    "load_done",
    "load_results",
    "load_task",
    "markdown_table",
    "parse_options",
    "win_rate_row",
]
