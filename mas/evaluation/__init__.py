"""Evaluation: the paper's benchmarks (commonsense, MMLU, summarization), a user's own tasks,
scoring, results and run identity.

``mas_eval`` runs a benchmark by name from the one registry (:mod:`mas.evaluation.benchmarks`);
each benchmark turns its data into :class:`EvalItem` (prompted with the shared segment builder,
as in training), one record builder per mode scores them (:mod:`mas.evaluation.records`), the one
resumable loop (:mod:`mas.evaluation.loop`) writes per-example JSONL, and :class:`EvalResults`
write the results JSON and the Markdown table. :mod:`mas.evaluation.identity` keys resumable
predictions by what produced them.
"""

from mas.evaluation.answers import answer_pattern, extract_answer, extract_label, is_correct
from mas.evaluation.benchmarks import BENCHMARKS, MODE_CHOICES, benchmark_modes, get_benchmark, get_suite, register_benchmark
from mas.evaluation.commonsense import COMMONSENSE
from mas.evaluation.identity import RunIdentity, adapter_run_name, experiment_name
from mas.evaluation.loop import evaluate_benchmark, run_resumable
from mas.evaluation.mmlu import MMLU
from mas.evaluation.records import exact_match, extraction_records, loglik_records, text_records
from mas.evaluation.results import (
    EvalResults,
    PredictionRecord,
    append_predictions,
    load_done,
    load_results,
    markdown_table,
    suite_of,
    win_rate_row,
)
from mas.evaluation.spec import ANSWER_TEMPLATE, Benchmark, BenchmarkContext, BenchmarkData, EvalItem
from mas.evaluation.suites import NamedTaskSuite, TaskSuite
from mas.evaluation.summarization import SUMMARIZATION
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
from mas.evaluation.user_tasks import UserTask, load_task_file, parse_user_tasks, register_user_tasks

__all__ = [
    "ANSWER_TEMPLATE",
    "BENCHMARKS",
    "COMMONSENSE",
    "MMLU",
    "MODE_CHOICES",
    "SAMPLE_SOURCE",
    "SUMMARIZATION",
    "TASKS",
    "TASK_NAMES",
    "Benchmark",
    "BenchmarkContext",
    "BenchmarkData",
    "CommonsenseTask",
    "EvalItem",
    "EvalResults",
    "NamedTaskSuite",
    "PredictionRecord",
    "RunIdentity",
    "TaskData",
    "TaskExample",
    "TaskSuite",
    "UserTask",
    "adapter_run_name",
    "answer_pattern",
    "append_predictions",
    "benchmark_modes",
    "evaluate_benchmark",
    "exact_match",
    "experiment_name",
    "extract_answer",
    "extract_label",
    "extraction_records",
    "get_benchmark",
    "get_suite",
    "get_task",
    "is_correct",
    "load_done",
    "load_results",
    "load_task",
    "load_task_file",
    "loglik_records",
    "markdown_table",
    "parse_options",
    "parse_user_tasks",
    "register_benchmark",
    "register_user_tasks",
    "run_resumable",
    "suite_of",
    "text_records",
    "win_rate_row",
]
