"""Commonsense evaluation: the eight tasks, answer extraction, results files and tables."""

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
    "answer_pattern",
    "append_predictions",
    "extract_answer",
    "get_task",
    "is_correct",
    "load_done",
    "load_results",
    "load_task",
    "markdown_table",
    "parse_options",
    "win_rate_row",
]
