"""Read the predicted answer label out of a generated response, as LLM-Adapters' evaluation does.

The rule, for a task with answer vocabulary ``V`` (see :mod:`mas.evaluation.tasks`):

1. Search the generated text for every item of ``V``, **case-insensitively**.
2. An occurrence counts only at **word boundaries**: the characters just before and just after it
   must not be a letter or a digit (any script). So ``untrue``, ``trueish``, ``answer10`` and
   ``answer1a`` hold no answer, while ``Answer1:``, ``(true)``, ``"answer2".`` and ``option2_`` do.
3. The prediction is the item whose occurrence **starts first** in the text, returned in the
   vocabulary's spelling (lower case). Later mentions are ignored, so "true, not false" predicts
   ``true`` and "answer4 ... answer2" predicts ``answer4``.
4. No occurrence: the prediction is None ("no answer"), which is scored as wrong.

Differences from LLM-Adapters' ``re.findall("true|false", ...)``-style extraction, which is
case-sensitive and has no boundaries: there "True" is no answer, "untrue" reads as ``true`` and
"answer10" as ``answer1``. Here those read as ``true``, no answer and no answer. Pass the
*generated response only*: the prompt itself lists the labels ("Answer format: true/false").
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Optional, Sequence, Tuple, Union

from mas.evaluation.tasks import CommonsenseTask, get_task
from mas.errors import DataError

__all__ = ["answer_pattern", "extract_answer", "extract_label", "is_correct", "labels_pattern"]


@lru_cache(maxsize=None)
def labels_pattern(labels: Tuple[str, ...]) -> "re.Pattern[str]":
    """The compiled search pattern for an answer vocabulary: one capture group per label, in order.

    ``[^\\W_]`` is "a letter or a digit" (``\\w`` without the underscore), in any script.
    """
    alternatives = "|".join(f"({re.escape(label)})" for label in labels)
    return re.compile(rf"(?<![^\W_])(?:{alternatives})(?![^\W_])", re.IGNORECASE)


def answer_pattern(task_name: str) -> "re.Pattern[str]":
    """:func:`labels_pattern` of a commonsense task's vocabulary."""
    return labels_pattern(get_task(task_name).answer_labels)


def extract_label(labels: Sequence[str], generated_text: Optional[str]) -> Optional[str]:
    """The first label of ``labels`` found in ``generated_text`` (the rule above), or None.

    Every benchmark with an answer vocabulary (commonsense, MMLU, a user's task) reads its
    generations with this one function.

    Args:
        labels (Sequence[str]): the answer vocabulary, lower case.
        generated_text (Optional[str]): the response (not the prompt); non-strings give None.
    """
    if not isinstance(generated_text, str) or not generated_text or not labels:
        return None
    labels = tuple(labels)
    found = labels_pattern(labels).search(generated_text)
    if found is None:
        return None
    # lastindex is the (1-based) group that matched, i.e. the vocabulary position: this maps
    # case-folded matches ("ſolution1" matches under IGNORECASE) back to the canonical label.
    return labels[found.lastindex - 1]


def extract_answer(task_name: Union[str, CommonsenseTask], generated_text: Optional[str]) -> Optional[str]:
    """The answer label a generated response gives, or None for "no answer".

    Args:
        task_name (str | CommonsenseTask): the task (canonical name, paper header, or the task).
        generated_text (Optional[str]): the model's response (without the prompt). Any string is
            accepted, including empty or non-ASCII text; None and non-strings give None.

    Returns:
        Optional[str]: the first vocabulary item found (lower case, as in the vocabulary), else None.

    Raises:
        ValueError: only for an unknown task name, never for the text.

    Example:
        >>> extract_answer("piqa", "The correct answer is Solution2.")
        'solution2'
        >>> extract_answer("boolq", "untrue") is None
        True
    """
    return extract_label(get_task(task_name).answer_labels, generated_text)


def is_correct(task: Union[str, CommonsenseTask], prediction: Optional[str], gold: str) -> bool:
    """Whether an extracted prediction is the gold label; "no answer" (None) is wrong.

    Args:
        task (str | CommonsenseTask): the task; ``gold`` must be in its vocabulary.
        prediction (Optional[str]): the output of :func:`extract_answer`.
        gold (str): the row's ``answer``.

    Raises:
        ValueError: an unknown task or a gold label outside its vocabulary (a data bug, not a
            model error).
    """
    task = get_task(task)
    gold_label = gold.strip().lower()
    if gold_label not in task.answer_labels:
        raise DataError(f"gold answer {gold!r} is not one of the {task.name} answers {list(task.answer_labels)}")
    return prediction is not None and prediction.strip().lower() == gold_label
