"""An adapter runs only on the base it was trained on (issue 22, item 2).

Fine-tuning records its base in ``run.json`` (each weights file's size and head hash); every
inference recipe loads adapters through :func:`mas.model_weights.load_adapter`, which compares
that record with the base it loads, by content: another tiny base (other ``pretrain_steps``) is
refused with one line, the same base copied to another folder loads, an adapter without a
record loads with a warning.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

import mas_eval
import mas_generate
from mas.checkpointing import latest_checkpoint
from mas.config import EXIT_USER_ERROR, ConfigError, load_config

OTHER_STEPS = 5  # tiny_base_dir is pre-trained 30 steps


def _generate_overrides(base_dir: Path, pretrain_steps: int, **extra) -> list[str]:
    values = {
        "checkpointer.checkpoint_dir": str(base_dir),
        "checkpointer.pretrain_steps": pretrain_steps,
        "max_new_tokens": 6,
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def _eval_overrides(out: Path, base_dir: Path, pretrain_steps: int, **extra) -> list[str]:
    values = {
        "output_dir": str(out),
        "checkpointer.checkpoint_dir": str(base_dir),
        "checkpointer.pretrain_steps": pretrain_steps,
        "progress_bar": False,
        "mode": "loglik",
        "tasks": "[boolq]",
        "limit": 1,
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def _refusal(run: Path, trained_on: Path, given: Path) -> str:
    return (
        rf"adapter {re.escape(str(run))}/checkpoints/step_\d+ was trained on the base in {re.escape(str(trained_on))} "
        rf"with checkpointer\.pretrain_steps=30 \(this config: {OTHER_STEPS}\), not on the weights in "
        rf"checkpointer\.checkpoint_dir={re.escape(str(given))}; point checkpointer\.checkpoint_dir \(and its settings\) "
        rf"at the base recorded in {re.escape(str(run / 'run.json'))}, or set allow_other_base=True to run it on this base anyway$"
    )


def test_adapter_on_another_base_is_refused_by_generate_and_eval(tmp_path, tiny_base_dir, tiny_mas_run):
    other = tmp_path / "other_base"
    message = _refusal(tiny_mas_run, tiny_base_dir, other)
    cfg = load_config("tiny_generate", _generate_overrides(other, OTHER_STEPS, adapter_checkpoint=tiny_mas_run))
    with pytest.raises(ConfigError, match=message):
        mas_generate.run(cfg)
    for checkpoints in ("latest", "all"):
        out = tmp_path / f"eval_{checkpoints}"
        cfg = load_config("tiny_eval", _eval_overrides(out, other, OTHER_STEPS, adapter_checkpoint=tiny_mas_run, checkpoints=checkpoints))
        with pytest.raises(ConfigError, match=message):
            mas_eval.run(cfg)
        assert not list(out.glob("predictions_*")), "refused before evaluating"
    # Without an adapter the other base is simply a base model.
    assert mas_generate.run(load_config("tiny_generate", _generate_overrides(other, OTHER_STEPS)))["texts"]


def test_allow_other_base_runs_the_adapter_with_a_warning_and_results_name_the_base(tmp_path, tiny_base_dir, tiny_mas_run, caplog):
    other = tmp_path / "other_base"
    with caplog.at_level("WARNING"):
        cfg = load_config("tiny_generate", _generate_overrides(other, OTHER_STEPS, adapter_checkpoint=tiny_mas_run, allow_other_base=True))
        assert mas_generate.run(cfg)["texts"]
    warnings = [r.getMessage() for r in caplog.records if r.name == "mas.model_weights"]
    assert len(warnings) == 1 and warnings[0].endswith("running it anyway (allow_other_base=True)"), warnings
    out = tmp_path / "eval"
    mas_eval.run(load_config("tiny_eval", _eval_overrides(out, other, OTHER_STEPS, adapter_checkpoint=tiny_mas_run, allow_other_base=True)))
    results = json.loads((out / "results_loglik.json").read_text())
    assert results["base"]["folder"] == str(other.resolve())
    assert results["base"]["checkpointer"]["pretrain_steps"] == OTHER_STEPS and results["base"]["weights"]


def test_refusal_is_one_line_with_exit_code_2(tmp_path, tiny_base_dir, tiny_mas_run, capsys):
    other = tmp_path / "other_base"
    argv = ["--config", "tiny_generate", *_generate_overrides(other, OTHER_STEPS, adapter_checkpoint=tiny_mas_run)]
    with pytest.raises(SystemExit) as exit_info:
        mas_generate.recipe_main(argv)
    assert exit_info.value.code == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("WARNING", "INFO", "Skipping import"))]
    assert len(lines) == 1, err
    assert re.search(_refusal(tiny_mas_run, tiny_base_dir, other)[:-1], lines[0]), lines[0]


def test_same_base_in_another_folder_loads_and_generates_the_same(tmp_path, tiny_base_dir, tiny_mas_run):
    copy = tmp_path / "copied_base"
    shutil.copytree(tiny_base_dir, copy)
    here = mas_generate.run(load_config("tiny_generate", _generate_overrides(tiny_base_dir, 30, adapter_checkpoint=tiny_mas_run)))
    there = mas_generate.run(load_config("tiny_generate", _generate_overrides(copy, 30, adapter_checkpoint=tiny_mas_run)))
    assert there["texts"] == here["texts"]
    sweep = mas_eval.run(load_config("tiny_eval", _eval_overrides(tmp_path / "sweep", copy, 30, adapter_checkpoint=tiny_mas_run, checkpoints="all")))
    assert len(sweep["loglik"]) == len(list((tiny_mas_run / "checkpoints").glob("step_*")))


def test_adapter_without_a_recorded_base_loads_with_a_warning(tmp_path, tiny_base_dir, tiny_mas_run, caplog):
    """A checkpoint folder copied out of its run (or a PEFT adapter from elsewhere) has no run.json."""
    alone = tmp_path / "adapter"
    shutil.copytree(latest_checkpoint(tiny_mas_run), alone)
    with caplog.at_level("WARNING"):
        result = mas_generate.run(load_config("tiny_generate", _generate_overrides(tiny_base_dir, 30, adapter_checkpoint=alone)))
    assert result["texts"]
    warnings = [r.getMessage() for r in caplog.records if r.name == "mas.model_weights"]
    assert warnings == [
        f"adapter {alone} records no base model (no run.json with base weights beside its checkpoints): "
        f"cannot check that it was trained on the base in {tiny_base_dir}"
    ]


def test_run_without_base_weights_in_run_json_loads_with_a_warning(tmp_path, tiny_base_dir, tiny_mas_run, caplog):
    """A run from before run.json recorded the base."""
    run = tmp_path / "old_run"
    shutil.copytree(tiny_mas_run, run)
    recorded = json.loads((run / "run.json").read_text())
    del recorded["base_weights"]
    (run / "run.json").write_text(json.dumps(recorded))
    with caplog.at_level("WARNING"):
        mas_generate.run(load_config("tiny_generate", _generate_overrides(tiny_base_dir, 30, adapter_checkpoint=run)))
    assert any("records no base model" in r.getMessage() for r in caplog.records if r.name == "mas.model_weights")
