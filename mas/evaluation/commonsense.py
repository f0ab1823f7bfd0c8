"""Run the commonsense benchmark: prompt, generate or score, extract, record, resume.

Every example is prompted with the fine-tuning template and segments (the shared
:class:`~mas.segments.SegmentBuilder`), so a model is evaluated the way it was trained. Two
modes:

- ``generate``: greedy generation, then the LLM-Adapters answer extraction;
- ``loglik``: each candidate label of the row's "Answer format" is scored as the answer
  ``"the correct answer is <label>"``; the most likely wins (no extraction failure).

Predictions are appended to a JSONL file after every batch; a rerun skips what is there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from torch import nn
from torchtune.data import Message
from tqdm import tqdm

from mas.data.formats import instruction_messages
from mas.evaluation.answers import extract_answer, is_correct
from mas.evaluation.loglik import answer_logprobs, drop_final_eos
from mas.evaluation.results import EvalResults, PredictionRecord, append_predictions, load_done
from mas.evaluation.tasks import TaskData, TaskExample, load_task, parse_options
from mas.generation import GenerationSettings, generate
from mas.segments import SegmentBuilder

__all__ = ["ANSWER_TEMPLATE", "CommonsenseRun", "evaluate_commonsense"]

#: The LLM-Adapters answer sentence; loglik mode scores it for every candidate label.
ANSWER_TEMPLATE = "the correct answer is {label}"


@dataclass
class CommonsenseRun:
    """What to evaluate and how.

    Attributes:
        tasks (Sequence[str]): task names (LLM-Adapters folder names or the paper's headers).
        source (str): folder with ``<task>/test.json`` or ``<task>.json``, or a hub id.
        mode (str): ``generate`` or ``loglik``.
        limit (Optional[int]): first N rows per task.
        batch_size (int): prompts (generate) or candidates (loglik) per forward.
        answer_template (str): the answer sentence scored in loglik mode.
    """

    tasks: Sequence[str]
    source: str
    mode: str = "generate"
    limit: Optional[int] = None
    batch_size: int = 16
    answer_template: str = ANSWER_TEMPLATE


def _prompt(example: TaskExample) -> List[Message]:
    return instruction_messages(example.instruction, example.input)


def _generate_records(
    model: nn.Module, tokenizer: Any, builder: SegmentBuilder, settings: GenerationSettings, data: TaskData, todo: List[TaskExample]
) -> List[PredictionRecord]:
    out = generate(
        model,
        tokenizer,
        [_prompt(e) for e in todo],
        settings=settings,
        prompt_format=builder.prompt_format,
        merge_system_and_user=builder.merge_system_and_user,
    )
    records = []
    for example, text in zip(todo, out.texts):
        prediction = extract_answer(data.task, text)
        records.append(
            PredictionRecord(
                task=data.task.name,
                index=example.index,
                gold=example.answer,
                prediction=prediction,
                correct=is_correct(data.task, prediction, example.answer),
                mode="generate",
                generation=text,
            )
        )
    return records


def _loglik_records(
    model: nn.Module, builder: SegmentBuilder, settings: GenerationSettings, run: CommonsenseRun, data: TaskData, todo: List[TaskExample]
) -> List[PredictionRecord]:
    eos = getattr(builder.tokenizer, "eos_id", None)
    candidates, owners = [], []
    for example in todo:
        labels = list(parse_options(data.task, example.instruction, example.where))
        for label in labels:
            messages = _prompt(example) + [Message("assistant", run.answer_template.format(label=label))]
            candidates.append(drop_final_eos(builder(messages), eos))
            owners.append((example, label))
    scores = answer_logprobs(
        model, candidates, attention=settings.attention, backend=settings.attention_backend, batch_size=run.batch_size
    )
    per_example: Dict[int, Dict[str, float]] = {}
    for (example, label), score in zip(owners, scores):
        per_example.setdefault(example.index, {})[label] = score
    records = []
    for example in todo:
        option_scores = per_example[example.index]
        prediction = max(option_scores, key=option_scores.get)
        records.append(
            PredictionRecord(
                task=data.task.name,
                index=example.index,
                gold=example.answer,
                prediction=prediction,
                correct=prediction == example.answer,
                mode="loglik",
                option_scores=option_scores,
            )
        )
    return records


def evaluate_commonsense(
    model: nn.Module,
    tokenizer: Any,
    builder: SegmentBuilder,
    settings: GenerationSettings,
    run: CommonsenseRun,
    predictions_path: Path,
    *,
    progress: bool = True,
    on_batch: Optional[Callable[[EvalResults], None]] = None,
) -> EvalResults:
    """Evaluate ``run.tasks``; predictions go to ``predictions_path`` (resumed if it exists).

    Args:
        model (nn.Module): the model (MAS attention installed, eval mode).
        tokenizer: its tokenizer.
        builder (SegmentBuilder): the prompt/segment builder (as in training).
        settings (GenerationSettings): generation settings; ``attention`` picks the prompt mask.
        run (CommonsenseRun): tasks, data, mode.
        predictions_path (Path): the per-example JSONL (appended).
        progress (bool): show a progress bar.
        on_batch: called with the running results after every batch.

    Returns:
        EvalResults: all records of this mode, resumed ones included.
    """
    if run.mode not in ("generate", "loglik"):
        raise ValueError(f"mode must be generate or loglik, got {run.mode!r}")
    datasets = [load_task(name, run.source, run.limit) for name in run.tasks]
    done = {k: r for k, r in load_done(predictions_path).items() if r.mode == run.mode} if predictions_path.exists() else {}
    results = EvalResults()
    results.extend(done.values())
    total = sum(len(d) for d in datasets)
    bar = tqdm(total=total, initial=len(done), desc=f"eval [{run.mode}, {settings.attention}]", disable=not progress, dynamic_ncols=True)
    for data in datasets:
        todo = [e for e in data.examples if (data.task.name, e.index) not in done]
        for start in range(0, len(todo), run.batch_size):
            chunk = todo[start : start + run.batch_size]
            if run.mode == "generate":
                records = _generate_records(model, tokenizer, builder, settings, data, chunk)
            else:
                records = _loglik_records(model, builder, settings, run, data, chunk)
            append_predictions(predictions_path, records)
            results.extend(records)
            bar.update(len(chunk))
            accuracy = results.average_accuracy()
            bar.set_postfix(task=data.task.column, avg_acc=f"{100 * accuracy:.1f}" if accuracy is not None else "-")
            if on_batch is not None:
                on_batch(results)
    bar.close()
    return results
