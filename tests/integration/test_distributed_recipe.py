"""`tune run --nproc_per_node 2 mas_lora_finetune_distributed` on CPU (gloo), against one device."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest

from mas.checkpointing import ADAPTER_CONFIG_FILE, latest_checkpoint
from mas.training import read_metrics
from support.runs import finetune_overrides, run_finetune, tune_command

# Both runs see the same 8 examples per step; float sums differ in order only.
LOSS_TOLERANCE = 1e-4


# A rank that dies in C++ (std::terminate outside any exception: no Python traceback, exit -6)
# before the run wrote anything. Seen once in ~20 CI-sized runs on a loaded 2-core machine,
# about 4 s into setup (gloo connection set-up); never reproduced on its own. Not a result of
# this project's code that a rerun could hide: such a run wrote no metric, so it is rerun once,
# with a warning in the test report.
_NATIVE_ABORT = "terminate called without an active exception"


def _distributed(tmp_path: Path, out: Path, base_dir: Path, *extra: str, nproc: int = 2) -> subprocess.CompletedProcess:
    overrides = finetune_overrides(out, base_dir, **{"model.lora_dropout": 0.0, "global_batch_size": 8})
    cmd = [*tune_command(), "run", "--nproc_per_node", str(nproc), "mas_lora_finetune_distributed", "--config", "tiny_mas_distributed"]
    result = subprocess.run(cmd + overrides + list(extra), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    if result.returncode != 0 and _NATIVE_ABORT in result.stderr and not (out / "metrics.jsonl").exists():
        warnings.warn(f"a rank aborted in native code before training; rerunning once: {result.stderr[-1500:]}")
        shutil.rmtree(out, ignore_errors=True)  # a fresh run's folder: no metric, nothing to keep
        result = subprocess.run(cmd + overrides + list(extra), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    return result


@pytest.mark.slow
def test_two_ranks_match_one_device_at_the_same_global_batch(tmp_path, tiny_base_dir):
    dist_out = tmp_path / "dist"
    result = _distributed(tmp_path, dist_out, tiny_base_dir)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "adapter written to" in result.stdout
    config = json.loads((latest_checkpoint(dist_out) / ADAPTER_CONFIG_FILE).read_text())
    assert config["mas"]["attention"] == "mas"

    single_out = tmp_path / "single"
    run_finetune("tiny_mas", finetune_overrides(single_out, tiny_base_dir, **{"model.lora_dropout": 0.0, "batch_size": 8}))
    dist_curve = read_metrics(dist_out / "metrics.jsonl")
    single_curve = read_metrics(single_out / "metrics.jsonl")
    assert [r["step"] for r in dist_curve] == [r["step"] for r in single_curve] == list(range(1, 7))
    for d, s in zip(dist_curve, single_curve):
        assert d["loss"] == pytest.approx(s["loss"], rel=LOSS_TOLERANCE), d["step"]
        assert d["world_size"] == 2
        assert d["tokens_per_second"] > d["tokens_per_second_per_rank"] > 0


@pytest.mark.slow
def test_distributed_resume_gives_the_same_loss_curve(tmp_path, tiny_base_dir):
    straight = tmp_path / "straight"
    assert _distributed(tmp_path, straight, tiny_base_dir).returncode == 0
    reference = {r["step"]: r["loss"] for r in read_metrics(straight / "metrics.jsonl")}
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_0000006")
    (resumed / "checkpoints" / "latest").write_text("step_0000003")
    result = _distributed(tmp_path, resumed, tiny_base_dir, "resume_from_checkpoint=True")
    assert result.returncode == 0, result.stderr[-4000:]
    after = {r["step"]: r["loss"] for r in read_metrics(resumed / "metrics.jsonl")}
    for step in (4, 5, 6):
        assert after[step] == pytest.approx(reference[step], abs=1e-6)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["global_batch_size=7"], r"global_batch_size=7 is not divisible by 2 ranks x gradient_accumulation_steps=1"),
        (["distributed_backend=nccl"], r"distributed_backend=nccl needs CUDA devices"),
        (["device=cuda"], r"CUDA is not available|only \d+ CUDA device"),
    ],
)
def test_distributed_config_errors(tmp_path, tiny_base_dir, extra, message):
    result = _distributed(tmp_path, tmp_path / "x", tiny_base_dir, *extra)
    assert result.returncode != 0
    assert re.search(message, result.stderr + result.stdout), (result.stderr + result.stdout)[-3000:]


def test_distributed_recipe_refuses_to_run_without_torchrun(tmp_path, tiny_base_dir):
    import sys

    cmd = [sys.executable, "-m", "mas_lora_finetune_distributed", "--config", "tiny_mas_distributed"]
    cmd += finetune_overrides(tmp_path / "x", tiny_base_dir)
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode != 0
    assert "must be launched by torchrun" in result.stderr
