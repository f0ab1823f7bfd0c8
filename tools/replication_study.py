"""What a replication study is and where it writes (``tools/replicate.py``).

:class:`Study` holds a study's fixed parameters: :data:`FULL`, the pre-registered study of
``docs/replication.md``, and :data:`CI`, its CI-sized twin whose numbers mean nothing.
:class:`Layout` names every run's folder; :func:`claim_folder` records the study in its folder
(and refuses another study's); :func:`collect` reads back every accuracy the runs wrote.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from replication_report import CROSSINGS, write_json

__all__ = ["BENCHMARK", "CI", "FULL", "Layout", "Study", "StudyError", "claim_folder", "collect", "study_record"]

#: The benchmark name of the study's task file (``mas_eval``'s ``benchmark``).
BENCHMARK = "replication"


@dataclass(frozen=True)
class Study:
    """The fixed parameters of a study (``docs/replication.md`` states the full study's).

    Attributes:
        name (str): ``full`` or ``ci``.
        tasks (Tuple[str, ...]): task names of ``replication_tasks.TASKS``.
        seeds (Tuple[int, ...]): fine-tuning seeds (LoRA init, data order, dropout).
        steps (Dict[str, Tuple[int, ...]]): chosen steps per task; the last is the run's length.
        batch_size (int): fine-tuning examples per step (train rows = batch_size x last step).
        test_rows (int): held-out rows per task.
        pretrain_rows (int): format-only rows per task for the base.
        pretrain_steps (int): the base's pre-training steps.
        data_seed (int): seed of the synthetic rows.
        base_seed (int): seed of the base's init and pre-training.
        primary (Tuple[Tuple[str, str, int], ...]): the confirmatory tests, as (hypothesis,
            task, step).
    """

    name: str
    tasks: Tuple[str, ...]
    seeds: Tuple[int, ...]
    steps: Dict[str, Tuple[int, ...]] = field(hash=False)
    batch_size: int = 8
    test_rows: int = 300
    pretrain_rows: int = 2000
    pretrain_steps: int = 300
    data_seed: int = 0
    base_seed: int = 0
    primary: Tuple[Tuple[str, str, int], ...] = ()


#: The pre-registered study (docs/replication.md): fixed before any of its runs.
FULL = Study(
    name="full",
    tasks=("membership", "majority"),
    seeds=tuple(range(100, 112)),
    steps={"membership": (125, 250, 500, 1000, 2000), "majority": (250, 500, 1000, 2000, 4000)},
    primary=(("H1", "membership", 1000), ("H2", "membership", 2000), ("H2", "majority", 4000)),
)
#: The CI-sized study: the mechanics only (its numbers mean nothing).
CI = Study(
    name="ci",
    tasks=("membership",),
    seeds=(100, 101),
    steps={"membership": (10, 20)},
    test_rows=16,
    pretrain_rows=64,
    pretrain_steps=8,
    primary=(("H1", "membership", 20), ("H2", "membership", 20)),
)


class StudyError(Exception):
    """A study cannot go on (another study's folder, a run that failed): one line, exit 1."""



class Layout:
    """Where each run of a study writes."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.data = out / "data"
        self.task_file = self.data / "tasks.yaml"
        self.base = out / "base"

    def train_rows(self, task: str) -> Path:
        return self.data / task / "train.jsonl"

    def finetune(self, task: str, seed: int, attention: str) -> Path:
        return self.out / "runs" / task / f"s{seed}_{attention}"

    def evaluation(self, task: str, seed: int, trained: str, evaluated: str) -> Path:
        return self.out / "evals" / task / f"s{seed}_{trained}_eval_{evaluated}"

    def base_evaluation(self, evaluated: str) -> Path:
        return self.out / "evals" / f"base_eval_{evaluated}"



def study_record(study: Study) -> Dict[str, Any]:
    record = dataclasses.asdict(study)
    record["steps"] = {t: list(s) for t, s in study.steps.items()}
    record["tasks"], record["seeds"] = list(study.tasks), list(study.seeds)
    record["primary"] = [list(p) for p in study.primary]
    return record


def claim_folder(study: Study, out: Path) -> None:
    """Record the study in ``out/study.json``; refuse a folder that holds another study."""
    record = study_record(study)
    path = out / "study.json"
    if path.exists():
        held = json.loads(path.read_text())
        if held != record:
            key = next(k for k in sorted(set(held) | set(record)) if held.get(k) != record.get(k))
            raise StudyError(f"{out} holds another study ({key}: {held.get(key)!r} there, {record.get(key)!r} here); use another --out")
        return
    out.mkdir(parents=True, exist_ok=True)
    write_json(path, record)


def collect(study: Study, layout: Layout, seeds: Sequence[int]) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]], bool]:
    """Every accuracy the finished runs wrote (percent), the base model's, and whether all were there."""
    records: List[Dict[str, Any]] = []
    complete = True
    for task in study.tasks:
        for seed in seeds:
            for trained, evaluated in CROSSINGS:
                sweep = layout.evaluation(task, seed, trained, evaluated) / "sweep_loglik.json"
                if not sweep.exists():
                    complete = False
                    continue
                for point in json.loads(sweep.read_text())["points"]:
                    result = point["tasks"][task]
                    records.append({
                        "task": task, "seed": seed, "trained": trained, "evaluated": evaluated, "step": point["step"],
                        "accuracy": 100.0 * result["accuracy"], "correct": result["correct"], "total": result["total"],
                    })  # fmt: skip
    base = []
    for evaluated in ("mas", "causal"):
        results = layout.base_evaluation(evaluated) / "results_loglik.json"
        if not results.exists():
            complete = False
            continue
        for task, result in json.loads(results.read_text())["tasks"].items():
            base.append({"task": task, "evaluated": evaluated, "accuracy": 100.0 * result["accuracy"], "total": result["total"]})
    return records, base, complete and list(seeds) == list(study.seeds)
