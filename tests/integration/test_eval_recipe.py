"""`tune run mas_eval`: outputs, resume, sweeps, cross-evaluation and bad input."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from support.runs import failed_command_line, tune_command

from mas.config import ConfigError, load_config

TASKS = "[boolq,piqa,social_i_qa,winogrande,ARC-Easy,ARC-Challenge,openbookqa]"


def _overrides(out: Path, base_dir: Path, **extra) -> list[str]:
    values = {
        "output_dir": str(out),
        "checkpointer.checkpoint_dir": str(base_dir),
        "checkpointer.pretrain_steps": 30,
        "progress_bar": False,
        "limit": 4,
        "max_new_tokens": 8,
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def _run(out: Path, base_dir: Path, **extra):
    import mas_eval

    return mas_eval.run(load_config("tiny_eval", _overrides(out, base_dir, **extra)))


@pytest.mark.slow
def test_tune_run_eval_writes_json_jsonl_and_table(tmp_path, tiny_base_dir, tiny_mas_run):
    out = tmp_path / "eval"
    cmd = [*tune_command(), "run", "mas_eval", "--config", "tiny_eval", *_overrides(out, tiny_base_dir, adapter_checkpoint=tiny_mas_run)]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for mode in ("generate", "loglik"):
        data = json.loads((out / f"results_{mode}.json").read_text())
        assert data["mode"] == mode and data["attention"] == "mas" and data["trained_attention"] == "mas"
        assert set(data["tasks"]) == {"boolq", "piqa", "social_i_qa", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa"}
        assert all(t["total"] == 4 for t in data["tasks"].values())
        mean = sum(t["accuracy"] for t in data["tasks"].values()) / 7
        assert data["average_accuracy"] == pytest.approx(mean)
        lines = [json.loads(l) for l in (out / f"predictions_{mode}.jsonl").read_text().splitlines()]
        assert len(lines) == 28
        table = (out / f"results_{mode}.md").read_text()
        assert table.startswith("| Run | BoolQ | PIQA | SIQA | HellaSwag | WinoGrande | ARC-e | ARC-c | OBQA | Avg. |")
    loglik = [json.loads(l) for l in (out / "predictions_loglik.jsonl").read_text().splitlines()]
    for record in loglik:
        scores = record["option_scores"]
        assert record["prediction"] == max(scores, key=scores.get)
        assert record["correct"] == (record["prediction"] == record["gold"])


def test_interrupted_eval_resumes_to_the_same_numbers(tmp_path, tiny_base_dir, tiny_mas_run):
    full = _run(tmp_path / "full", tiny_base_dir, adapter_checkpoint=tiny_mas_run, mode="generate")
    interrupted = tmp_path / "interrupted"
    _run(interrupted, tiny_base_dir, adapter_checkpoint=tiny_mas_run, mode="generate")
    predictions = interrupted / "predictions_generate.jsonl"
    lines = predictions.read_text().splitlines()
    # Keep 11 whole lines and half of the 12th, as a kill mid-write would leave.
    predictions.write_text("\n".join(lines[:11]) + "\n" + lines[11][: len(lines[11]) // 2])
    (interrupted / "results_generate.json").unlink()
    resumed = _run(interrupted, tiny_base_dir, adapter_checkpoint=tiny_mas_run, mode="generate")
    assert resumed["generate"]["tasks"] == full["generate"]["tasks"]
    assert len(predictions.read_text().splitlines()) == 28


def test_checkpoint_sweep_and_cross_evaluation(tmp_path, tiny_base_dir, tiny_mas_run, caplog):
    sweep = _run(tmp_path / "sweep", tiny_base_dir, adapter_checkpoint=tiny_mas_run, checkpoints="all", mode="loglik", limit=2)
    points = json.loads((tmp_path / "sweep" / "sweep_loglik.json").read_text())["points"]
    steps = sorted(int(p.name.split("_")[1]) for p in (tiny_mas_run / "checkpoints").glob("step_*"))
    assert [p["step"] for p in points] == steps == [p["step"] for p in sweep["loglik"]]
    with caplog.at_level("WARNING"):
        cross = _run(tmp_path / "cross", tiny_base_dir, adapter_checkpoint=tiny_mas_run, attention="causal", mode="loglik", limit=2)
    assert cross["loglik"]["attention"] == "causal" and cross["loglik"]["trained_attention"] == "mas"
    assert "attention=causal is used as configured, but the adapter was trained with attention=mas" in caplog.text
    # Left unset, the prompt keys follow the adapter (trained with MAS).
    first = sorted((tmp_path / "sweep").glob("step_*"))[0]
    assert json.loads((first / "results_loglik.json").read_text())["attention"] == "mas"


def _bad_data(tmp_path: Path, rows) -> Path:
    folder = tmp_path / "data"
    folder.mkdir(exist_ok=True)
    (folder / "boolq.json").write_text(json.dumps(rows))
    return folder


def test_chosen_checkpoints_only_and_a_missing_step_is_one_line(tmp_path, tiny_base_dir, tiny_mas_run):
    import shutil

    from mas.checkpointing import step_checkpoints

    run = tmp_path / "tiny_mas"
    shutil.copytree(tiny_mas_run, run)
    last = list(step_checkpoints(run))[-1]
    for step in (3, 6):  # the run's adapter under earlier steps' names: three checkpoints in all
        shutil.copytree(run / "checkpoints" / f"step_{last:07d}", run / "checkpoints" / f"step_{step:07d}")
    sweep = _run(tmp_path / "chosen", tiny_base_dir, adapter_checkpoint=run, checkpoints=f"[{last},3]", mode="loglik", limit=1)
    assert [p["step"] for p in sweep["loglik"]] == [3, last]
    assert sorted(p.name for p in (tmp_path / "chosen").glob("step_*")) == ["step_0000003", f"step_{last:07d}"]
    with pytest.raises(ConfigError, match=rf"checkpoints: step 99999 has no complete checkpoint under .* \(steps there: 3, 6, {last}\)"):
        _run(tmp_path / "missing", tiny_base_dir, adapter_checkpoint=run, checkpoints="[3,99999]", mode="loglik")
    with pytest.raises(ConfigError, match=r"checkpoints: a list of steps must name at least one step >= 1"):
        _run(tmp_path / "empty", tiny_base_dir, adapter_checkpoint=run, checkpoints="[]", mode="loglik")


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"tasks": "[boolq,storycloze]"}, r"unknown commonsense task 'storycloze'"),
        ({"tasks": "[hellaswag]"}, r"hellaswag"),
        ({"mode": "vote"}, r"mode must be 'generate', 'loglik', 'exact', 'both' or 'all', got 'vote'"),
        ({"checkpoints": "all"}, "checkpoints=all needs adapter_checkpoint"),
        ({"checkpoints": "[5,10]"}, r"checkpoints=\[5,10\] needs adapter_checkpoint"),
        ({"checkpoints": "[5,last]"}, r"checkpoints: expected latest \| all or list of int"),
    ],
)
def test_bad_eval_configs_fail_clearly(tmp_path, tiny_base_dir, extra, message, capsys, monkeypatch):
    import mas_eval

    monkeypatch.chdir(tmp_path)
    err = failed_command_line(mas_eval.recipe_main, ["--config", "tiny_eval", *_overrides(tmp_path / "e", tiny_base_dir, **extra)], capsys)
    assert re.search(message, err, re.IGNORECASE), err[-2000:]


def test_row_without_answer_names_file_and_row(tmp_path, tiny_base_dir):
    from mas.data import DataError

    good = {"instruction": "Please answer true or false: is ice cold?\n\nAnswer format: true/false", "input": "", "output": "the correct answer is true", "answer": "true"}
    data = _bad_data(tmp_path, [good, {k: v for k, v in good.items() if k != "answer"}])
    with pytest.raises(DataError, match=r"boolq\.json, row 1: .*'answer'"):
        _run(tmp_path / "e", tiny_base_dir, data_dir=data, tasks="[boolq]")
