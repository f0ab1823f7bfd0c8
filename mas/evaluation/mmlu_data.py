"""MMLU questions: the 57 subjects, their categories, and loading the common local layouts.

Accepted sources (``data_dir`` of the ``mmlu`` benchmark), tried in this order:

1. Hendrycks et al.'s release: CSV files without a header, one per subject, rows
   ``question,A,B,C,D,answer`` (``answer`` a letter A-D), named ``<subject>_<split>.csv``, in
   ``<source>/data/<split>/``, ``<source>/<split>/`` or ``<source>/`` (or one such file).
2. The hub ``cais/mmlu`` layout: rows with ``question``, ``subject``, ``choices`` (4 strings) and
   ``answer`` (0-3; a letter A-D is accepted too), as one ``.json``/``.jsonl``/``.parquet`` file,
   or a folder with ``<split>.json(l)``, ``<split>.parquet``, ``<split>-*.parquet``,
   ``all/<split>-*.parquet``, or per-subject folders ``<subject>/<split>-*.parquet`` (the
   folder names the subject when rows have none).
3. Otherwise a hub id, loaded with ``datasets.load_dataset(id, hub_config, split=split)``
   (needs network; e.g. ``cais/mmlu`` with config ``all``).

Every bad row raises :class:`DataError` naming file and row: a missing or out-of-range answer,
not exactly four choices, an unknown subject (row or file name).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

from mas.data.rows import DataError, load_rows, require_text
from mas.errors import ConfigError

__all__ = ["CATEGORIES", "CATEGORY_OF", "SAMPLE_SOURCE", "SUBJECTS", "MMLUExample", "load_mmlu"]

#: A small synthetic sample in the Hendrycks layout (made-up questions; see its README).
SAMPLE_SOURCE = Path(__file__).resolve().parents[1] / "assets" / "mmlu_sample"

#: Hendrycks et al.'s four categories (their subcategories folded in), subjects alphabetical.
CATEGORIES: Dict[str, Tuple[str, ...]] = {
    "STEM": (
        "abstract_algebra", "astronomy", "college_biology", "college_chemistry", "college_computer_science",
        "college_mathematics", "college_physics", "computer_security", "conceptual_physics",
        "electrical_engineering", "elementary_mathematics", "high_school_biology", "high_school_chemistry",
        "high_school_computer_science", "high_school_mathematics", "high_school_physics",
        "high_school_statistics", "machine_learning",
    ),
    "humanities": (
        "formal_logic", "high_school_european_history", "high_school_us_history", "high_school_world_history",
        "international_law", "jurisprudence", "logical_fallacies", "moral_disputes", "moral_scenarios",
        "philosophy", "prehistory", "professional_law", "world_religions",
    ),
    "social sciences": (
        "econometrics", "high_school_geography", "high_school_government_and_politics",
        "high_school_macroeconomics", "high_school_microeconomics", "high_school_psychology",
        "human_sexuality", "professional_psychology", "public_relations", "security_studies", "sociology",
        "us_foreign_policy",
    ),
    "other": (
        "anatomy", "business_ethics", "clinical_knowledge", "college_medicine", "global_facts", "human_aging",
        "management", "marketing", "medical_genetics", "miscellaneous", "nutrition", "professional_accounting",
        "professional_medicine", "virology",
    ),
}  # fmt: skip
CATEGORY_OF: Dict[str, str] = {s: c for c, subjects in CATEGORIES.items() for s in subjects}
#: The 57 subjects, alphabetical (the order of Hendrycks's files and of the results table).
SUBJECTS: Tuple[str, ...] = tuple(sorted(CATEGORY_OF))
LETTERS = "ABCD"


@dataclass(frozen=True)
class MMLUExample:
    """One question.

    Attributes:
        subject (str): one of :data:`SUBJECTS`.
        index (int): position among the subject's rows (the key for resuming).
        question (str): the question.
        choices (Tuple[str, ...]): the four options, in order.
        answer (int): index of the right option (0-3).
        where (str): file and row, for messages.
    """

    subject: str
    index: int
    question: str
    choices: Tuple[str, ...]
    answer: int
    where: str

    @property
    def gold(self) -> str:
        """The gold label in the answer format, ``"answer1"`` .. ``"answer4"``."""
        return f"answer{self.answer + 1}"


Row = Tuple[Mapping[str, Any], str]  # (fields, where)


def _known_subject(subject: str, where: str) -> str:
    name = subject.strip().lower().replace(" ", "_")
    if name not in CATEGORY_OF:
        raise DataError(f"{where}: unknown MMLU subject '{subject}' (not one of the 57 subjects)")
    return name


def _csv_rows(path: Path, split: str) -> Iterator[Row]:
    if not path.name.endswith(f"_{split}.csv"):
        raise DataError(f"{path}: a Hendrycks MMLU file is named <subject>_{split}.csv")
    subject = _known_subject(path.name[: -len(f"_{split}.csv")], str(path))
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        for cells in reader:
            where = f"{path}, line {reader.line_num}"
            if not any(c.strip() for c in cells):
                continue
            if len(cells) != 6:
                raise DataError(
                    f"{where}: expected 6 columns (question, A, B, C, D, answer), got {len(cells)}; "
                    "a missing answer or a wrong number of choices"
                )
            yield {"question": cells[0], "choices": cells[1:5], "answer": cells[5], "subject": subject}, where


def _parquet_rows(path: Path) -> List[Row]:
    import pyarrow.parquet as pq

    return [(row, f"{path}, row {i}") for i, row in enumerate(pq.read_table(path).to_pylist())]


def _file_rows(path: Path, split: str, subject: Optional[str] = None) -> List[Row]:
    if path.suffix == ".csv":
        return list(_csv_rows(path, split))
    rows = _parquet_rows(path) if path.suffix == ".parquet" else list(_json_rows(path))
    if subject is not None:
        rows = [({**row, "subject": row.get("subject") or subject}, where) for row, where in rows]
    return rows


def _json_rows(path: Path) -> Iterator[Row]:
    source = load_rows(str(path))
    for i, row in enumerate(source.rows):
        yield row, source.where(i)


def _source_rows(source: str, split: str, hub_config: Optional[str]) -> List[Row]:
    path = Path(source).expanduser()
    if path.is_file():
        return _file_rows(path, split)
    if path.is_dir():
        for folder in (path / "data" / split, path / split, path):
            csvs = sorted(folder.glob(f"*_{split}.csv")) if folder.is_dir() else []
            if csvs:
                return [row for f in csvs for row in _csv_rows(f, split)]
        files = [path / f"{split}{ext}" for ext in (".jsonl", ".json", ".parquet")]
        files = [f for f in files if f.is_file()] or sorted(path.glob(f"{split}-*.parquet"))
        files = files or sorted((path / "all").glob(f"{split}-*.parquet"))
        if files:
            return [row for f in files for row in _file_rows(f, split)]
        per_subject = [(d.name, f) for d in sorted(path.iterdir()) if d.is_dir() for f in sorted(d.glob(f"{split}-*.parquet"))]
        if per_subject:
            return [row for name, f in per_subject for row in _file_rows(f, split, subject=name)]
        raise DataError(
            f"no MMLU {split} data under {path}: looked for data/{split}/*_{split}.csv, {split}/*_{split}.csv, "
            f"*_{split}.csv, {split}.json(l), {split}.parquet, {split}-*.parquet, all/{split}-*.parquet, "
            f"<subject>/{split}-*.parquet"
        )
    if source.startswith((".", "/", "~")) or path.suffix in (".csv", ".json", ".jsonl", ".parquet"):
        raise DataError(f"MMLU source not found: {source}")
    hub = load_rows(source, split=split, **({"name": hub_config} if hub_config else {}))
    return [(row, hub.where(i)) for i, row in enumerate(hub.rows)]


def _answer_index(value: Any, where: str) -> int:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DataError(f"{where}: missing answer")
    if isinstance(value, str) and value.strip().upper() in LETTERS:
        return LETTERS.index(value.strip().upper())
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 4:
        return value
    raise DataError(f"{where}: answer {value!r} is out of range (expected 0-3 or A-D)")


def _example(row: Mapping[str, Any], where: str, index_of: Dict[str, int]) -> MMLUExample:
    subject = _known_subject(require_text(row, "subject", where), where)
    question = require_text(row, "question", where)
    choices = row.get("choices")
    if not isinstance(choices, (list, tuple)) or len(choices) != 4 or not all(isinstance(c, str) for c in choices):
        count = len(choices) if isinstance(choices, (list, tuple)) else type(choices).__name__
        raise DataError(f"{where}: field 'choices' must be a list of 4 strings, got {count}")
    if "answer" not in row:
        raise DataError(f"{where}: missing answer (row has {sorted(row)})")
    answer = _answer_index(row["answer"], where)
    index = index_of.get(subject, 0)
    index_of[subject] = index + 1
    return MMLUExample(subject, index, question, tuple(choices), answer, where)


def load_mmlu(
    source: str = str(SAMPLE_SOURCE),
    subjects: Optional[Sequence[str]] = None,
    limit: Optional[int] = None,
    *,
    split: str = "test",
    hub_config: Optional[str] = "all",
) -> Dict[str, Tuple[MMLUExample, ...]]:
    """Load and validate MMLU questions (layouts: module docstring).

    Args:
        source (str): a file, a folder or a hub id.
        subjects (Optional[Sequence[str]]): subjects to keep (canonical names); None: all present.
        limit (Optional[int]): first ``limit`` questions per subject.
        split (str): ``test`` (zero-shot evaluation), ``validation``/``val`` or ``dev``.
        hub_config (Optional[str]): config name for a hub id.

    Returns:
        Dict[str, Tuple[MMLUExample, ...]]: questions by subject, subjects alphabetical.

    Raises:
        DataError: a bad row, an unknown subject, a requested subject with no questions.
        ValueError: a ``limit`` below 1.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit must be a positive integer or None, got {limit!r}")
    index_of: Dict[str, int] = {}
    by_subject: Dict[str, List[MMLUExample]] = {}
    for row, where in _source_rows(source, split, hub_config):
        example = _example(row, where, index_of)
        by_subject.setdefault(example.subject, []).append(example)
    wanted: Iterable[str] = subjects if subjects is not None else by_subject
    missing = [s for s in wanted if s not in by_subject]
    if missing or not by_subject:
        raise DataError(f"{source}: no {split} questions for {missing or 'any subject'}; present: {sorted(by_subject)}")
    return {s: tuple(by_subject[s][:limit]) for s in SUBJECTS if s in set(wanted)}
