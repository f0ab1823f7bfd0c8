"""What a benchmark is: its examples as :class:`EvalItem`, its modes, its suite.

Every benchmark (commonsense, MMLU, summarization, a user's own tasks) is one :class:`Benchmark`
in the one registry (:mod:`mas.evaluation.benchmarks`). A benchmark only turns its data into
items; prompting, scoring, recording and resuming are shared:

- :func:`Benchmark.items` reads the data (typed :class:`BenchmarkData`, never a raw config) and
  returns one :class:`EvalItem` per example: the prompt messages (the fine-tuning template and
  segments), the gold answer, the answer vocabulary and the candidate labels;
- each mode maps to one record builder of :mod:`mas.evaluation.records` (generate + answer
  extraction, log-likelihood over the options, generated text scored by exact match or ROUGE);
- :func:`mas.evaluation.loop.run_resumable` is the one resumable loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from torch import nn
from torchtune.data import Message

from mas.evaluation.suites import ScoredRecord, TaskSuite
from mas.generation import GenerationSettings, InferenceEngine
from mas.segments import SegmentBuilder

__all__ = ["ANSWER_TEMPLATE", "Benchmark", "BenchmarkContext", "BenchmarkData", "EvalItem", "RecordBuilder"]

#: The LLM-Adapters answer sentence; loglik mode scores it for every candidate label.
ANSWER_TEMPLATE = "the correct answer is {label}"


@dataclass(frozen=True)
class EvalItem:
    """One example, ready to prompt and score.

    Attributes:
        task (str): canonical task name in its benchmark.
        index (int): the row's position in its task (the key for resuming).
        messages (Tuple[Message, ...]): system and user messages (no answer), as in training.
        gold (str): the gold label (choice tasks) or reference text.
        labels (Tuple[str, ...]): the answer vocabulary a generation is searched for.
        options (Tuple[str, ...]): the labels scored in loglik mode (the row's own options).
        answer_template (str): the loglik answer sentence, with ``{label}``.
        where (str): file and row, for messages.
        info (Optional[Dict[str, Any]]): kept on the record (``group``, ``truncated_tokens``).
    """

    task: str
    index: int
    messages: Tuple[Message, ...]
    gold: str
    labels: Tuple[str, ...] = ()
    options: Tuple[str, ...] = ()
    answer_template: str = ANSWER_TEMPLATE
    where: str = ""
    info: Optional[Dict[str, Any]] = None

    @property
    def key(self) -> Tuple[str, int]:
        return (self.task, self.index)


@dataclass(frozen=True)
class BenchmarkData:
    """Which data a benchmark reads (the typed ``mas_eval`` keys; None: the benchmark's default).

    Attributes:
        tasks (Optional[Tuple[str, ...]]): tasks, MMLU subjects or data sets (None: all).
        source (Optional[str]): folder, file or hub id (None: the bundled sample).
        split (Optional[str]): hub split or file name (None: ``test``).
        data_config (Optional[str]): hub dataset config.
        limit (Optional[int]): first N examples per task.
        answer_template (Optional[str]): loglik answer sentence with ``{label}``.
    """

    tasks: Optional[Tuple[str, ...]] = None
    source: Optional[str] = None
    split: Optional[str] = None
    data_config: Optional[str] = None
    limit: Optional[int] = None
    answer_template: Optional[str] = None


@dataclass
class BenchmarkContext:
    """Everything a benchmark run needs: the model and how to prompt it, the data, the mode.

    Attributes:
        model (nn.Module): MAS attention installed, eval mode.
        tokenizer: its tokenizer.
        builder (SegmentBuilder): the prompt/segment builder (as in training).
        settings (GenerationSettings): ``attention`` picks the prompt mask; ``batch_size`` the
            examples per batch.
        data (BenchmarkData): which data.
        mode (str): one of the benchmark's modes.
        predictions_path (Path): the per-example JSONL (appended, resumed).
        progress (bool): show a progress bar.
        engine (Optional[InferenceEngine]): the inference engine every generating batch of the
            run shares (its prefix cache prefills a shared system prompt once per run); None:
            each batch makes its own.
    """

    model: nn.Module
    tokenizer: Any
    builder: SegmentBuilder
    settings: GenerationSettings
    data: BenchmarkData
    mode: str
    predictions_path: Path
    progress: bool = True
    engine: Optional[InferenceEngine] = None


#: ``(context, benchmark name, items) -> records`` (:class:`~mas.evaluation.results.PredictionRecord`).
RecordBuilder = Callable[[BenchmarkContext, str, List[EvalItem]], List[ScoredRecord]]


@dataclass(frozen=True)
class Benchmark:
    """One entry of the registry.

    Attributes:
        name (str): ``benchmark:`` in ``mas_eval`` configs; records and results carry it.
        suite (TaskSuite): task names, metric, table.
        items (Callable[[BenchmarkContext], List[EvalItem]]): the examples of ``context.mode``
            (checks that need the model, such as prompt lengths, happen here, before any work).
        modes (Mapping[str, RecordBuilder]): mode name -> record builder ``(context, benchmark
            name, items) -> records``.
        mode_note (str): why a missing mode is missing (for the error message).
        identity (Mapping[str, Any]): what defines the benchmark beyond its name (a user task's
            declaration), part of a run's fingerprint.
    """

    name: str
    suite: TaskSuite
    items: Callable[[BenchmarkContext], List[EvalItem]]
    modes: Mapping[str, RecordBuilder]
    mode_note: str = ""
    identity: Mapping[str, Any] = field(default_factory=dict)
