"""Summarization (the paper's Table 5): generate a summary of each document, score it with ROUGE.

Prompt: the fine-tuning template with an input (:func:`instruction_messages`), so the document is
part of the bidirectional user segment under MAS::

    system: "Below is an instruction that describes a task, paired with an input ..."
    user:   "### Instruction:\\nSummarize the following document.\\n\\n### Input:\\n{document}\\n\\n### Response:\\n"

A document whose prompt does not fit the KV cache (cache slots minus ``max_new_tokens``) loses its
end (its beginning is kept; the instruction and the response cue always stay); each such record
keeps ``info.truncated_tokens`` and the run logs one warning with the count.

Scores: ROUGE-1, ROUGE-2, ROUGE-L and ROUGE-Lsum F1 from the ``rouge-score`` package with its
Porter stemmer; ROUGE-L F1 is the benchmark's metric (averaged per data set, then over data sets).
ROUGE runs fully offline: ``rouge-score`` tokenizes with a regular expression (lower case, runs of
``[a-z0-9]``; text in other scripts therefore scores 0) and stems with nltk's ``PorterStemmer``,
which is code, not downloaded data. ROUGE-Lsum treats newlines as sentence breaks (CNN/DailyMail
highlights have them; generated text is scored as generated).

**METEOR is not computed.** nltk's ``meteor_score`` matches synonyms through WordNet, a corpus
that must be downloaded at run time (``nltk.download("wordnet")``); it even works without it
until the first non-identical word pair, so the dependency would surface mid-run. Compute METEOR
offline afterwards from ``predictions_generate.jsonl`` (``generation`` vs ``gold``) if needed.

Only ``mode: generate`` exists: there is no fixed set of candidates to score in ``loglik`` mode.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from rouge_score import rouge_scorer
from torchtune.data import Message

from mas.data.formats import instruction_messages
from mas.data.rows import first_present, load_rows, require_text
from mas.errors import DataError
from mas.evaluation.benchmarks import register_benchmark
from mas.evaluation.records import text_records
from mas.evaluation.results import PredictionRecord
from mas.evaluation.spec import Benchmark, BenchmarkContext, EvalItem
from mas.evaluation.suites import TaskSuite, escape_cell, percent, table_row
from mas.segments import SegmentBuilder
from mas.errors import ConfigError

__all__ = [
    "DOCUMENT_FIELDS",
    "INSTRUCTION",
    "ROUGE_TYPES",
    "SAMPLE_SOURCE",
    "SUMMARIZATION",
    "SUMMARY_FIELDS",
    "SummarizationExample",
    "SummarizationSuite",
    "fit_document",
    "load_summarization",
    "rouge_match",
    "rouge_scores",
    "summarization_items",
    "summary_messages",
]

log = logging.getLogger(__name__)

#: Synthetic XSum-, CNN/DailyMail- and BillSum-style rows (made up; see its README).
SAMPLE_SOURCE = Path(__file__).resolve().parents[1] / "assets" / "summarization_sample"
INSTRUCTION = "Summarize the following document."
#: Field names of the document and of the reference: XSum (document/summary), CNN/DailyMail
#: (article/highlights), BillSum (text/summary).
DOCUMENT_FIELDS = ("document", "article", "text")
SUMMARY_FIELDS = ("summary", "highlights")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_COLUMNS = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "rougeLsum": "ROUGE-Lsum"}


@dataclass(frozen=True)
class SummarizationExample:
    """One document and its reference summary; ``index`` is the row's position in its file."""

    task: str
    index: int
    document: str
    summary: str
    where: str


def _example(task: str, index: int, row: Mapping[str, Any], where: str) -> SummarizationExample:
    fields = {}
    for kind, names in (("document", DOCUMENT_FIELDS), ("summary", SUMMARY_FIELDS)):
        name = first_present(row, names)
        if name is None:
            raise DataError(f"{where}: no {kind} field (expected one of {', '.join(names)}; row has {sorted(row)})")
        fields[kind] = require_text(row, name, where)
    return SummarizationExample(task, index, fields["document"], fields["summary"], where)


def _task_files(path: Path, tasks: Optional[Sequence[str]], split: str) -> List[Tuple[str, Path]]:
    if path.is_file():
        return [(tasks[0] if tasks else path.stem, path)]
    if not tasks:
        files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl") and p.is_file())
        if not files:
            raise DataError(f"{path}: no .json or .jsonl file in this folder")
        return [(f.stem, f) for f in files]
    found = []
    for task in tasks:
        candidates = [path / f"{task}{ext}" for ext in (".jsonl", ".json")]
        candidates += [path / task / f"{split}{ext}" for ext in (".jsonl", ".json")]
        match = next((c for c in candidates if c.is_file()), None)
        if match is None:
            raise DataError(f"no file for data set '{task}' under {path} (looked for {', '.join(map(str, candidates))})")
        found.append((task, match))
    return found


def load_summarization(
    source: str = str(SAMPLE_SOURCE),
    tasks: Optional[Sequence[str]] = None,
    limit: Optional[int] = None,
    *,
    split: str = "test",
    hub_config: Optional[str] = None,
) -> Dict[str, Tuple[SummarizationExample, ...]]:
    """Documents and references by data set name.

    Args:
        source (str): a ``.json``/``.jsonl`` file (one data set, named by ``tasks[0]`` or the file
            stem); a folder (``<task>.json(l)`` or ``<task>/<split>.json(l)`` per task, or every
            JSON/JSONL file in it when ``tasks`` is None); else a hub id (``split``, ``hub_config``).
        tasks (Optional[Sequence[str]]): data set names.
        limit (Optional[int]): first ``limit`` rows per data set.

    Raises:
        DataError: a missing file or a row without document or summary (naming file and row).
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit must be a positive integer or None, got {limit!r}")
    path = Path(source).expanduser()
    if path.exists():
        sources = [(task, load_rows(str(file))) for task, file in _task_files(path, tasks, split)]
    elif source.startswith((".", "/", "~")) or path.suffix in (".json", ".jsonl"):
        raise DataError(f"summarization source not found: {source}")
    else:
        hub = load_rows(source, split=split, **({"name": hub_config} if hub_config else {}))
        sources = [(tasks[0] if tasks else source.rstrip("/").split("/")[-1], hub)]
    data = {}
    for task, rows in sources:
        count = len(rows) if limit is None else min(limit, len(rows))
        data[task] = tuple(_example(task, i, rows.rows[i], rows.where(i)) for i in range(count))
    return data


def summary_messages(document: str) -> List[Message]:
    """System and user messages asking for a summary of ``document`` (no answer)."""
    return instruction_messages(INSTRUCTION, document)


def fit_document(builder: SegmentBuilder, document: str, budget: int) -> Tuple[List[Message], int]:
    """The prompt for ``document``, its end cut until the prompt has at most ``budget`` tokens.

    Returns:
        Tuple[List[Message], int]: the messages and how many document tokens were cut (0: none).

    Raises:
        DataError: the prompt does not fit even with a one-token document.
    """
    messages = summary_messages(document)
    length = len(builder(messages, for_generation=True))
    if length <= budget:
        return messages, 0
    ids = builder.tokenizer.encode(document, add_bos=False, add_eos=False)
    keep = len(ids) - (length - budget)
    while keep > 0:
        # Decoding a prefix and re-encoding it can merge tokens differently: measure again.
        messages = summary_messages(builder.tokenizer.decode(ids[:keep]))
        length = len(builder(messages, for_generation=True))
        if length <= budget:
            return messages, len(ids) - keep
        keep -= length - budget
    raise DataError(f"the summarization prompt does not fit {budget} tokens even without its document")


@lru_cache(maxsize=1)
def _scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge_scores(prediction: str, reference: str) -> Dict[str, float]:
    """ROUGE-1/2/L/Lsum F1 of ``prediction`` against ``reference`` (0..1; empty text scores 0)."""
    scores = _scorer().score(reference, prediction)
    return {name: float(scores[name].fmeasure) for name in ROUGE_TYPES}


class SummarizationSuite(TaskSuite):
    """Summarization: tasks are data set names (any), metric ROUGE-L F1."""

    name = "summarization"
    metric = "rougeL"
    results_format = "mas-summarization-results/1"

    def canonical(self, task: str) -> str:
        if not isinstance(task, str) or not task.strip():
            raise ConfigError(f"a summarization data set needs a non-empty name, got {task!r}")
        return task.strip()

    def order(self, tasks) -> List[str]:
        return sorted(set(tasks))

    def task_entry(self, records: Sequence[PredictionRecord]) -> Dict[str, Any]:
        entry: Dict[str, Any] = {name: sum((r.scores or {}).get(name, 0.0) for r in records) / len(records) for name in ROUGE_TYPES}
        entry["total"] = len(records)
        entry["no_answer"] = sum(not r.prediction for r in records)
        entry["truncated"] = sum(bool((r.info or {}).get("truncated_tokens")) for r in records)
        return entry

    def summary(self, tasks: Mapping[str, Mapping[str, Any]]) -> Dict[str, Any]:
        counts = {key: sum(c[key] for c in tasks.values()) for key in ("total", "no_answer", "truncated")}
        averages = {name: sum(c[name] for c in tasks.values()) / len(tasks) if tasks else None for name in ROUGE_TYPES}
        return {
            "counts": {"examples": counts["total"], "no_answer": counts["no_answer"], "truncated": counts["truncated"]},
            "averages": averages,
        }

    def markdown_table(self, runs) -> str:
        """One row per run and data set: the ROUGE F1s in percent, examples, truncated documents."""
        header = ["Run", "Data set"] + [_COLUMNS[n] for n in ROUGE_TYPES] + ["Examples", "Truncated"]
        lines = [table_row(header), table_row(["---", "---"] + ["---:"] * (len(header) - 2))]
        for label, results in runs:
            for task, entry in results.get("tasks", {}).items():
                cells = [percent(entry[n]) for n in ROUGE_TYPES] + [str(entry["total"]), str(entry.get("truncated", 0))]
                lines.append(table_row([escape_cell(label), escape_cell(task)] + cells))
        return "\n".join(lines)


def rouge_match(prediction: str, reference: str) -> Tuple[Optional[bool], Dict[str, float]]:
    """A summary's ROUGE F1s (no right or wrong: ``correct`` is None)."""
    return None, rouge_scores(prediction, reference)


def summarization_items(context: BenchmarkContext) -> List[EvalItem]:
    """The items of the ``summarization`` benchmark: each document fitted to the KV cache.

    Data: ``source`` (default: the bundled synthetic sample), ``tasks`` (data set names; None:
    every file of a folder), ``limit``, ``split`` (default ``test``), ``data_config`` (hub
    config, e.g. ``3.0.0`` for ``cnn_dailymail``). A document too long for the cache minus
    ``max_new_tokens`` loses its end (``info.truncated_tokens``); one warning gives the count.

    Raises:
        DataError: bad data (naming file and row).
    """
    data = context.data
    documents = load_summarization(
        data.source or str(SAMPLE_SOURCE),
        tasks=list(data.tasks) if data.tasks else None,
        limit=data.limit,
        split=data.split or "test",
        hub_config=data.data_config,
    )
    settings = context.settings
    cache_len = settings.max_cache_len or context.model.max_seq_len
    budget = cache_len - settings.max_new_tokens
    items = []
    for example in (e for rows in documents.values() for e in rows):
        messages, cut = fit_document(context.builder, example.document, budget)
        items.append(EvalItem(
            example.task, example.index, tuple(messages), example.summary, where=example.where,
            info={"truncated_tokens": cut} if cut else None,
        ))  # fmt: skip
    truncated = [item.info["truncated_tokens"] for item in items if item.info]
    if truncated:
        log.warning(
            "%d of %d documents were cut at the end to fit the %d-slot KV cache with max_new_tokens %d "
            "(%d document tokens dropped in all); raise max_cache_len to keep them whole",
            len(truncated), len(items), cache_len, settings.max_new_tokens, sum(truncated),
        )  # fmt: skip
    return items


SUMMARIZATION = register_benchmark(
    Benchmark(
        name="summarization",
        suite=SummarizationSuite(),
        items=summarization_items,
        modes={"generate": text_records(rouge_match, "generate")},
        mode_note="it is scored by ROUGE on generated summaries; loglik mode has no candidate answers to score",
    )
)
