"""The import graph of ``mas`` keeps its layers, has no cycles, and never imports test fixtures.

The contracts live in pyproject.toml (``[tool.importlinter]``); this runs import-linter's own
``lint-imports`` on them, so a new cycle or an upward import fails the suite with the offending
import chain in the message.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def test_import_contracts_are_kept():
    assert LINT_IMPORTS.exists(), f"{LINT_IMPORTS} missing: pip install -e '.[test]' installs import-linter"
    result = subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    report = result.stdout + result.stderr
    assert result.returncode == 0, f"lint-imports found broken import contracts:\n{report}"
