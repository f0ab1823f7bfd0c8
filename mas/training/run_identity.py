"""What produced a training run's folder, so a folder never mixes two runs.

A fresh run writes ``run.json`` in ``output_dir``: the recipe and every setting that changes the
result (base weights, model, tokenizer, data, optimizer, schedule, batch, epochs, seed, ranks).
Then:

- a fresh run refuses a folder that holds another run's checkpoints or ``run.json``, unless
  ``overwrite_output_dir=True`` (the old run's files are removed first) or
  ``resume_from_checkpoint=True``;
- a resumed run refuses a folder whose ``run.json`` differs in any of those settings, naming
  the key (a changed batch size silently changes the data position and the schedule).

Settings that do not change the result (logging, progress bar, checkpoint cadence, compile,
workers) are left out, so a resumed run may change them.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf

from mas.checkpointing import LATEST_FILE, RECIPE_STATE_FILE, RUN_FILE
from mas.errors import ConfigError
from mas.fingerprint import file_stats, weights_identity

__all__ = ["check_fresh_output_dir", "check_resume_matches", "run_fingerprint", "write_run_file"]

#: Options that do not change what a run computes; a resumed run may change them.
_NOT_IDENTITY = {
    "output_dir",
    "resume_from_checkpoint",
    "overwrite_output_dir",
    "metric_logger",
    "log_every_n_steps",
    "log_peak_memory_stats",
    "progress_bar",
    "save_every_n_steps",
    "save_merged_weights",
    "keep_last_n_checkpoints",
    "save_at_steps",
    "val_every_n_steps",
    "max_val_batches",
    "num_workers",
    "compile",
    "lm_head_on_targets_only",
    "device",
    "attention_backend",
    "enable_activation_checkpointing",
    "fsdp_cpu_offload",
    "fsdp_reshard_after_forward",
    "distributed_backend",
    "val_dataset",
}
# Component arguments that only say where outputs go.
_OUTPUT_ARGS = {"output_dir", "log_dir"}


def _plain(value: Any) -> Any:
    if isinstance(value, DictConfig):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if k not in _OUTPUT_ARGS}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def run_fingerprint(options: Any, *, recipe: str, base_checkpoint_dir: str, world_size: int) -> Dict[str, Any]:
    """The settings of a run that change its result, as plain JSON values.

    Args:
        options: the recipe's typed options (a dataclass).
        recipe (str): the recipe name.
        base_checkpoint_dir (str): where the base weights are; their files' names, sizes and
            head hashes are part of the identity.
        world_size (int): number of ranks (the data order per rank depends on it).
    """
    settings = {
        f.name: _plain(getattr(options, f.name)) for f in dataclasses.fields(options) if f.name not in _NOT_IDENTITY
    }
    source = settings.get("dataset", {}).get("source") if isinstance(settings.get("dataset"), dict) else None
    data = {"file": str(Path(source).resolve()), "stats": file_stats(source)} if source and Path(source).is_file() else None
    return {
        "recipe": recipe,
        "world_size": world_size,
        "base_weights": weights_identity(base_checkpoint_dir),
        "data_file": data,
        "settings": settings,
    }


def write_run_file(output_dir: Path, fingerprint: Dict[str, Any]) -> None:
    """Record the fingerprint (atomically) in ``output_dir/run.json``."""
    tmp = output_dir / f".{RUN_FILE}.tmp"
    tmp.write_text(json.dumps(fingerprint, indent=1, sort_keys=True))
    tmp.replace(output_dir / RUN_FILE)


#: Files a run writes at the top of its output_dir (beside ``checkpoints/``).
_RUN_FILES = (RUN_FILE, "config.yaml", "metrics.jsonl", "torchtune_config.yaml")


def _own_checkpoint_entries(checkpoints: Path) -> List[Path]:
    """What a run wrote under ``checkpoints/``: ``latest``, complete step folders, torn ``*.tmp``."""
    if not checkpoints.is_dir():
        return []
    return [
        p for p in checkpoints.iterdir()
        if p.name == LATEST_FILE or p.name.endswith(".tmp") or (p.is_dir() and (p / RECIPE_STATE_FILE).exists())
    ]  # fmt: skip


def _occupants(output_dir: Path) -> List[str]:
    found = []
    checkpoints = output_dir / "checkpoints"
    if checkpoints.is_dir() and any(checkpoints.iterdir()):
        found.append(f"checkpoints/ ({len([p for p in checkpoints.iterdir() if p.is_dir()])} folder(s))")
    found += [name for name in _RUN_FILES if (output_dir / name).exists()]
    return found


def check_fresh_output_dir(output_dir: Path, *, overwrite: bool) -> None:
    """A fresh run starts in an empty folder (or one without another run's files).

    ``overwrite`` removes only what a run wrote (``run.json`` marks the folder as one): the files
    of :data:`_RUN_FILES` and the checkpoint folders; a folder whose files no run wrote is never
    overwritten, and anything else under ``checkpoints/`` is kept.

    Raises:
        ConfigError: the folder holds another run and ``overwrite`` is False, or it holds files a
            run would write but no ``run.json`` (a user's files).
    """
    found = _occupants(output_dir)
    if not found:
        return
    if not (output_dir / RUN_FILE).exists():
        raise ConfigError(
            f"output_dir={output_dir} holds {found[0]}, which no run wrote (there is no {RUN_FILE}); "
            "a run would overwrite it: choose another output_dir"
        )
    if not overwrite:
        raise ConfigError(
            f"output_dir={output_dir} holds another run ({', '.join(found)}); set "
            "resume_from_checkpoint=True to continue it, overwrite_output_dir=True to replace it, "
            "or choose another output_dir"
        )
    checkpoints = output_dir / "checkpoints"
    for entry in _own_checkpoint_entries(checkpoints):
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    if checkpoints.is_dir() and not any(checkpoints.iterdir()):
        checkpoints.rmdir()
    for name in _RUN_FILES:
        (output_dir / name).unlink(missing_ok=True)


def _differences(recorded: Any, current: Any, prefix: str = "") -> List[str]:
    if isinstance(recorded, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(recorded) | set(current)):
            out += _differences(recorded.get(key), current.get(key), f"{prefix}.{key}" if prefix else str(key))
        return out
    if recorded == current:
        return []
    show = lambda v: v if isinstance(v, str) else json.dumps(v)  # noqa: E731
    return [f"{prefix.removeprefix('settings.')}={show(recorded)} (this config: {show(current)})"]


def check_resume_matches(output_dir: Path, fingerprint: Dict[str, Any]) -> Optional[str]:
    """Refuse to resume a run whose recorded settings differ from this config's.

    Returns:
        A warning when the folder has no ``run.json`` (a run from before it existed), else None.

    Raises:
        ConfigError: naming every differing setting.
    """
    path = output_dir / RUN_FILE
    if not path.exists():
        return f"{output_dir} has no {RUN_FILE}: cannot check that the resumed run used the same settings"
    recorded = json.loads(path.read_text())
    diffs = _differences({k: v for k, v in recorded.items()}, fingerprint)
    if diffs:
        shown = "; ".join(diffs[:4])
        more = f" (+{len(diffs) - 4} more)" if len(diffs) > 4 else ""
        raise ConfigError(
            f"cannot resume {output_dir}: it was trained with {shown}{more}; "
            "resume with the same settings, or start a new run in another output_dir"
        )
    return None
