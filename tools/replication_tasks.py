"""The synthetic yes/no tasks of the miniature replication (``tools/replicate.py``).

Each task asks a question *after* a list of letters, so under a causal prompt mask no list token
can see the question, while under MAS the whole user segment attends to itself both ways:

- ``membership``: "List: d k p d\\nDoes the letter t appear in the list?" (4 letters, lists of
  3-6; the letter asked about is any of the 4);
- ``majority``: "List: v j v v j\\nAre there more v than j?" (2 letters, odd lists of 5-11).

Rows are in the commonsense (LLM-Adapters) format, so the fine-tuning recipe, the format-only
base and ``mas_eval``'s task file read them as they read any user's rows. Labels are balanced
(each row's label is drawn first, then a list with that answer). The held-out rows are distinct
questions, and no training or pre-training row asks any of them (asserted).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Set, Tuple

__all__ = ["LABELS", "TASKS", "TaskSplits", "make_splits", "task_file_text", "write_jsonl"]

#: The answer vocabulary of both tasks (log-likelihood scoring compares the two).
LABELS = ("yes", "no")
_FORMAT = "\n\nAnswer format: yes/no"

Row = Dict[str, str]


def _membership(rng: random.Random, answer: str) -> str:
    letters = ("d", "k", "p", "t")
    while True:
        items = [rng.choice(letters) for _ in range(rng.randint(3, 6))]
        asked = rng.choice(letters)
        if (asked in items) == (answer == "yes"):
            return f"List: {' '.join(items)}\nDoes the letter {asked} appear in the list?"


def _majority(rng: random.Random, answer: str) -> str:
    while True:
        items = [rng.choice(("v", "j")) for _ in range(rng.choice((5, 7, 9, 11)))]
        if (items.count("v") > items.count("j")) == (answer == "yes"):
            return f"List: {' '.join(items)}\nAre there more v than j?"


#: Task name -> question generator (a seeded draw of a question whose answer is the given label).
TASKS: Dict[str, Callable[[random.Random, str], str]] = {"membership": _membership, "majority": _majority}


def _row(question: str, answer: str, task: str) -> Row:
    return {"instruction": question + _FORMAT, "input": "", "output": f"the correct answer is {answer}", "answer": answer, "task": task}


def _draw(rng: random.Random, task: str, count: int, avoid: Set[str], distinct: bool) -> List[Row]:
    rows: List[Row] = []
    seen: Set[str] = set()
    for i in range(count):
        # The label first (held-out labels exactly balanced), then a question with that answer:
        # redrawing the label on a rejected question would bias it towards the larger class.
        answer = LABELS[i % 2] if distinct else rng.choice(LABELS)
        for _ in range(100_000):
            row = _row(TASKS[task](rng, answer), answer, task)
            if row["instruction"] not in avoid and not (distinct and row["instruction"] in seen):
                break
        else:
            raise RuntimeError(f"{task}: cannot draw {count} rows avoiding {len(avoid)} questions")
        seen.add(row["instruction"])
        rows.append(row)
    if distinct:
        rng.shuffle(rows)
    return rows


@dataclass(frozen=True)
class TaskSplits:
    """One task's rows.

    Attributes:
        train (List[Row]): fine-tuning rows (questions may repeat, never a held-out one).
        pretrain (List[Row]): rows the format-only base learns (their answers are replaced at
            random by ``tools/pretrain_tiny_base.py --random-answers``).
        test (List[Row]): held-out rows, distinct questions, labels balanced.
    """

    train: List[Row]
    pretrain: List[Row]
    test: List[Row]


def make_splits(task: str, *, seed: int, train_rows: int, pretrain_rows: int, test_rows: int) -> TaskSplits:
    """Draw one task's splits from a fixed seed and assert them disjoint.

    Raises:
        AssertionError: a held-out question among the training or pre-training rows (a bug).
    """
    rng = random.Random(f"{task}:{seed}")
    test = _draw(rng, task, test_rows, set(), distinct=True)
    held_out = {r["instruction"] for r in test}
    train = _draw(rng, task, train_rows, held_out, distinct=False)
    pretrain = _draw(rng, task, pretrain_rows, held_out, distinct=False)
    assert not held_out & {r["instruction"] for r in train + pretrain}, "held-out rows leaked into training"
    return TaskSplits(train, pretrain, test)


def write_jsonl(path: Path, rows: Sequence[Row]) -> None:
    """Write ``rows`` as JSON lines (replacing the file atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def task_file_text(benchmark: str, tasks: Sequence[Tuple[str, str]]) -> str:
    """A ``mas_eval`` task file scoring each ``(name, rows file)`` by log-likelihood over yes/no."""
    lines = [f"benchmark: {benchmark}", "tasks:"]
    for name, rows in tasks:
        lines += [f"  - name: {name}", f"    rows: {rows}", "    format: commonsense", "    labels: [yes, no]", "    modes: [loglik]"]
    return "\n".join(lines) + "\n"
