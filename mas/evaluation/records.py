"""One record builder per scoring mode, shared by every benchmark.

- :func:`extraction_records` (``generate``): greedy generation, then the answer label read out of
  the response with :func:`~mas.evaluation.answers.extract_label` over the item's vocabulary;
- :func:`loglik_records` (``loglik``): every candidate label's answer sentence is scored after
  the prompt (:func:`~mas.evaluation.loglik.answer_logprobs`); the most likely wins;
- :func:`text_records` (``generate`` for summarization, ``exact`` for user tasks): the generated
  text itself is the prediction, scored by a function of (prediction, reference): ROUGE or exact
  match (:func:`exact_match`).

A builder takes the context, the benchmark's name (which its records carry) and a batch of
:class:`~mas.evaluation.spec.EvalItem`, and returns their records in the same order.
"""

from __future__ import annotations

import re
from typing import Callable, Dict, List, Optional, Tuple

from torchtune.data import Message

from mas.evaluation.answers import extract_label
from mas.evaluation.loglik import answer_logprobs, drop_final_eos
from mas.evaluation.results import PredictionRecord
from mas.evaluation.spec import BenchmarkContext, EvalItem, RecordBuilder
from mas.generation import generate

__all__ = ["TextScorer", "exact_match", "extraction_records", "loglik_records", "normalize_answer", "text_records"]

#: ``(prediction, reference) -> (correct or None, per-example scores or None)``.
TextScorer = Callable[[str, str], Tuple[Optional[bool], Optional[Dict[str, float]]]]


def _generate(context: BenchmarkContext, items: List[EvalItem]) -> List[str]:
    builder = context.builder
    out = generate(
        context.model,
        context.tokenizer,
        [list(item.messages) for item in items],
        settings=context.settings,
        prompt_format=builder.prompt_format,
        merge_system_and_user=builder.merge_system_and_user,
        engine=context.engine,
    )
    return list(out.texts)


def extraction_records(context: BenchmarkContext, benchmark: str, items: List[EvalItem]) -> List[PredictionRecord]:
    """Generate, then read the answer label out of each response (``generate`` mode)."""
    records = []
    for item, text in zip(items, _generate(context, items)):
        prediction = extract_label(item.labels, text)
        records.append(PredictionRecord(
            item.task, item.index, item.gold, prediction, prediction is not None and prediction == item.gold,
            "generate", generation=text, info=item.info, benchmark=benchmark,
        ))  # fmt: skip
    return records


def loglik_records(context: BenchmarkContext, benchmark: str, items: List[EvalItem]) -> List[PredictionRecord]:
    """Score every option's answer sentence after the prompt; the most likely wins (``loglik``)."""
    builder, settings = context.builder, context.settings
    eos = getattr(builder.tokenizer, "eos_id", None)
    candidates, owners = [], []
    for position, item in enumerate(items):
        for label in item.options:
            messages = list(item.messages) + [Message("assistant", item.answer_template.format(label=label))]
            candidates.append(drop_final_eos(builder(messages), eos))
            owners.append((position, label))
    scores = answer_logprobs(
        context.model, candidates, attention=settings.attention, backend=settings.attention_backend,
        batch_size=settings.batch_size,
    )  # fmt: skip
    by_item: Dict[int, Dict[str, float]] = {}
    for (position, label), score in zip(owners, scores):
        by_item.setdefault(position, {})[label] = score
    records = []
    for position, item in enumerate(items):
        option_scores = by_item[position]
        prediction = max(option_scores, key=option_scores.get)
        records.append(PredictionRecord(
            item.task, item.index, item.gold, prediction, prediction == item.gold, "loglik",
            option_scores=option_scores, info=item.info, benchmark=benchmark,
        ))  # fmt: skip
    return records


def text_records(score: TextScorer, mode: str) -> RecordBuilder:
    """A builder that generates and scores the text itself with ``score`` (ROUGE, exact match).

    Args:
        score (TextScorer): ``(prediction, reference) -> (correct, scores)``.
        mode (str): the records' mode (``generate`` for summarization, ``exact`` for user tasks).
    """

    def build(context: BenchmarkContext, benchmark: str, items: List[EvalItem]) -> List[PredictionRecord]:
        records = []
        for item, text in zip(items, _generate(context, items)):
            prediction = text.strip()
            correct, scores = score(prediction, item.gold)
            records.append(PredictionRecord(
                item.task, item.index, item.gold, prediction or None, correct, mode, generation=text,
                scores=scores, info=item.info, benchmark=benchmark,
            ))  # fmt: skip
        return records

    build.__name__ = f"text_records_{mode}"
    return build


def normalize_answer(text: str) -> str:
    """Lower case, surrounding punctuation and spaces dropped, inner runs of spaces made one."""
    text = re.sub(r"\s+", " ", text.strip().lower())
    return text.strip(" .,;:!?\"'()[]")


def exact_match(prediction: str, reference: str) -> Tuple[Optional[bool], Optional[Dict[str, float]]]:
    """Exact match after :func:`normalize_answer`; the first line of the response is the answer."""
    first_line = prediction.strip().split("\n", 1)[0] if prediction else ""
    return normalize_answer(first_line) == normalize_answer(reference), None
