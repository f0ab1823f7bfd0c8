"""Evaluation results: accuracies, results JSON, predictions JSONL with resume, tables, compare tool."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mas.data.rows import DataError
from mas.evaluation.answers import extract_answer, is_correct
from mas.evaluation.results import (
    EvalResults,
    PredictionRecord,
    append_predictions,
    load_done,
    load_results,
    markdown_table,
    win_rate_row,
)
from mas.evaluation.tasks import load_task

REPO = Path(__file__).resolve().parents[3]
COMPARE_TOOL = REPO / "tools" / "compare_results.py"


def _record(task, index, gold, generation):
    prediction = extract_answer(task, generation)
    return PredictionRecord(task, index, gold, prediction, is_correct(task, prediction, gold), "generate", generation)


@pytest.fixture
def results():
    """boolq 3/4 right (one no-answer), piqa 1/2 right."""
    run = EvalResults()
    run.extend([
        _record("boolq", 0, "true", "the correct answer is true"),
        _record("boolq", 1, "false", "false"),
        _record("boolq", 2, "true", "True."),
        _record("boolq", 3, "false", "I do not know"),
        _record("piqa", 0, "solution1", "solution1"),
        _record("piqa", 1, "solution1", "solution2"),
    ])
    return run


def _results_dict(model, attention, accuracies):
    """A results object with the given accuracy per task (out of 100 examples)."""
    tasks = {n: {"accuracy": a, "correct": round(100 * a), "total": 100, "no_answer": 0} for n, a in accuracies.items()}
    return {"model": model, "attention": attention, "mode": "generate", "tasks": tasks}


def test_accuracies_average_and_no_answers(results):
    assert results.accuracy("boolq") == pytest.approx(0.75)
    assert results.accuracy("PIQA") == pytest.approx(0.5)
    assert results.accuracy("hellaswag") is None
    assert results.average_accuracy() == pytest.approx((0.75 + 0.5) / 2)  # mean over tasks, not examples
    counts = results.task_counts()
    assert list(counts) == ["boolq", "piqa"]
    assert counts["boolq"] == {"accuracy": 0.75, "correct": 3, "total": 4, "no_answer": 1}


def test_results_json_round_trip(results, tmp_path):
    written = results.write_json(
        tmp_path / "run" / "results.json", model="tiny", attention="mas", mode="generate", limit=4,
        config="tiny_mas", extra={"seed": 3},
    )
    loaded = load_results(tmp_path / "run" / "results.json")
    assert loaded == written
    assert loaded["model"] == "tiny" and loaded["attention"] == "mas" and loaded["limit"] == 4
    assert loaded["config"] == "tiny_mas" and loaded["seed"] == 3
    assert loaded["counts"] == {"examples": 6, "correct": 4, "no_answer": 1}
    assert loaded["no_answer"] == {"boolq": 1, "piqa": 0}
    assert loaded["average_accuracy"] == pytest.approx(0.625)
    with pytest.raises(ValueError, match="some records were scored in"):
        results.to_dict(model="tiny", attention="mas", mode="loglik")


def test_results_file_errors(tmp_path):
    with pytest.raises(DataError, match="results file not found"):
        load_results(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text(json.dumps({"tasks": {"bogus": {"accuracy": 1}}}))
    with pytest.raises(DataError, match="bogus"):
        load_results(tmp_path / "bad.json")


def test_predictions_jsonl_round_trip_and_resume(results, tmp_path):
    path = tmp_path / "predictions.jsonl"
    assert load_done(path) == {}
    records = list(results.records.values())
    append_predictions(path, records[:4])
    append_predictions(path, records[4:])
    assert len(path.read_text().splitlines()) == 6
    done = load_done(path)
    assert set(done) == {r.key for r in records}
    assert done[("boolq", 3)].prediction is None and done[("boolq", 3)].generation == "I do not know"
    resumed = EvalResults()
    resumed.extend(done.values())
    assert resumed.task_counts() == results.task_counts()


def test_resume_after_an_interrupted_write(results, tmp_path):
    path = tmp_path / "predictions.jsonl"
    records = list(results.records.values())
    append_predictions(path, records[:2])
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"task": "boolq", "index": 2, "gol')  # killed mid-line
    assert set(load_done(path)) == {("boolq", 0), ("boolq", 1)}
    append_predictions(path, records[2:3])  # the remnant is cut, the new line stands alone
    assert set(load_done(path)) == {("boolq", 0), ("boolq", 1), ("boolq", 2)}
    path.write_text(path.read_text() + "not json\n" + json.dumps({"task": "boolq"}) + "\n")
    with pytest.raises(DataError, match="line 4: not a prediction record"):
        load_done(path)


def test_loglik_records_keep_option_scores(tmp_path):
    record = PredictionRecord("winogrande", 0, "option2", "option2", True, "loglik",
                              option_scores={"option1": -3.5, "option2": -1.25})
    append_predictions(tmp_path / "p.jsonl", [record])
    assert load_done(tmp_path / "p.jsonl")[("winogrande", 0)] == record
    with pytest.raises(ValueError, match="mode must be one of"):
        PredictionRecord("boolq", 0, "true", "true", True, "sample")


def test_markdown_table_in_the_papers_layout(results):
    table = markdown_table([("tiny (mas)", results.to_dict(model="tiny", attention="mas", mode="generate"))])
    header, rule, row = table.splitlines()
    assert header == "| Run | BoolQ | PIQA | SIQA | HellaSwag | WinoGrande | ARC-e | ARC-c | OBQA | Avg. |"
    assert rule.count("---") == 10
    assert row == "| tiny (mas) | 75.0 | 50.0 | – | – | – | – | – | – | 62.5 (2/8) |"
    full = _results_dict("m", "causal", {n: 0.5 for n in
                                         ["boolq", "piqa", "social_i_qa", "hellaswag", "winogrande",
                                          "ARC-Easy", "ARC-Challenge", "openbookqa"]})
    assert markdown_table([("m", full)]).splitlines()[2].endswith("| 50.0 |")


def test_win_rate_row_counts_strict_wins_per_task_and_overall():
    pairs = [
        (_results_dict("a", "causal", {"boolq": 0.60, "piqa": 0.70}),
         _results_dict("a", "mas", {"boolq": 0.65, "piqa": 0.70})),  # boolq win, piqa tie
        (_results_dict("b", "causal", {"boolq": 0.80, "piqa": 0.50}),
         _results_dict("b", "mas", {"boolq": 0.85, "piqa": 0.40})),  # boolq win, piqa loss
    ]
    row = win_rate_row(pairs, label="MAS wins")
    assert row == "| MAS wins | 100% (2/2) | 0% (0/2) | – | – | – | – | – | – | 50% (2/4) |"


def test_load_task_to_table_end_to_end():
    run = EvalResults()
    for example in load_task("winogrande", limit=5).examples:
        run.add(_record("winogrande", example.index, example.answer, example.output))
    assert run.accuracy("winogrande") == 1.0


def _write_run(folder, name, model, attention, accuracies):
    path = folder / f"{name}.json"
    path.write_text(json.dumps(_results_dict(model, attention, accuracies)))
    return path


def test_compare_tool_prints_table_with_win_rate(tmp_path):
    causal = _write_run(tmp_path, "causal", "tiny", "causal", {"boolq": 0.5, "piqa": 0.6, "ARC-Easy": 0.3})
    mas = _write_run(tmp_path, "mas", "tiny", "mas", {"boolq": 0.7, "piqa": 0.55, "ARC-Easy": 0.4})
    out = tmp_path / "table.md"
    completed = subprocess.run(
        [sys.executable, str(COMPARE_TOOL), str(causal), str(mas), "--labels", "Causal", "MAS", "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    assert lines[0].startswith("| Run | BoolQ | PIQA | SIQA |")
    assert lines[2] == "| Causal | 50.0 | 60.0 | – | – | – | 30.0 | – | – | 46.7 (3/8) |"
    assert lines[3] == "| MAS | 70.0 | 55.0 | – | – | – | 40.0 | – | – | 55.0 (3/8) |"
    assert lines[4] == (
        "| mas > causal (win rate) | 100% (1/1) | 0% (0/1) | – | – | – | 100% (1/1) | – | – | 67% (2/3) |"
    )
    assert out.read_text() == completed.stdout


def test_compare_tool_pairs_by_model_and_reports_unpaired_and_ambiguous_runs(tmp_path, monkeypatch, capsys):
    import compare_results

    runs = [
        _write_run(tmp_path, "a_causal", "a", "causal", {"boolq": 0.5}),
        _write_run(tmp_path, "b_mas", "b", "mas", {"boolq": 0.9}),  # no causal run of model b
        _write_run(tmp_path, "a_mas", "a", "mas", {"boolq": 0.4}),
    ]
    assert compare_results.main([str(p) for p in runs]) == 0
    printed = capsys.readouterr().out
    assert "| a (causal) | 50.0 |" in printed and "| b (mas) | 90.0 |" in printed
    assert "| mas > causal (win rate) | 0% (0/1) |" in printed
    assert "Not in the win rate (no partner run): b (mas)." in printed

    duplicate = _write_run(tmp_path, "a_mas_again", "a", "mas", {"boolq": 0.6})
    assert compare_results.main([str(runs[0]), str(runs[2]), str(duplicate)]) == 2
    assert "both mas runs of model 'a'" in capsys.readouterr().err
