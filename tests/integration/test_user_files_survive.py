"""The project deletes or overwrites only what it made (issue 22, item 1).

One table: every path key of the recipes and every path argument of the tools that write is
pointed at a folder holding a user's files (``notes.txt``, plus a file under a name the command
itself writes, where it has one). Each command either refuses with one line (exit 2) or runs;
either way every user file is still there afterwards, byte for byte.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

import pytest

import mas_config
import mas_eval
import mas_generate
import mas_lora_finetune
from mas.config import EXIT_USER_ERROR
from support.runs import finetune_overrides, run_finetune

REPO = Path(__file__).resolve().parents[2]
USER_TEXT = "my own notes, not the project's\n"


def _tool(name: str) -> Callable:
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.main


@dataclass
class Case:
    """A command pointed at ``tmp/user`` (a folder of the user's): what it writes there, if anything."""

    id: str
    main: Callable
    args: Callable[[Path, Path], List[str]]  # (tmp, tiny_base_dir) -> argv
    user_files: tuple = ("notes.txt",)  # created in tmp/user before the command
    exit_code: Optional[int] = EXIT_USER_ERROR  # None: the command runs to the end
    message: str = ""
    destructive_before: bool = False  # the record: this case lost the user's files
    setup: Optional[Callable[[Path, Path], None]] = None


def _ft(tmp: Path, base: Path, *extra: str) -> List[str]:
    return ["--config", "tiny_mas", *finetune_overrides(tmp / "run", base), *extra]


def _gen(tmp: Path, base: Path, *extra: str) -> List[str]:
    return ["--config", "tiny_generate", f"checkpointer.checkpoint_dir={base}", "checkpointer.pretrain_steps=30", "max_new_tokens=2", *extra]


def _eval(tmp: Path, base: Path, *extra: str) -> List[str]:
    return ["--config", "tiny_eval", f"output_dir={tmp}/eval", f"checkpointer.checkpoint_dir={base}", "checkpointer.pretrain_steps=30",
            "mode=loglik", "tasks=[boolq]", "limit=1", "progress_bar=False", *extra]  # fmt: skip


def _a_run_in_user(tmp: Path, base: Path) -> None:
    run_finetune("tiny_mas", finetune_overrides(tmp / "user", base, max_steps_per_epoch=3))


def _rows(tmp: Path, base: Path) -> None:
    (tmp / "user" / "rows.jsonl").write_text('{"text": "a row of my own"}\n' * 8)


CASES = [
    Case("finetune checkpointer.checkpoint_dir (tiny base)", mas_lora_finetune.recipe_main, lambda t, b: _ft(t, b, f"checkpointer.checkpoint_dir={t}/user"),
         message=r"checkpointer.checkpoint_dir=.*/user holds 'notes.txt', which the tiny model's checkpointer did not write", destructive_before=True),
    Case("generate checkpointer.checkpoint_dir (tiny base)", mas_generate.recipe_main, lambda t, b: _gen(t, b, f"checkpointer.checkpoint_dir={t}/user"),
         message=r"checkpointer.checkpoint_dir=.*/user holds 'notes.txt'", destructive_before=True),
    Case("eval checkpointer.checkpoint_dir (tiny base)", mas_eval.recipe_main, lambda t, b: _eval(t, b, f"checkpointer.checkpoint_dir={t}/user"),
         message=r"checkpointer.checkpoint_dir=.*/user holds 'notes.txt'", destructive_before=True),
    Case("tiny base folder with a user's file beside the weights", mas_generate.recipe_main,
         lambda t, b: _gen(t, b, f"checkpointer.checkpoint_dir={t}/user", "checkpointer.pretrain_steps=5"),
         message=r"holds 'notes.txt'.*marked by tiny_model_recipe.json", destructive_before=True,
         setup=lambda t, b: [(t / "user" / n).write_bytes((b / n).read_bytes()) for n in ("model.safetensors", "config.json", "tiny_model_recipe.json")]),
    Case("finetune output_dir holding a config.yaml of the user's", mas_lora_finetune.recipe_main, lambda t, b: _ft(t, b, f"output_dir={t}/user"),
         user_files=("notes.txt", "config.yaml", "metrics.jsonl"), message=r"output_dir=.*/user holds config.yaml, which no run wrote", destructive_before=True),
    Case("finetune overwrite_output_dir keeps a user's file under checkpoints/", mas_lora_finetune.recipe_main,
         lambda t, b: _ft(t, b, f"output_dir={t}/user", "overwrite_output_dir=True", "max_steps_per_epoch=3"),
         user_files=("notes.txt", "checkpoints/notes.txt"), exit_code=None, destructive_before=True, setup=_a_run_in_user),
    Case("eval output_dir holding a config.yaml of the user's", mas_eval.recipe_main, lambda t, b: _eval(t, b, f"output_dir={t}/user"),
         user_files=("notes.txt", "config.yaml"), message=r"output_dir=.*/user holds 'config.yaml', which no evaluation wrote", destructive_before=True),
    Case("eval output_dir holding other files", mas_eval.recipe_main, lambda t, b: _eval(t, b, f"output_dir={t}/user"), exit_code=None),
    Case("generate output_file naming a folder", mas_generate.recipe_main, lambda t, b: _gen(t, b, f"output_file={t}/user"), message=r"user"),
    Case("generate output_file naming the prompts file", mas_generate.recipe_main,
         lambda t, b: _gen(t, b, f"prompts_file={t}/user/notes.txt", f"output_file={t}/user/notes.txt"),
         message=r"output_file .* is the prompts_file", destructive_before=True),
    Case("adapter_checkpoint naming a user's folder", mas_generate.recipe_main, lambda t, b: _gen(t, b, f"adapter_checkpoint={t}/user"), message=r"adapter file not found"),
    Case("mas-config cp onto a user's file", mas_config.main, lambda t, b: ["cp", "tiny_mas", f"{t}/user/notes.txt"], message=r"exists; pass --force"),
    Case("pretrain_tiny_base out: a folder holding its own input", _tool("pretrain_tiny_base"), lambda t, b: [f"{t}/user/rows.jsonl", f"{t}/user", "--steps", "2"],
         user_files=("notes.txt",), message=r"out=.*/user holds 'notes.txt' and 1 more, which pretrain_tiny_base did not write", destructive_before=True, setup=_rows),
    Case("pretrain_tiny_base out: a file", _tool("pretrain_tiny_base"), lambda t, b: [f"{t}/user/rows.jsonl", f"{t}/user/notes.txt", "--steps", "2"],
         message=r"out=.*notes.txt is a file, not a folder", setup=_rows),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_user_files_survive(case, tmp_path, tiny_base_dir, capsys):
    user = tmp_path / "user"
    user.mkdir()
    if case.setup is not None:
        case.setup(tmp_path, tiny_base_dir)
    for name in case.user_files:
        (user / name).parent.mkdir(parents=True, exist_ok=True)
        (user / name).write_text(USER_TEXT)
    before = {p.relative_to(user): p.read_bytes() for p in user.rglob("*") if p.is_file() and (p.name in case.user_files or str(p.relative_to(user)) in case.user_files or p.name == "rows.jsonl")}
    capsys.readouterr()
    argv = case.args(tmp_path, tiny_base_dir)
    if case.exit_code is None:
        result = case.main(argv)
        assert result in (None, 0), result
    else:
        with pytest.raises(SystemExit) as exit_info:
            result = case.main(argv)
            raise SystemExit(result)  # the tools return their exit code
        assert exit_info.value.code == case.exit_code
        err = capsys.readouterr().err
        assert "Traceback" not in err, err
        lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("WARNING", "INFO", "Skipping import"))]
        assert len(lines) == 1, err
        assert __import__("re").search(case.message, lines[0]), lines[0]
    for name, data in before.items():
        assert (user / name).is_file() and (user / name).read_bytes() == data, f"{name} was lost or changed"


def test_table_reports_what_was_destructive():
    assert sum(c.destructive_before for c in CASES) >= 8


def test_draw_mask_never_writes_the_tracked_figure_by_default(tmp_path):
    tracked = REPO / "docs" / "mas_mask.png"
    before = tracked.read_bytes()
    subprocess.run([sys.executable, str(REPO / "tools" / "draw_mask.py"), "--dpi", "20"], cwd=tmp_path, check=True, capture_output=True)
    assert (tmp_path / "mas_mask.png").is_file() and tracked.read_bytes() == before
