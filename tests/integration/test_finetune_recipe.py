"""`tune run mas_lora_finetune`: end to end, resume equivalence, atomic saves, config errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mas.checkpointing import (
    ADAPTER_CONFIG_FILE,
    HFModelInfo,
    latest_checkpoint,
    load_peft_adapter,
    peft_to_adapter,
    step_checkpoints,
)
from mas.config import ConfigError, load_config
from mas.training import read_metrics
from support.runs import failed_command_line, finetune_overrides, run_finetune, tune_command

_overrides = finetune_overrides
_run_in_process = run_finetune

@pytest.mark.slow
def test_tune_run_end_to_end_from_another_directory(tmp_path, tiny_base_dir):
    work = tmp_path / "elsewhere"
    work.mkdir()
    out = tmp_path / "run"
    cmd = [*tune_command(), "run", "mas_lora_finetune", "--config", "tiny_mas.yaml"]
    cmd += _overrides(out, tiny_base_dir, max_steps_per_epoch=12, save_every_n_steps=6, val_every_n_steps=6)
    result = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "adapter written to" in result.stdout

    train = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in train] == list(range(1, 13))
    first, last = sum(r["loss"] for r in train[:3]) / 3, sum(r["loss"] for r in train[-3:]) / 3
    assert last < first - 0.2, f"loss did not decrease: {first:.3f} -> {last:.3f}"
    for key in ("lr", "grad_norm", "tokens_per_second", "peak_rss_gib"):
        assert all(key in r for r in train)
    assert len(read_metrics(out / "metrics.jsonl", kind="val")) == 2
    assert list((out / "logs").glob("log_*.txt"))  # torchtune DiskLogger
    for name in ("config.yaml", "torchtune_config.yaml"):  # both resolved: no ${...}, no resolvers
        assert "${" not in (out / name).read_text(), name

    folder = latest_checkpoint(out)
    assert folder.name == "step_0000012"
    config = json.loads((folder / ADAPTER_CONFIG_FILE).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 16
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert config["mas"]["attention"] == "mas"
    assert config["mas"]["segment_rules"]["assistant"] == "causal"
    assert config["mas"]["prompt_format"] == "text" and config["mas"]["merge_system_and_user"] is False
    weights, _ = load_peft_adapter(folder)
    assert all(k.startswith("base_model.model.model.layers.") for k in weights)
    assert (folder / "merged" / "model.safetensors").exists()  # epoch end + save_merged_weights

def _reload_adapter(folder: Path, base_dir: Path) -> dict:
    weights, _ = load_peft_adapter(folder)
    return peft_to_adapter(weights, HFModelInfo.from_checkpoint_dir(base_dir, "LLAMA3_2"))

def test_saved_adapter_equals_trained_adapter(tmp_path, tiny_base_dir):
    from torchtune.modules.peft import get_adapter_state_dict

    recipe = _run_in_process("tiny_mas", _overrides(tmp_path / "run", tiny_base_dir, max_steps_per_epoch=3))
    trained = get_adapter_state_dict(recipe.model.state_dict())
    reloaded = _reload_adapter(latest_checkpoint(tmp_path / "run"), tiny_base_dir)
    assert trained.keys() == reloaded.keys()
    for key in trained:
        assert torch.equal(trained[key], reloaded[key]), key

@pytest.mark.parametrize("resume_at, extra", [(3, {}), (6, {"gradient_accumulation_steps": 2, "epochs": 2})])
def test_resume_gives_the_same_loss_curve(tmp_path, tiny_base_dir, resume_at, extra):
    """N steps + resume + M steps == N + M steps straight (mid-epoch and at an epoch end)."""
    straight = tmp_path / "straight"
    _run_in_process("tiny_mas", _overrides(straight, tiny_base_dir, **extra))
    reference = {r["step"]: r["loss"] for r in read_metrics(straight / "metrics.jsonl")}

    # Simulate a run that died right after checkpoint `resume_at`.
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    checkpoints = resumed / "checkpoints"
    for folder in checkpoints.glob("step_*"):
        if int(folder.name.split("_")[1]) > resume_at:
            shutil.rmtree(folder)
    (checkpoints / "latest").write_text(f"step_{resume_at:07d}")
    lines = [l for l in (resumed / "metrics.jsonl").read_text().splitlines() if json.loads(l)["step"] <= resume_at]
    (resumed / "metrics.jsonl").write_text("\n".join(lines) + "\n")

    _run_in_process("tiny_mas", _overrides(resumed, tiny_base_dir, resume_from_checkpoint=True, **extra))
    after = {r["step"]: r["loss"] for r in read_metrics(resumed / "metrics.jsonl")}
    assert sorted(after) == sorted(reference)
    for step in reference:
        assert after[step] == pytest.approx(reference[step], abs=1e-6), step

def test_killed_save_leaves_previous_checkpoint_loadable(tmp_path, tiny_base_dir, monkeypatch):
    out = tmp_path / "run"
    recipe = _run_in_process("tiny_mas", _overrides(out, tiny_base_dir, max_steps_per_epoch=3))
    good = latest_checkpoint(out)

    def dies(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr("mas.checkpointing.torch.save", dies)
    recipe.position.global_step += 1
    with pytest.raises(KeyboardInterrupt):
        recipe.save_checkpoint(epoch_end=False)
    assert (out / "checkpoints" / "step_0000004.tmp").exists()  # the half-written folder
    assert latest_checkpoint(out) == good
    assert _reload_adapter(good, tiny_base_dir)  # still loads
    monkeypatch.undo()
    recipe.position.global_step += 1
    recipe.save_checkpoint(epoch_end=False)
    assert not list((out / "checkpoints").glob("*.tmp"))  # the next save cleans up
    assert latest_checkpoint(out).name == "step_0000005"

def test_save_at_steps_keeps_chosen_checkpoints_when_pruning(tmp_path, tiny_base_dir):
    out = tmp_path / "run"
    extra = {"max_steps_per_epoch": 6, "epochs": 2, "save_every_n_steps": 1, "keep_last_n_checkpoints": 1, "save_at_steps": "[2,5]"}
    _run_in_process("tiny_mas", _overrides(out, tiny_base_dir, **extra))
    assert list(step_checkpoints(out)) == [2, 5, 12]  # the chosen steps and the newest one
    with pytest.raises(ConfigError, match=r"save_at_steps: step 13 is past the run's last step 12"):
        _run_in_process("tiny_mas", _overrides(tmp_path / "b", tiny_base_dir, **{**extra, "save_at_steps": "[4,13]"}))
    with pytest.raises(ConfigError, match=r"save_at_steps: a list of steps >= 1"):
        _run_in_process("tiny_mas", _overrides(tmp_path / "c", tiny_base_dir, save_at_steps="[0]"))


def test_causal_run_records_its_mode_and_refuses_a_mas_resume(tmp_path, tiny_base_dir):
    out = tmp_path / "run"
    _run_in_process("tiny_causal", _overrides(out, tiny_base_dir, max_steps_per_epoch=3))
    config = json.loads((latest_checkpoint(out) / ADAPTER_CONFIG_FILE).read_text())
    assert config["mas"]["attention"] == "causal"
    with pytest.raises(ConfigError, match="trained with attention=causal"):
        _run_in_process("tiny_mas", _overrides(out, tiny_base_dir, resume_from_checkpoint=True))

@pytest.mark.parametrize(
    "overrides, message",
    [
        (["batch_sise=4"], "unknown config key 'batch_sise'.*did you mean 'batch_size'"),
        (["model.lora_rnk=4"], "has no argument 'lora_rnk'.*did you mean 'lora_rank'"),
        (["dataset.source=/nope/missing.json"], "data file not found: /nope/missing.json"),
        (["attention=bidirectional"], "attention must be 'mas' or 'causal'"),
        (["attention_backend=flex"], "attention_backend=flex cannot train on cpu"),
        (["device=cuda"] if not torch.cuda.is_available() else ["device=cuda:99"], "CUDA|CUDA device"),
        (["batch_size=1000"], "batch_size=1000 .*exceeds the 550 training examples"),
        (["~attention"], "missing attention"),
    ],
)
def test_bad_configs_fail_fast_with_a_clear_message(tmp_path, tiny_base_dir, overrides, message, capsys, monkeypatch):
    import re

    import mas_lora_finetune

    monkeypatch.chdir(tmp_path)
    argv = ["--config", "tiny_mas", *_overrides(tmp_path / "run", tiny_base_dir), *overrides]
    err = failed_command_line(mas_lora_finetune.recipe_main, argv, capsys)
    assert re.search(message, err), err[-2000:]

def test_missing_checkpoint_and_vocab_mismatch(tmp_path, tiny_base_dir):
    from mas.models import write_tiny_hf_checkpoint

    missing = _overrides(tmp_path / "a", tiny_base_dir) + ["checkpointer._component_=torchtune.training.FullModelHFCheckpointer",
        "~checkpointer.pretrain_steps", "checkpointer.checkpoint_files=[model.safetensors]", "checkpointer.model_type=LLAMA3_2",
        f"checkpointer.checkpoint_dir={tmp_path / 'nowhere'}"]
    with pytest.raises((ConfigError, FileNotFoundError), match="nowhere"):
        _run_in_process("tiny_mas", missing)
    small = write_tiny_hf_checkpoint(tmp_path / "small_vocab", pretrain_steps=0, vocab_size=512)
    mismatch = _overrides(tmp_path / "b", small) + ["model.vocab_size=512", "checkpointer.vocab_size=512", "checkpointer.pretrain_steps=0"]
    with pytest.raises(ConfigError, match="vocab size mismatch"):
        _run_in_process("tiny_mas", mismatch)

def test_unknown_config_name_suggests_bundled_ones():
    with pytest.raises(ConfigError, match="did you mean tiny_mas"):
        load_config("tiny_mass")

def test_plot_metrics_tool_draws_both_runs(tmp_path, tiny_mas_run):
    import matplotlib.image

    out = tmp_path / "curves.png"
    tool = Path(__file__).resolve().parents[2] / "tools" / "plot_metrics.py"
    result = subprocess.run(
        [sys.executable, str(tool), str(tiny_mas_run), str(tiny_mas_run / "metrics.jsonl"), "--labels", "a", "b", "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    image = matplotlib.image.imread(out)
    assert image.shape[:2] == (380, 1000)
    assert image[..., :3].std() > 0.01  # not a blank canvas
