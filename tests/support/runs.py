"""Run the recipes on the tiny model in-process, with small settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, List

from mas.config import load_config


def finetune_overrides(output_dir: Path, base_dir: Path, **extra) -> List[str]:
    """Overrides of tiny_mas/tiny_causal for a short run on a shared tiny base checkpoint."""
    values = {
        "output_dir": str(output_dir),
        "checkpointer.checkpoint_dir": str(base_dir),
        "checkpointer.pretrain_steps": 30,
        "progress_bar": False,
        "max_steps_per_epoch": 6,
        "save_every_n_steps": 3,
        "val_every_n_steps": None,
        "batch_size": 4,
        "epochs": 1,
        **extra,
    }
    return [f"{k}={'None' if v is None else v}" for k, v in values.items()]


def run_finetune(config: str, overrides: List[str]):
    """Set up, train and clean up the fine-tuning recipe; returns the recipe object."""
    import mas_lora_finetune

    return mas_lora_finetune.run(load_config(config, overrides))


def tune_command() -> List[str]:
    """The ``tune`` console script of the running interpreter's environment (an unactivated
    virtual environment has it next to ``python``, not on ``PATH``)."""
    import shutil
    import sys

    beside = Path(sys.executable).parent / "tune"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("tune")
    if found is None:
        raise RuntimeError("torchtune's `tune` command is not installed")
    return [found]


def failed_command_line(recipe_main: Callable[[List[str]], object], argv: List[str], capsys: Any) -> str:
    """Run a recipe's command line in-process (what ``tune run`` calls, without a new
    interpreter per case); assert that it stopped with a non-zero exit code and no traceback.

    Returns:
        str: what it wrote to stderr.
    """
    import pytest

    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        recipe_main(argv)
    err = capsys.readouterr().err
    assert stopped.value.code not in (0, None), err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    return err
