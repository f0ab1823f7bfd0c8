"""Run identity of evaluation outputs, run names, and how compare_results pairs runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mas.config import ConfigError
from mas.evaluation.identity import (
    RunIdentity,
    adapter_identity,
    adapter_run_name,
    adapter_step,
    base_identity,
    claim_predictions,
    experiment_name,
    identity_path,
)

REPO = Path(__file__).resolve().parents[3]


def _adapter(folder: Path, payload: bytes) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(payload)
    return folder


def _identity(adapter: Path, **changes) -> RunIdentity:
    fields = {"adapter": adapter_identity(adapter, "adapter_model.safetensors"), "attention": "mas", "mode": "generate", **changes}
    return RunIdentity(fields)


@pytest.mark.parametrize(
    "path, run, experiment, step",
    [
        ("/runs/tiny_mas", "tiny_mas", "tiny", None),
        ("/runs/tiny_causal/checkpoints/step_36", "tiny_causal", "tiny", 36),
        ("/runs/llama3_2_1b_mas_1024/checkpoints/step_7", "llama3_2_1b_mas_1024", "llama3_2_1b_1024", 7),
        (None, "base", "base", None),
    ],
)
def test_run_and_experiment_names(path, run, experiment, step):
    assert adapter_run_name(path) == run and experiment_name(run) == experiment
    assert adapter_step(Path(path) if path else None) == step


def test_predictions_of_another_adapter_are_never_reused(tmp_path):
    first = _adapter(tmp_path / "a" / "checkpoints" / "step_3", b"weights of a")
    second = _adapter(tmp_path / "b" / "checkpoints" / "step_3", b"weights of b")
    predictions = tmp_path / "eval" / "predictions_generate.jsonl"
    claim_predictions(predictions, _identity(first), resume=True)
    recorded = json.loads(identity_path(predictions).read_text())
    assert recorded["identity"]["adapter"]["step"] == 3 and identity_path(predictions).name == "identity_generate.json"
    predictions.write_text('{"task": "boolq"}\n')
    claim_predictions(predictions, _identity(first), resume=True)  # the same run resumes
    assert predictions.exists()
    with pytest.raises(ConfigError) as refused:
        claim_predictions(predictions, _identity(second), resume=True)
    message = str(refused.value)
    assert "holds predictions of another run (adapter.folder:" in message and "adapter.weights_sha256" in message
    assert message.endswith("set output_dir=<a new folder> to keep both, or resume=False to overwrite them")
    assert "\n" not in message
    with pytest.raises(ConfigError, match=r"attention: mas -> causal"):
        claim_predictions(predictions, _identity(first, attention="causal"), resume=True)
    claim_predictions(predictions, _identity(second), resume=False)  # starts over
    assert not predictions.exists()
    assert json.loads(identity_path(predictions).read_text())["identity"]["adapter"]["folder"] == str(second.resolve())


def test_same_folder_new_weights_is_another_run(tmp_path):
    adapter = _adapter(tmp_path / "run" / "checkpoints" / "step_5", b"v1")
    predictions = tmp_path / "eval" / "predictions_loglik.jsonl"
    claim_predictions(predictions, _identity(adapter), resume=True)
    predictions.write_text("{}\n")
    (adapter / "adapter_model.safetensors").write_bytes(b"v2")  # retrained into the same folder
    with pytest.raises(ConfigError, match="adapter.weights_sha256"):
        claim_predictions(predictions, _identity(adapter), resume=True)


def test_predictions_without_identity_are_refused(tmp_path):
    predictions = tmp_path / "predictions_generate.jsonl"
    predictions.write_text('{"task": "boolq"}\n')
    with pytest.raises(ConfigError, match="without a recorded run identity"):
        claim_predictions(predictions, RunIdentity({"attention": "mas"}), resume=True)


def test_base_identity_sees_config_and_weights(tmp_path):
    (tmp_path / "config.json").write_text('{"hidden_size": 64}')
    (tmp_path / "model.safetensors").write_bytes(b"x" * 10)
    before = base_identity(tmp_path)
    assert list(before["weights"]) == ["model.safetensors"] and before["weights"]["model.safetensors"][0] == 10
    (tmp_path / "config.json").write_text('{"hidden_size": 128}')
    assert base_identity(tmp_path)["configs"] != before["configs"]


def _results(path: Path, **fields) -> Path:
    data = {"benchmark": "commonsense", "mode": "generate", "tasks": {"boolq": {"accuracy": fields.pop("acc"), "correct": 1, "total": 2, "no_answer": 0}}}
    path.write_text(json.dumps({**data, **fields}))
    return path


def _default(tmp_path, name, trained, evaluated, acc, step=36):
    run = f"tiny_{trained}"
    return _results(
        tmp_path / f"{name}.json", acc=acc, model=f"{run} step {step} (trained {trained}, eval {evaluated})",
        run_name=f"{run} step {step} (trained {trained}, eval {evaluated})", attention=evaluated,
        trained_attention=trained, experiment="tiny", run=run, step=step,
    )  # fmt: skip


def test_compare_pairs_default_named_runs_of_one_experiment(tmp_path, monkeypatch, capsys):
    import compare_results

    runs = [
        _default(tmp_path, "cc", "causal", "causal", 0.5),
        _default(tmp_path, "cm", "causal", "mas", 0.1),  # cross-evaluation (Table 3)
        _default(tmp_path, "mc", "mas", "causal", 0.2),
        _default(tmp_path, "mm", "mas", "mas", 0.6),
    ]
    assert compare_results.main([str(p) for p in runs]) == 0
    printed = capsys.readouterr().out
    assert "| tiny_causal step 36 (trained causal, eval causal) | 50.0 |" in printed
    assert "| mas > causal (win rate) | 100% (1/1) |" in printed
    assert "Win rate: 1 causal/mas pair(s) matched by recorded base model, benchmark and mode" in printed
    assert "Paired by recorded experiment name instead (results without a recorded base)" in printed
    assert "cross-evaluations, trained and evaluated differently): tiny_causal step 36 (trained causal, eval mas)" in printed


def test_compare_tabulates_two_checkpoints_of_one_run_with_labels(tmp_path, monkeypatch, capsys):
    import compare_results

    early = _default(tmp_path, "early", "mas", "mas", 0.25, step=12)
    late = _default(tmp_path, "late", "mas", "mas", 0.75, step=36)
    assert compare_results.main([str(early), str(late), "--labels", "step 12", "step 36"]) == 0
    printed = capsys.readouterr().out
    assert "| step 12 | 25.0 |" in printed and "| step 36 | 75.0 |" in printed
    assert "Not in the win rate (no partner run): step 12, step 36." in printed
    # With the causal run at both steps, each checkpoint pairs with its own step.
    causal = [_default(tmp_path, f"c{s}", "causal", "causal", 0.5, step=s) for s in (12, 36)]
    assert compare_results.main([str(early), str(late), *map(str, causal)]) == 0
    assert "| mas > causal (win rate) | 50% (1/2) |" in capsys.readouterr().out


def _with_base(path: Path, trained: str, weights: dict, acc: float, run: str) -> Path:
    """Results as mas_eval writes them now: the base recorded, run names that say nothing."""
    return _results(
        path, acc=acc, model=run, run_name=run, attention=trained, trained_attention=trained, experiment=run, run=run,
        step=36, adapter=f"/runs/{run}/checkpoints/step_0000036", base={"folder": "/somewhere", "weights": weights},
    )  # fmt: skip


def test_compare_pairs_on_the_recorded_base_never_on_folder_names(tmp_path, capsys):
    import compare_results

    base_a = {"model.safetensors": [1000, "aa"]}
    base_b = {"model.safetensors": [1000, "bb"]}
    runs = [
        _with_base(tmp_path / "1.json", "causal", base_a, 0.5, "baseline"),
        _with_base(tmp_path / "2.json", "mas", base_a, 0.7, "run-mas"),
        _with_base(tmp_path / "3.json", "mas", base_b, 0.9, "mas"),  # another base: no partner
    ]
    assert compare_results.main([str(p) for p in runs]) == 0
    printed = capsys.readouterr().out
    assert "| mas > causal (win rate) | 100% (1/1) |" in printed
    assert "Not in the win rate (no partner run): mas." in printed
    assert "Paired by recorded experiment name" not in printed
    twin = _with_base(tmp_path / "4.json", "mas", base_a, 0.6, "other-lr")
    assert compare_results.main([str(runs[0]), str(runs[1]), str(twin)]) == 2
    assert "both mas runs of adapters on base /somewhere" in capsys.readouterr().err


def test_compare_never_pairs_base_model_evaluations(tmp_path, capsys):
    import compare_results

    base = {"model.safetensors": [1000, "aa"]}
    runs = [
        _with_base(tmp_path / "1.json", "causal", base, 0.5, "baseline"),
        _with_base(tmp_path / "2.json", "mas", base, 0.7, "run-mas"),
    ]
    for name, attention in (("b_causal", "causal"), ("b_mas", "mas")):  # as mas_eval records a base model
        runs.append(_results(
            tmp_path / f"{name}.json", acc=0.9, model=name, run_name=f"base model (trained base, eval {attention})", attention=attention,
            trained_attention=None, experiment="base", run="base", step=None, adapter=None, base={"folder": "/somewhere", "weights": base},
        ))  # fmt: skip
    runs.append(_results(tmp_path / "old.json", acc=0.9, model="old", attention="mas", experiment="base", run="base"))  # before `adapter`
    assert compare_results.main([str(p) for p in runs]) == 0
    printed = capsys.readouterr().out
    assert "| mas > causal (win rate) | 100% (1/1) |" in printed  # the adapters' pair only
    assert "Win rate: 1 causal/mas pair(s)" in printed
    assert ("Not in the win rate (base model without an adapter: nothing fine-tuned to compare): "
            "base model (trained base, eval causal), base model (trained base, eval mas), old (mas).") in printed  # fmt: skip
    assert compare_results.main([str(p) for p in runs[2:]]) == 0  # the base model alone: no pair, no win-rate row
    assert "(win rate)" not in capsys.readouterr().out


def test_compare_given_a_folder_says_so_in_one_line(tmp_path, capsys):
    import compare_results

    (tmp_path / "eval").mkdir()
    _results(tmp_path / "eval" / "results_generate.json", acc=0.5)
    assert compare_results.main([str(tmp_path / "eval")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"compare_results: {tmp_path / 'eval'} is a folder; give the results_<mode>.json file of a mas_eval run (results_generate.json there)"
