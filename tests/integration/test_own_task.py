"""Your own task end to end on the tiny model: a task file evaluated in every mode with groups,
resumed, compared; run identity across adapters and checkpoints; the docs/own_task.md example.

Data: made-up comparison questions written by the tests ("Is 3 bigger, smaller or equal to 5?").
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from support.runs import tune_command

from mas.config import ConfigError, load_config
from mas.evaluation import experiment_name

REPO = Path(__file__).resolve().parents[2]
LABELS = ("bigger", "smaller", "equal")


def _rows(count: int, seed: int):
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        answer = LABELS[0] if a > b else LABELS[1] if a < b else LABELS[2]
        rows.append({
            "instruction": f"Is {a} bigger, smaller or equal to {b}?\n\nAnswer format: bigger/smaller/equal",
            "input": "", "output": f"the correct answer is {answer}", "answer": answer, "kind": "same" if a == b else "different",
        })  # fmt: skip
    return rows


def _write_task(folder: Path, rows) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "tasks.yaml").write_text(
        "benchmark: compare\n"
        "tasks:\n"
        "  - name: compare\n    rows: test.jsonl\n    labels: [bigger, smaller, equal]\n    modes: [generate, loglik]\n    group_by: kind\n"
        "  - name: compare_exact\n    rows: test.jsonl\n    answer_field: output\n    modes: [exact]\n"
    )
    return folder / "tasks.yaml"


def _eval(out: Path, base_dir: Path, attention: str = "mas", **extra):
    import mas_eval

    values = {
        "attention": attention,
        "output_dir": str(out),
        "checkpointer.checkpoint_dir": str(base_dir),
        "checkpointer.pretrain_steps": 30,
        "progress_bar": False,
        "max_new_tokens": 8,
        **extra,
    }
    return mas_eval.run(load_config("tiny_eval", [f"{k}={v}" for k, v in values.items()]))


def _lines(path: Path):
    return path.read_text().splitlines()


def test_user_task_in_every_mode_with_groups_resume_and_compare(tmp_path, tiny_base_dir):
    task_file = _write_task(tmp_path / "task", _rows(8, seed=1))
    common = {"task_file": task_file, "benchmark": "compare", "tasks": "null", "mode": "all"}
    written = _eval(tmp_path / "mas", tiny_base_dir, **common)
    assert list(written) == ["generate", "loglik", "exact"]
    for mode, data in written.items():
        assert data["benchmark"] == "compare" and data["format"] == "mas-user-results/1"
        assert list(data["tasks"]) == (["compare_exact"] if mode == "exact" else ["compare"])
        assert data["experiment"] == "base" and data["run_name"] == "base model (trained base, eval mas)"
        table = (tmp_path / "mas" / f"results_{mode}.md").read_text()
        assert table.startswith(f"| Run | {list(data['tasks'])[0]} | Avg. |")  # only the tasks that were run
    groups = written["loglik"]["tasks"]["compare"]["groups"]
    records = [json.loads(line) for line in _lines(tmp_path / "mas" / "predictions_loglik.jsonl")]
    assert sum(g["total"] for g in groups.values()) == 8 and len(records) == 8
    for name, group in groups.items():
        mine = [r for r in records if r["info"]["group"] == name]
        assert group["correct"] == sum(r["correct"] for r in mine) and group["total"] == len(mine)
    for record in records:
        assert list(record["option_scores"]) == list(LABELS)
        assert record["prediction"] == max(record["option_scores"], key=record["option_scores"].get)

    # An interrupted run resumes to the same numbers: 3 whole lines and half of the 4th are left.
    predictions = tmp_path / "mas" / "predictions_generate.jsonl"
    lines = _lines(predictions)
    predictions.write_text("\n".join(lines[:3]) + "\n" + lines[3][: len(lines[3]) // 2])
    resumed = _eval(tmp_path / "mas", tiny_base_dir, **{**common, "mode": "generate"})
    assert resumed["generate"]["tasks"] == written["generate"]["tasks"] and len(_lines(predictions)) == 8

    # The causal prompt mask on the same base model: tabulated, never paired (nothing fine-tuned).
    _eval(tmp_path / "causal", tiny_base_dir, attention="causal", **{**common, "mode": "loglik"})
    out = subprocess.run(
        [sys.executable, str(REPO / "tools" / "compare_results.py"), str(tmp_path / "causal" / "results_loglik.json"),
         str(tmp_path / "mas" / "results_loglik.json")], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("| Run | compare | Avg. |")
    assert "| mas > causal (win rate) |" not in out.stdout and "| compare: group |" in out.stdout
    assert "Not in the win rate (base model without an adapter: nothing fine-tuned to compare): base model (trained base, eval causal), base model (trained base, eval mas)." in out.stdout


def test_user_task_config_errors_are_one_line(tmp_path, tiny_base_dir):
    task_file = _write_task(tmp_path / "task", _rows(2, seed=2))
    with pytest.raises(ConfigError, match="set benchmark=compare"):
        _eval(tmp_path / "e", tiny_base_dir, task_file=task_file, tasks="null")
    with pytest.raises(ConfigError, match="has no exact mode"):
        _eval(tmp_path / "e", tiny_base_dir, mode="exact")


def _copy_with_other_weights(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    for weights in to.glob("checkpoints/step_*/adapter_model.safetensors"):
        state = load_file(str(weights))
        save_file({k: v + 0.01 * torch.randn_like(v) for k, v in state.items()}, str(weights))
    return to


def test_two_adapters_into_one_folder_never_share_predictions(tmp_path, tiny_base_dir, tiny_mas_run):
    other = _copy_with_other_weights(tiny_mas_run, tmp_path / "other_mas")
    out = tmp_path / "eval"
    first = _eval(out, tiny_base_dir, adapter_checkpoint=tiny_mas_run, mode="loglik", limit=2)
    before = (out / "predictions_loglik.jsonl").read_text()
    with pytest.raises(ConfigError, match=r"holds predictions of another run \(adapter\.folder: .*resume=False to overwrite them"):
        _eval(out, tiny_base_dir, adapter_checkpoint=other, mode="loglik", limit=2)
    assert (out / "predictions_loglik.jsonl").read_text() == before
    second = _eval(out, tiny_base_dir, adapter_checkpoint=other, mode="loglik", limit=2, resume=False)
    scores = lambda path: [json.loads(line)["option_scores"] for line in _lines(path)]  # noqa: E731
    assert scores(out / "predictions_loglik.jsonl") != [json.loads(line)["option_scores"] for line in before.splitlines()]
    assert first["loglik"]["identity"] != second["loglik"]["identity"]


def test_sweep_keys_each_checkpoint_by_its_own_identity(tmp_path, tiny_base_dir, tiny_mas_run):
    out = tmp_path / "sweep"
    _eval(out, tiny_base_dir, adapter_checkpoint=tiny_mas_run, checkpoints="all", mode="loglik", limit=1)
    folders = sorted((p.parent for p in (tiny_mas_run / "checkpoints").glob("step_*/recipe_state.pt")), key=lambda p: int(p.name[5:]))
    steps = [int(p.name[5:]) for p in folders]
    identities = [json.loads((out / p.name / "identity_loglik.json").read_text()) for p in folders]
    assert [i["identity"]["adapter"]["step"] for i in identities] == steps
    assert len({i["digest"] for i in identities}) == len(steps)
    sweep = json.loads((out / "sweep_loglik.json").read_text())
    assert sweep["experiment"] == experiment_name(tiny_mas_run.name) and sweep["points"][0]["step"] == steps[0]


def test_format_only_base_learns_rows_with_random_answers(tmp_path):
    from mas.data import DataError
    from mas.models.pretrain_base import BASE_RECIPE_FILE, row_texts, write_tiny_base

    rows = _rows(40, seed=5)
    source = tmp_path / "train.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = row_texts(source, random_answers=["yes", "no"], seed=1)
    assert texts == row_texts(source, random_answers=["yes", "no"], seed=1)  # seeded
    answers = [t.rsplit("the correct answer is ", 1)[1] for t in texts]
    assert set(answers) == {"yes", "no"}  # every answer replaced, both labels drawn
    assert all(r["instruction"] in t for r, t in zip(rows, texts))
    assert all("the correct answer is" not in t for t in row_texts(source))  # the default: prompts only
    folder = write_tiny_base(source, tmp_path / "base", steps=2, random_answers=["yes", "no"])
    assert json.loads((folder / BASE_RECIPE_FILE).read_text())["random_answers"] == ["yes", "no"]
    source.write_text(json.dumps({**rows[0], "output": "no answer here"}) + "\n")
    with pytest.raises(DataError, match=r"train.jsonl, line 1: its output .no answer here. does not contain its answer .smaller."):
        row_texts(source, random_answers=["yes"])


@pytest.mark.slow
def test_docs_worked_example_runs_end_to_end(tmp_path):
    """docs/own_task.md at a small size: own JSONL -> tiny base -> MAS and causal fine-tunes ->
    the four train/eval crossings -> compare_results."""
    own = tmp_path / "own"
    own.mkdir()
    (own / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(48, seed=3)))
    task_file = _write_task(own, _rows(6, seed=4))
    tool = subprocess.run(
        [sys.executable, str(REPO / "tools" / "pretrain_tiny_base.py"), str(own / "train.jsonl"), str(own / "base"), "--steps", "30"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert tool.returncode == 0, tool.stderr[-2000:]
    base = tool.stdout.splitlines()[-1].split()
    assert base[0] == "checkpointer._component_=torchtune.training.FullModelHFCheckpointer"
    base = [b.strip("'") for b in base]
    for attention in ("mas", "causal"):
        cmd = [*tune_command(), "run", "mas_lora_finetune", "--config", f"tiny_{attention}", f"output_dir={own}/cmp_{attention}",
               *base, f"dataset.source={own}/train.jsonl", "dataset.rows=null", "~val_dataset", "val_every_n_steps=null",
               "epochs=1", "max_steps_per_epoch=4", "save_every_n_steps=null", "progress_bar=False"]  # fmt: skip
        result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
    results = []
    for trained in ("mas", "causal"):
        for evaluated in ("mas", "causal"):
            out = own / f"eval_{trained}_{evaluated}"
            cmd = [*tune_command(), "run", "mas_eval", "--config", "tiny_eval", f"attention={evaluated}", f"output_dir={out}",
                   *base, f"adapter_checkpoint={own}/cmp_{trained}", f"task_file={task_file}", "benchmark=compare",
                   "tasks=null", "mode=loglik", "progress_bar=False"]  # fmt: skip
            result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
            assert result.returncode == 0, result.stderr[-3000:]
            results.append(out / "results_loglik.json")
    table = subprocess.run([sys.executable, str(REPO / "tools" / "compare_results.py"), *map(str, results)],
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert table.returncode == 0, table.stderr
    assert table.stdout.startswith("| Run | compare | Avg. |")
    assert "| mas > causal (win rate) |" in table.stdout
    assert "Win rate: 1 causal/mas pair(s) matched by recorded base model, benchmark and mode" in table.stdout
    assert "cross-evaluations, trained and evaluated differently): cmp_mas" in table.stdout
