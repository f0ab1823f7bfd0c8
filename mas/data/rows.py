"""Load raw rows from local JSON/JSONL files or hub datasets, and validate their fields.

Every error names the source, the row and the field, so a bad row in a 170K-row file is found in
seconds rather than as a shape error three layers down.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

from mas.errors import DataError

__all__ = ["DataError", "RowSource", "load_rows", "optional_text", "require_text", "select_rows"]


@dataclass(frozen=True)
class RowSource:
    """Rows with the name of where they came from.

    Attributes:
        name (str): the file path or hub id, for messages.
        rows (Sequence[Mapping]): the rows.
        row_labels (Sequence[str]): how to name each row in messages ("row 3", "line 4").
    """

    name: str
    rows: Sequence[Mapping[str, Any]]
    row_labels: Sequence[str]

    def __len__(self) -> int:
        return len(self.rows)

    def where(self, index: int) -> str:
        return f"{self.name}, {self.row_labels[index]}"

    def __iter__(self) -> Iterator[Mapping[str, Any]]:
        return iter(self.rows)


def _load_json_file(path: Path) -> RowSource:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl" or (path.suffix != ".json" and not text.lstrip().startswith("[")):
        rows: List[Any] = []
        labels: List[str] = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {line_number}: not valid JSON ({e.msg})") from None
            labels.append(f"line {line_number}")
    else:
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if isinstance(rows, dict):
            # {"train": [...]} or {"data": [...]}: one list-valued key.
            lists = [k for k, v in rows.items() if isinstance(v, list)]
            if len(lists) != 1:
                raise DataError(f"{path}: expected a JSON list of rows, got an object with keys {list(rows)}")
            rows = rows[lists[0]]
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON list of rows, got {type(rows).__name__}")
        labels = [f"row {i}" for i in range(len(rows))]
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{path}, {labels[i]}: expected a JSON object, got {type(row).__name__}")
    return RowSource(str(path), rows, labels)


def select_rows(rows: RowSource, selection: Optional[str]) -> RowSource:
    """Rows ``start:stop`` (Python slice syntax, e.g. ``"0:550"``) of a source; None keeps all."""
    if selection is None:
        return rows
    parts = str(selection).split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        start, stop = (int(p) if p.strip() else None for p in parts)
    except ValueError:
        raise DataError(f"{rows.name}: rows={selection!r} is not a 'start:stop' slice") from None
    picked = range(len(rows))[slice(start, stop)]
    if len(picked) == 0:
        raise DataError(f"{rows.name}: rows={selection!r} selects no row of {len(rows)}")
    return RowSource(rows.name, [rows.rows[i] for i in picked], [rows.row_labels[i] for i in picked])


def load_rows(source: str, split: str = "train", **load_dataset_kwargs: Any) -> RowSource:
    """Rows from a local ``.json``/``.jsonl`` file (or a folder holding ``{split}.json``) or a hub id.

    Args:
        source (str): a path, or a dataset id for ``datasets.load_dataset`` (needs network).
        split (str): the split of a hub dataset or the file name in a folder. Default "train".
        **load_dataset_kwargs: passed to ``datasets.load_dataset`` for hub ids.

    Returns:
        RowSource: the rows.

    Raises:
        DataError: a missing file, invalid JSON, or a row that is not an object.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        for candidate in (path / f"{split}.json", path / f"{split}.jsonl"):
            if candidate.exists():
                return _load_json_file(candidate)
        raise DataError(f"{path}: no {split}.json or {split}.jsonl in this folder")
    if path.exists():
        return _load_json_file(path)
    looks_like_path = source.startswith((".", "/", "~")) or path.suffix in (".json", ".jsonl")
    if looks_like_path:
        raise DataError(f"data file not found: {source}")
    try:
        from datasets import load_dataset

        dataset = load_dataset(source, split=split, **load_dataset_kwargs)
    except Exception as e:  # datasets raises many types; all mean "cannot load this id"
        raise DataError(
            f"{source}: not a local file, and loading it from the hub failed ({type(e).__name__}: {e})"
        ) from e
    return RowSource(source, dataset, [f"row {i}" for i in range(len(dataset))])


def require_text(row: Mapping[str, Any], field: str, where: str, *, allow_empty: bool = False) -> str:
    """``row[field]`` as a string, or a :class:`DataError` naming ``where`` and ``field``."""
    if field not in row or row[field] is None:
        raise DataError(f"{where}: missing field '{field}' (row has {sorted(row)})")
    value = row[field]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{field}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: field '{field}' is empty")
    return value


def optional_text(row: Mapping[str, Any], field: str, where: str) -> str:
    """``row[field]`` as a string ('' when absent), or a :class:`DataError` for a non-string."""
    value = row.get(field)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{field}' must be a string, got {type(value).__name__}")
    return value


def require_list(row: Mapping[str, Any], field: str, where: str) -> List[Dict[str, Any]]:
    """``row[field]`` as a non-empty list, or a :class:`DataError`."""
    value = row.get(field)
    if value is None:
        raise DataError(f"{where}: missing field '{field}' (row has {sorted(row)})")
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field '{field}' must be a non-empty list")
    return value


def first_present(row: Mapping[str, Any], fields: Sequence[str]) -> Optional[str]:
    """The first of ``fields`` that ``row`` has, or None."""
    return next((f for f in fields if f in row), None)
