"""The paper's other benchmarks and figures end to end on the tiny model: ``mas_eval`` with the
``tiny_eval_mmlu`` and ``tiny_eval_summarization`` configs (in-process), ``tools/plot_sweep.py``
and ``tools/attention_maps.py`` (subprocesses writing PNGs of the expected pixel size).

Data: the bundled synthetic samples (``mas/assets/mmlu_sample``, ``summarization_sample``); sweep
files are written by the test in the format ``mas_eval checkpoints=all`` writes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from mas.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "tools"


def _eval(config: str, out: Path, base_dir: Path, **extra):
    import mas_eval

    values = {
        "output_dir": str(out),
        "checkpointer.checkpoint_dir": str(base_dir),
        "checkpointer.pretrain_steps": 30,
        "progress_bar": False,
        **extra,
    }
    return mas_eval.run(load_config(config, [f"{k}={v}" for k, v in values.items()]))


def _lines(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_mas_eval_mmlu_in_both_modes(tmp_path, tiny_base_dir):
    out = tmp_path / "mmlu"
    written = _eval("tiny_eval_mmlu", out, tiny_base_dir, limit=2, max_new_tokens=6, tasks="[astronomy,philosophy,nutrition]")
    for mode in ("generate", "loglik"):
        data = json.loads((out / f"results_{mode}.json").read_text())
        assert data == written[mode]
        assert data["benchmark"] == "mmlu" and data["mode"] == mode and data["metric"] == "accuracy"
        assert list(data["tasks"]) == ["astronomy", "nutrition", "philosophy"]
        assert all(t["total"] == 2 for t in data["tasks"].values())
        mean = sum(t["accuracy"] for t in data["tasks"].values()) / 3
        assert data["average_accuracy"] == pytest.approx(mean)
        assert data["micro_accuracy"] == pytest.approx(data["counts"]["correct"] / 6)
        assert set(data["categories"]) == {"STEM", "humanities", "other"}
        records = _lines(out / f"predictions_{mode}.jsonl")
        assert len(records) == 6 and {r["benchmark"] for r in records} == {"mmlu"}
        assert (out / f"results_{mode}.md").read_text().startswith("| Run | STEM | Humanities |")
    for record in _lines(out / "predictions_loglik.jsonl"):
        scores = record["option_scores"]
        assert list(scores) == ["answer1", "answer2", "answer3", "answer4"]
        assert record["prediction"] == max(scores, key=scores.get)
        assert record["correct"] == (record["prediction"] == record["gold"])
    # A rerun resumes: nothing is scored twice.
    again = _eval("tiny_eval_mmlu", out, tiny_base_dir, limit=2, max_new_tokens=6, tasks="[astronomy,philosophy,nutrition]", mode="loglik")
    assert again["loglik"]["tasks"] == written["loglik"]["tasks"]
    assert len(_lines(out / "predictions_loglik.jsonl")) == 6


def test_mas_eval_mmlu_refuses_a_question_longer_than_the_cache(tmp_path, tiny_base_dir):
    from mas.data.rows import DataError

    with pytest.raises(DataError, match=r"MMLU prompt\(s\) exceed .*astronomy_test.csv, line 1"):
        _eval("tiny_eval_mmlu", tmp_path / "short", tiny_base_dir, mode="generate", limit=1, max_cache_len=64)


def test_mas_eval_summarization_truncates_and_scores(tmp_path, tiny_base_dir, caplog):
    out = tmp_path / "summarization"
    with caplog.at_level("WARNING"):
        written = _eval("tiny_eval_summarization", out, tiny_base_dir, max_cache_len=160, max_new_tokens=8, limit=2)
    data = json.loads((out / "results_generate.json").read_text())
    assert data == written["generate"] and data["benchmark"] == "summarization" and data["metric"] == "rougeL"
    assert list(data["tasks"]) == ["billsum_style", "cnn_dailymail_style", "xsum_style"]
    records = _lines(out / "predictions_generate.jsonl")
    assert len(records) == 6
    for record in records:
        assert set(record["scores"]) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}
        assert all(0.0 <= v <= 1.0 for v in record["scores"].values()) and record["correct"] is None
    truncated = [r for r in records if r.get("info", {}).get("truncated_tokens")]
    assert truncated and data["counts"]["truncated"] == len(truncated)
    warning = [m for m in caplog.messages if "documents were cut" in m]
    assert warning and warning[0].startswith(f"{len(truncated)} of 6 documents were cut")
    assert data["average"] == pytest.approx(sum(t["rougeL"] for t in data["tasks"].values()) / 3)
    assert (out / "results_generate.md").read_text().startswith("| Run | Data set | ROUGE-1 |")


def test_mas_eval_summarization_rejects_loglik(tmp_path, tiny_base_dir):
    with pytest.raises(ConfigError, match="set mode=generate"):
        _eval("tiny_eval_summarization", tmp_path / "s", tiny_base_dir, mode="loglik")


def _sweep(path: Path, trained: str, accuracies):
    tasks = ("boolq", "piqa")
    points = [
        {"step": step, "average_accuracy": acc, "tasks": {t: {"accuracy": acc + 0.05 * k} for k, t in enumerate(tasks)}}
        for step, acc in accuracies
    ]
    payload = {"run": f"/runs/{trained}", "trained_attention": trained, "attention": trained,
               "benchmark": "commonsense", "mode": "generate", "points": points}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))
    return path


def _run_tool(*args, timeout=300):
    result = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.parametrize("per_task, panels", [(False, (1, 1)), (True, (3, 1))])
def test_plot_sweep_draws_one_line_per_run(tmp_path, per_task, panels):
    mas = _sweep(tmp_path / "mas" / "sweep_generate.json", "mas", [(3, 0.4), (6, 0.5), (9, 0.6)])
    causal = _sweep(tmp_path / "causal" / "sweep_generate.json", "causal", [(6, 0.45), (3, 0.3), (9, 0.5)])
    out = tmp_path / "sweep.png"
    stdout = _run_tool(TOOLS / "plot_sweep.py", mas, causal, "--out", out, "--dpi", 50, *(["--per-task"] if per_task else []))
    assert f"{panels[0]}x{panels[1]} panels, 2 runs" in stdout
    with Image.open(out) as image:
        assert image.size == (panels[0] * 5.0 * 50, panels[1] * 3.6 * 50)
        assert len(set(image.convert("L").getdata())) > 10  # drawn, not blank


def test_plot_sweep_reads_what_mas_eval_writes(monkeypatch, tmp_path):
    import plot_sweep

    point = {"step": 3, "average_accuracy": None, "tasks": {"xsum": {"rougeL": 0.2}, "cnndm": {"rougeL": 0.4}}}
    assert plot_sweep.point_value(point, "rougeL") == pytest.approx(30.0)
    assert plot_sweep.point_value(point, "rougeL", "cnndm") == pytest.approx(40.0)
    assert plot_sweep.run_label({"trained_attention": "causal", "attention": "mas"}, Path("x")) == "trained causal, eval mas"
    (tmp_path / "results.json").write_text(json.dumps({"tasks": {}}))
    with pytest.raises(ValueError, match="not a sweep file"):
        plot_sweep.load_sweep(tmp_path / "results.json")
    assert plot_sweep.main([str(tmp_path / "absent.json")]) == 2
    assert plot_sweep.main([str(tmp_path)]) == 2  # a folder: one line, not IsADirectoryError's traceback


def test_attention_recorder_is_faithful_and_leaves_outputs_alone(monkeypatch, tiny_model):
    from attention_maps import AttentionRecorder, record

    from mas import CAUSAL, dense_mas_mask, use_mas_attention

    model = use_mas_attention(tiny_model)
    segment_ids = torch.tensor([[0] * 4 + [1] * 5 + [CAUSAL] * 3])
    tokens = torch.randint(0, 1000, (1, 12))
    with torch.inference_mode():
        expected = model(tokens, mask=dense_mas_mask(segment_ids))
        with AttentionRecorder(model, [-1]) as recorder:
            logits = model(tokens, mask=dense_mas_mask(segment_ids))
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    assert recorder.layers == [1] and recorder.max_error[1] < 1e-5
    probs = recorder.probs[1][0]  # [n_h, s, s]
    torch.testing.assert_close(probs.sum(-1), torch.ones(4, 12))
    assert (probs[:, ~dense_mas_mask(segment_ids)[0]] == 0).all()
    assert (probs[:, 0, 1:4] > 0).all()  # MAS: a system token sees the later system tokens
    causal = record(model, tokens, segment_ids, "causal", [0]).probs[0][0]
    assert (causal.triu(1) == 0).all()
    with pytest.raises(ValueError, match="the model has 2 layers"):
        AttentionRecorder(model, [2])


def test_attention_maps_tool_draws_masks_and_maps(tmp_path, tiny_base_dir, tiny_mas_run):
    out = tmp_path / "maps.png"
    stdout = _run_tool(
        TOOLS / "attention_maps.py", "--mas-adapter", tiny_mas_run, "--layers", 0, -1, "--heads", "mean", 1,
        "--override", f"checkpointer.checkpoint_dir={tiny_base_dir}", "--override", "checkpointer.pretrain_steps=30",
        "--override", f"output_dir={tmp_path}", "--user", "Is a whale a fish? Answer format: true/false",
        "--dpi", 30, "--out", out,
    )  # fmt: skip
    assert "5 rows of panels" in stdout
    with Image.open(out) as image:
        assert image.size == (2 * 6.0 * 30, 5 * 5.4 * 30)
        assert len(set(image.convert("L").getdata())) > 10
