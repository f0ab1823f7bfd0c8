"""MMLU zero-shot (the paper's Table 4), asked in the commonsense fine-tuning format.

Each question becomes an LLM-Adapters instruction, worded as ARC's and OpenBookQA's rows are::

    Please choose the correct answer to the question: {question}

    Answer1: {A} Answer2: {B} Answer3: {C} Answer4: {D}

    Answer format: answer1/answer2/answer3/answer4

and is prompted with the training template and segments (:func:`instruction_messages`, the
shared :class:`~mas.segments.SegmentBuilder`), so a commonsense-fine-tuned model answers "the
correct answer is answerK" as it learned to. Two modes, as for commonsense:

- ``generate``: greedy generation, then the commonsense answer extraction with ARC's vocabulary
  (``answer1`` .. ``answer5``, the first at word boundaries; ``answer5`` is a wrong answer, not
  "no answer");
- ``loglik``: the four ``answer_template`` sentences are scored; the most likely wins.

Scores (:class:`MMLUSuite`): accuracy per subject; per category (STEM, humanities, social
sciences, other: Hendrycks et al.'s grouping, over the category's questions); and two averages,
``average_accuracy`` over subjects (macro, like the commonsense Avg.) and ``micro_accuracy`` over
questions (the number Hendrycks et al.'s ``evaluate.py`` and lm-evaluation-harness report as
"MMLU"). Which one the paper's Table 4 uses is not stated in what we could check: report both.

Data: see :func:`mas.evaluation.mmlu_data.load_mmlu` (Hendrycks CSV files, ``cais/mmlu`` rows,
or a hub id).
"""

from __future__ import annotations

import difflib
from typing import Any, Dict, List, Mapping, Sequence

from torchtune.data import Message

from mas.data.formats import instruction_messages
from mas.errors import DataError
from mas.evaluation.benchmarks import register_benchmark
from mas.evaluation.mmlu_data import CATEGORIES, CATEGORY_OF, SAMPLE_SOURCE, SUBJECTS, MMLUExample, load_mmlu
from mas.evaluation.records import extraction_records, loglik_records
from mas.evaluation.spec import ANSWER_TEMPLATE, Benchmark, BenchmarkContext, EvalItem
from mas.evaluation.suites import MISSING_CELL, TaskSuite, escape_cell, percent, table_row
from mas.evaluation.tasks import get_task
from mas.errors import ConfigError

__all__ = ["EXTRACTION_TASK", "MMLU", "MMLUSuite", "mmlu_instruction", "mmlu_items", "mmlu_messages"]

#: The commonsense task whose answer vocabulary (answer1..answer5) extraction uses: MMLU rows are
#: worded like ARC's, so they are read the same way.
EXTRACTION_TASK = "ARC-Challenge"


def mmlu_instruction(question: str, choices: Sequence[str]) -> str:
    """The question in the LLM-Adapters multiple-choice wording (see the module docstring)."""
    options = " ".join(f"Answer{k}: {text}" for k, text in enumerate(choices, start=1))
    labels = "/".join(f"answer{k}" for k in range(1, len(choices) + 1))
    return f"Please choose the correct answer to the question: {question}\n\n{options}\n\nAnswer format: {labels}"


def mmlu_messages(example: MMLUExample) -> List[Message]:
    """System and user messages of one question (the fine-tuning template, no answer)."""
    return instruction_messages(mmlu_instruction(example.question, example.choices))


class MMLUSuite(TaskSuite):
    """MMLU: tasks are the 57 subjects (alphabetical), metric accuracy, categories and both averages."""

    name = "mmlu"
    results_format = "mas-mmlu-results/1"

    def canonical(self, task: str) -> str:
        name = str(task).strip().lower().replace(" ", "_")
        if name not in CATEGORY_OF:
            close = difflib.get_close_matches(name, SUBJECTS, n=1, cutoff=0.6)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown MMLU subject '{task}'.{hint} The 57 subjects: {', '.join(SUBJECTS)}")
        return name

    def order(self, tasks) -> List[str]:
        present = set(tasks)
        return [s for s in SUBJECTS if s in present]

    def summary(self, tasks: Mapping[str, Mapping[str, Any]]) -> Dict[str, Any]:
        summary = super().summary(tasks)
        counts = summary["counts"]
        categories = {}
        for category, subjects in CATEGORIES.items():
            mine = [tasks[s] for s in subjects if s in tasks]
            if mine:
                correct, total = sum(c["correct"] for c in mine), sum(c["total"] for c in mine)
                categories[category] = {
                    "accuracy": correct / total, "correct": correct, "total": total,
                    "subjects": len(mine), "of_subjects": len(subjects),
                }
        micro = counts["correct"] / counts["examples"] if counts["examples"] else None
        return {**summary, "micro_accuracy": micro, "categories": categories}

    def markdown_table(self, runs) -> str:
        """One row per run (categories, then the averages over subjects and over questions), then
        one row per evaluated subject with a column per run."""
        header = ["Run"] + [c if c.isupper() else c.capitalize() for c in CATEGORIES] + ["Avg. (subjects)", "Avg. (questions)"]
        lines = [table_row(header), table_row(["---"] + ["---:"] * (len(header) - 1))]
        for label, results in runs:
            categories = results.get("categories", {})
            cells = [percent(categories[c]["accuracy"]) if c in categories else MISSING_CELL for c in CATEGORIES]
            tasks = results.get("tasks", {})
            macro = MISSING_CELL
            if tasks:
                macro = percent(sum(t["accuracy"] for t in tasks.values()) / len(tasks))
                if len(tasks) < len(SUBJECTS):
                    macro += f" ({len(tasks)}/{len(SUBJECTS)})"
            micro = results.get("micro_accuracy")
            cells += [macro, MISSING_CELL if micro is None else percent(micro)]
            lines.append(table_row([escape_cell(label)] + cells))
        subjects = self.order(name for _, results in runs for name in results.get("tasks", {}))
        if subjects:
            lines += ["", table_row(["Subject"] + [escape_cell(label) for label, _ in runs])]
            lines.append(table_row(["---"] + ["---:"] * len(runs)))
            for subject in subjects:
                cells = [
                    percent(r["tasks"][subject]["accuracy"]) if subject in r.get("tasks", {}) else MISSING_CELL
                    for _, r in runs
                ]
                lines.append(table_row([subject] + cells))
        return "\n".join(lines)


def _check_lengths(context: BenchmarkContext, items: Sequence[EvalItem]) -> None:
    """Fail before any work if a question cannot fit: truncating a question would change it."""
    builder, settings = context.builder, context.settings
    if context.mode == "generate":
        limit = (settings.max_cache_len or context.model.max_seq_len) - settings.max_new_tokens
        what = f"the {limit + settings.max_new_tokens}-slot KV cache minus max_new_tokens {settings.max_new_tokens}"
    else:
        limit, what = context.model.max_seq_len, f"the model's max_seq_len {context.model.max_seq_len}"
    longest_answer = items[0].answer_template.format(label="answer4") if items else ""
    too_long = []
    for item in items:
        messages = list(item.messages)
        if context.mode == "loglik":
            messages.append(Message("assistant", longest_answer))
        length = len(builder(messages, for_generation=context.mode == "generate"))
        if length > limit:
            too_long.append(f"{item.where} ({length} tokens)")
    if too_long:
        extra = f" with the longest answer '{longest_answer}'" if context.mode == "loglik" else ""
        raise DataError(
            f"{len(too_long)} MMLU prompt(s){extra} exceed {what} ({limit} tokens): {', '.join(too_long[:5])}"
            + (" ..." if len(too_long) > 5 else "") + "; raise max_cache_len or lower max_new_tokens"
        )


def mmlu_items(context: BenchmarkContext) -> List[EvalItem]:
    """The items of the ``mmlu`` benchmark: the configured subjects (default: every subject in
    the data; data default: the bundled synthetic sample), ``split`` default ``test``, hub
    config default ``all``.

    Raises:
        DataError: bad data (the message names file and row) or a question too long for the model.
        ValueError: an unknown subject.
    """
    data = context.data
    questions = load_mmlu(
        data.source or str(SAMPLE_SOURCE),
        subjects=[MMLUSuite().canonical(s) for s in data.tasks] if data.tasks else None,
        limit=data.limit,
        split=data.split or "test",
        hub_config=data.data_config or "all",
    )
    template = data.answer_template or ANSWER_TEMPLATE
    vocabulary = get_task(EXTRACTION_TASK).answer_labels
    items = [
        EvalItem(
            example.subject, example.index, tuple(mmlu_messages(example)), example.gold, labels=vocabulary,
            options=tuple(f"answer{k}" for k in range(1, len(example.choices) + 1)), answer_template=template,
            where=example.where,
        )
        for rows in questions.values()
        for example in rows
    ]
    _check_lengths(context, items)
    return items


MMLU = register_benchmark(
    Benchmark(name="mmlu", suite=MMLUSuite(), items=mmlu_items, modes={"generate": extraction_records, "loglik": loglik_records})
)
