"""Run identity: what produced a folder of predictions, so a resume never reuses another run's.

A predictions file is resumable (:mod:`mas.evaluation.loop`), so it must only ever be resumed by
the run that started it. Beside ``predictions_<mode>.jsonl`` lies ``identity_<mode>.json``: the
fingerprint of what produced the predictions:

- the base weights: their folder, a hash of every small JSON file in it (``config.json``, the
  tiny model's recipe, ...) and the name, size and modification time of each weights file;
- the adapter: its folder, step and a SHA-256 of its weights file;
- the prompting: eval attention, prompt format, system/user merge, weights dtype;
- the benchmark (and a user task's declaration), its data source (path, or hub id, split and
  config; the size and time of local data files), the mode, the loglik answer template, and for
  generating modes ``max_new_tokens`` and ``max_cache_len``.

Which tasks and how many rows (``tasks``, ``limit``) are not part of it: records are keyed by
task and row, so a larger selection resumes a smaller one correctly. A run whose fingerprint
differs is refused with one line naming what differs (:func:`claim_predictions`).

Run names: :func:`adapter_run_name` (the fine-tuning run's folder name) and
:func:`experiment_name` (that name without its ``mas``/``causal`` part), which results carry so
tools pair the MAS and causal runs of one experiment.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional

from mas.errors import ConfigError
from mas.fingerprint import file_sha256, file_stats, weights_identity

__all__ = [
    "ATTENTION_WORDS",
    "RunIdentity",
    "adapter_identity",
    "adapter_run_name",
    "adapter_step",
    "base_identity",
    "check_eval_output_dir",
    "claim_predictions",
    "data_identity",
    "experiment_name",
    "identity_path",
]

#: Words of a run folder's name that say how it was trained, dropped from its experiment name.
ATTENTION_WORDS = ("mas", "causal")
_DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".yaml", ".yml")


#: A weight folder's fingerprint (one definition: :func:`mas.fingerprint.weights_identity`).
base_identity = weights_identity


def adapter_step(adapter_path: Optional[Path]) -> Optional[int]:
    """The step of a ``.../step_N`` checkpoint folder (None: no adapter, or another layout)."""
    if adapter_path is None:
        return None
    name = Path(adapter_path).name
    if name.startswith("step_") and name[len("step_") :].isdigit():
        return int(name[len("step_") :])
    return None


def adapter_identity(adapter_path: Optional[Path], weights_file: str) -> Optional[Dict[str, Any]]:
    """The adapter's fingerprint: folder, step, SHA-256 of its weights (None: no adapter)."""
    if adapter_path is None:
        return None
    folder = Path(adapter_path).expanduser().resolve()
    weights = folder / weights_file
    return {
        "folder": str(folder),
        "step": adapter_step(folder),
        "weights_sha256": file_sha256(weights) if weights.is_file() else None,
    }


def data_identity(source: Optional[str], split: Optional[str], data_config: Optional[str]) -> Dict[str, Any]:
    """Where the benchmark data comes from: a local path with its files' sizes and times, or a
    hub id with split and config (None source: the benchmark's bundled sample)."""
    if source is None:
        return {"source": "bundled sample"}
    path = Path(source).expanduser()
    if not path.exists():
        return {"source": source, "split": split, "data_config": data_config}
    path = path.resolve()
    files: Iterable[Path] = [path] if path.is_file() else [*path.glob("*"), *path.glob("*/*")]
    stats = {str(p.relative_to(path.parent)): file_stats(p) for p in sorted(files) if p.is_file() and p.suffix in _DATA_SUFFIXES}
    return {"source": str(path), "split": split, "files": stats}


def adapter_run_name(adapter_checkpoint: Optional[str | os.PathLike]) -> str:
    """The fine-tuning run an adapter comes from: the run folder's name (``.../tiny_mas`` and
    ``.../tiny_mas/checkpoints/step_36`` both give ``tiny_mas``); ``base`` without an adapter."""
    if not adapter_checkpoint:
        return "base"
    path = Path(adapter_checkpoint)
    if path.parent.name == "checkpoints" and path.name.startswith("step_"):
        return path.parent.parent.name
    return path.name


def experiment_name(run_name: str) -> str:
    """A run name without the words that say how it was trained (``_``-separated ``mas`` and
    ``causal``): ``tiny_mas`` and ``tiny_causal`` are both experiment ``tiny``, and
    ``llama3_2_1b_mas_1024`` is ``llama3_2_1b_1024``."""
    kept = [word for word in run_name.split("_") if word.lower() not in ATTENTION_WORDS]
    return "_".join(kept) or run_name


def identity_path(predictions_path: Path) -> Path:
    """``identity_<mode>.json`` beside ``predictions_<mode>.jsonl``."""
    stem = predictions_path.stem
    suffix = stem[len("predictions") :] if stem.startswith("predictions") else f"_{stem}"
    return predictions_path.with_name(f"identity{suffix}.json")


def _short(value: Any, width: int = 70) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= width else "..." + text[-(width - 3) :]


def _differences(old: Any, new: Any, path: str = "") -> List[str]:
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        found = []
        for key in sorted(set(old) | set(new), key=str):
            found += _differences(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
        return found
    if old != new:
        return [f"{path or 'identity'}: {_short(old)} -> {_short(new)}"]
    return []


@dataclass(frozen=True)
class RunIdentity:
    """The fingerprint of one run of one benchmark in one mode (JSON-able fields)."""

    fields: Mapping[str, Any]

    def to_json(self) -> Dict[str, Any]:
        return json.loads(json.dumps(dict(self.fields), sort_keys=True))

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]

    def differences(self, recorded: Mapping[str, Any]) -> List[str]:
        """What differs from a recorded identity, one ``key: old -> new`` per leaf."""
        return _differences(dict(recorded), self.to_json())


#: What ``mas_eval`` writes in its output folder (and in a sweep's step folders).
_EVAL_WRITES = ("config.yaml", "predictions_*.jsonl", "identity_*.json", "results_*.json", "results_*.md", "sweep_*.json")


def check_eval_output_dir(out_dir: Path) -> None:
    """Refuse an ``output_dir`` whose files an evaluation would overwrite but no evaluation wrote.

    An evaluation's folder holds ``identity_<mode>.json`` (or step folders that do); other
    folders may hold anything except files under the names ``mas_eval`` writes.

    Raises:
        ConfigError: naming the file and ``output_dir``.
    """
    if not out_dir.is_dir():
        if out_dir.exists():
            raise ConfigError(f"output_dir={out_dir} is a file, not a folder; set output_dir to a folder")
        return
    if any(out_dir.glob("identity_*.json")) or any(out_dir.glob("*/identity_*.json")):
        return
    taken = sorted(p.name for pattern in _EVAL_WRITES for p in out_dir.glob(pattern))
    if taken:
        raise ConfigError(
            f"output_dir={out_dir} holds {taken[0]!r}, which no evaluation wrote and this one would overwrite; "
            "choose another output_dir"
        )


def claim_predictions(predictions_path: Path, identity: RunIdentity, *, resume: bool) -> None:
    """Make ``predictions_path`` this run's before any record is written.

    - ``resume=False``: earlier predictions (and their identity) are removed; the run starts over.
    - a predictions file with the same identity: kept (the loop resumes it);
    - a predictions file of another run, or one without an identity (an older ``mas_eval``):
      refused, naming what differs and the two ways out.

    Raises:
        ConfigError: the folder holds another run's predictions.
    """
    recorded_path = identity_path(predictions_path)
    if not resume:
        predictions_path.unlink(missing_ok=True)
        recorded_path.unlink(missing_ok=True)
    elif predictions_path.exists() and predictions_path.stat().st_size > 0:
        fix = "set output_dir=<a new folder> to keep both, or resume=False to overwrite them"
        if not recorded_path.exists():
            raise ConfigError(
                f"{predictions_path} holds predictions without a recorded run identity (an older mas_eval, or "
                f"another tool), so they cannot be matched to this model and settings; {fix}"
            )
        try:
            recorded = json.loads(recorded_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{recorded_path}: unreadable run identity ({e}); {fix}") from None
        changed = identity.differences(recorded.get("identity", {}))
        if changed:
            shown = "; ".join(changed[:3]) + (f"; and {len(changed) - 3} more" if len(changed) > 3 else "")
            raise ConfigError(f"{predictions_path.parent} holds predictions of another run ({shown}); {fix}")
        return
    predictions_path.parent.mkdir(parents=True, exist_ok=True)
    partial = recorded_path.with_name(recorded_path.name + ".partial")
    payload = {"digest": identity.digest, "identity": identity.to_json()}
    partial.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(partial, recorded_path)
