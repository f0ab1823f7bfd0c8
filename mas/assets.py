"""Where the files bundled with the package live (``mas/assets``).

The bundled files are small samples and a tiny tokenizer that let everything run offline:

* ``commonsense/``: Commonsense170K-format training and test samples;
* ``mmlu_sample/``, ``summarization_sample/``: evaluation samples;
* ``tiny_tokenizer/``: the tiny Llama 3 tokenizer (``tools/make_tiny_tokenizer.py``).

This module imports nothing from ``mas``, so configs, models and data can all use it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

__all__ = ["ASSETS_DIR", "COMMONSENSE_TRAIN_SAMPLE", "TINY_TOKENIZER_DIR", "commonsense_train_rows"]

#: The folder of bundled files, wherever the package is installed.
ASSETS_DIR: Path = Path(__file__).resolve().parent / "assets"

#: The tiny Llama 3 tokenizer: ``tokenizer.model`` (tiktoken) and ``special_tokens.json``.
TINY_TOKENIZER_DIR: Path = ASSETS_DIR / "tiny_tokenizer"

#: 600 Commonsense170K-format training rows: the tiny runs' training data, and the text the tiny
#: tokenizers and the demo model's pre-training are built from.
COMMONSENSE_TRAIN_SAMPLE: Path = ASSETS_DIR / "commonsense" / "train_sample" / "commonsense_train_600.json"


def commonsense_train_rows() -> List[Dict[str, str]]:
    """The 600 bundled Commonsense170K-format training rows (``instruction``, ``input``, ``output``, ``answer``)."""
    return json.loads(COMMONSENSE_TRAIN_SAMPLE.read_text())
