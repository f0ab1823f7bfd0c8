"""Fingerprints of files and weight folders: what "the same model" and "the same data" mean.

Training runs (``run.json``), evaluation predictions (``identity_<mode>.json``) and the server's
prefix cache key all record what produced them with these functions, so one notion of identity
serves all three. Imports nothing from ``mas``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

__all__ = ["WEIGHT_SUFFIXES", "file_head_identity", "file_sha256", "file_stats", "weights_identity"]

#: File suffixes that hold model weights.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_SMALL_FILE = 1 << 20


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a whole file (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_stats(path: str | os.PathLike) -> List[int]:
    """``[size in bytes, modification time in ns]``: cheap, and changes when a file is replaced."""
    info = Path(path).stat()
    return [info.st_size, info.st_mtime_ns]


def file_head_identity(path: str | os.PathLike) -> List[Any]:
    """``[size in bytes, SHA-256 of the first MiB]``: cheap for a many-GB shard, survives a copy
    of the folder, and changes when the file is replaced by other weights."""
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(_SMALL_FILE)).hexdigest()[:16]
    return [Path(path).stat().st_size, head]


def weights_identity(checkpoint_dir: str | os.PathLike, checkpoint_files: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """A weight folder's fingerprint: its path, hashes of its small JSON files, and each weight
    file's size and head hash (:func:`file_head_identity`).

    Args:
        checkpoint_dir: the checkpointer's folder.
        checkpoint_files: the weight files it loads (None: every weights file in the folder).
    """
    folder = Path(checkpoint_dir).expanduser().resolve()
    names = list(checkpoint_files) if checkpoint_files else sorted(
        p.name for p in folder.glob("*") if p.suffix in WEIGHT_SUFFIXES
    )  # fmt: skip
    weights = {name: file_head_identity(folder / name) for name in names if (folder / name).is_file()}
    configs = {
        p.name: file_sha256(p)[:16]
        for p in sorted(folder.glob("*.json"))
        if p.is_file() and p.stat().st_size <= _SMALL_FILE
    }
    return {"folder": str(folder), "configs": configs, "weights": weights}
