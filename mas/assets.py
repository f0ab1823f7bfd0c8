"""Where the files bundled with the package live (``mas/assets``).

The bundled files are small samples and a tiny tokenizer that let everything run offline:

* ``commonsense/``: Commonsense170K-format training and test samples;
* ``mmlu_sample/``, ``summarization_sample/``: evaluation samples;
* ``tiny_tokenizer/``: the tiny Llama 3 tokenizer (``tools/make_tiny_tokenizer.py``).

This module imports nothing from ``mas``, so configs, models and data can all use it.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["ASSETS_DIR", "TINY_TOKENIZER_DIR", "asset_path"]

#: The folder of bundled files, wherever the package is installed.
ASSETS_DIR: Path = Path(__file__).resolve().parent / "assets"

#: The tiny Llama 3 tokenizer: ``tokenizer.model`` (tiktoken) and ``special_tokens.json``.
TINY_TOKENIZER_DIR: Path = ASSETS_DIR / "tiny_tokenizer"


def asset_path(relative: str) -> Path:
    """The bundled file ``relative`` (e.g. ``commonsense/train_sample/commonsense_train_600.json``).

    Raises:
        FileNotFoundError: naming the bundled folder, when the file is not there.
    """
    path = ASSETS_DIR / relative
    if not path.exists():
        raise FileNotFoundError(f"no bundled asset {relative!r} under {ASSETS_DIR}")
    return path
