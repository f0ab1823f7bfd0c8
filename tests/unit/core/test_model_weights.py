"""mas.model_weights.check_trained_base: "the same base" is the same weights content.

Fake weight files stand in for a base (the check reads sizes and head hashes only); the recorded
side is written the way fine-tuning writes ``run.json`` (``base_weights`` from
:func:`mas.fingerprint.weights_identity`, the checkpointer node under ``settings``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from mas.config import ConfigError
from mas.fingerprint import weights_identity
from mas.model_weights import BaseWeights, check_trained_base


def _base(folder: Path, shards: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    for name, data in shards.items():
        (folder / name).write_bytes(data)
    return folder


def _adapter_of_run(run: Path, base_dir: Path, checkpointer: dict) -> Path:
    adapter = run / "checkpoints" / "step_0000004"
    adapter.mkdir(parents=True)
    record = {"base_weights": weights_identity(base_dir), "settings": {"checkpointer": checkpointer}}
    (run / "run.json").write_text(json.dumps(record))
    return adapter


def _given(folder: Path, files=(), **arguments) -> BaseWeights:
    return BaseWeights(info=None, checkpoint_dir=folder, files=tuple(files), arguments=arguments)  # the check never converts


SHARDS = {"model-00001-of-00002.safetensors": b"a" * 3000, "model-00002-of-00002.safetensors": b"b" * 2000}


def test_a_copy_of_the_base_under_other_names_is_the_same_base(tmp_path):
    trained = _base(tmp_path / "trained", SHARDS)
    adapter = _adapter_of_run(tmp_path / "run", trained, {"checkpoint_dir": str(trained)})
    check_trained_base(adapter, _given(trained))
    renamed = _base(tmp_path / "elsewhere", {"shard_b.safetensors": SHARDS["model-00002-of-00002.safetensors"], "shard_a.safetensors": SHARDS["model-00001-of-00002.safetensors"]})
    check_trained_base(adapter, _given(renamed))
    # Only the files the checkpointer loads are compared (an extra weights file beside them is not).
    (renamed / "unrelated.bin").write_bytes(b"z")
    check_trained_base(adapter, _given(renamed, files=["shard_a.safetensors", "shard_b.safetensors"]))


def test_other_weights_of_the_same_size_are_another_base(tmp_path):
    trained = _base(tmp_path / "trained", SHARDS)
    adapter = _adapter_of_run(tmp_path / "run", trained, {"checkpoint_dir": str(trained)})
    other = _base(tmp_path / "other", {**SHARDS, "model-00002-of-00002.safetensors": b"c" * 2000})
    with pytest.raises(ConfigError) as refused:
        check_trained_base(adapter, _given(other))
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"adapter {adapter} was trained on the base in {trained} (its weights: model-00001-of-00002.safetensors 3000 bytes, head ")
    assert f"), not on the weights in checkpointer.checkpoint_dir={other}; point checkpointer.checkpoint_dir" in message
    assert message.endswith(f"at the base recorded in {tmp_path / 'run' / 'run.json'}, or set allow_other_base=True to run it on this base anyway")


def test_the_message_names_the_checkpointer_arguments_that_differ(tmp_path):
    trained = _base(tmp_path / "trained", {"model.safetensors": b"30 steps"})
    adapter = _adapter_of_run(tmp_path / "run", trained, {"_component_": "tiny", "checkpoint_dir": str(trained), "pretrain_steps": 30})
    other = _base(tmp_path / "other", {"model.safetensors": b"5 steps!"})
    with pytest.raises(ConfigError, match=rf"trained on the base in {trained} with checkpointer\.pretrain_steps=30 \(this config: 5\), not on the weights"):
        check_trained_base(adapter, _given(other, _component_="tiny", pretrain_steps=5))


def test_an_adapter_outside_a_run_is_checked_by_nobody_and_says_so(tmp_path, caplog):
    base = _base(tmp_path / "base", SHARDS)
    adapter = tmp_path / "peft_adapter"
    adapter.mkdir()
    with caplog.at_level(logging.WARNING, logger="mas.model_weights"):
        check_trained_base(adapter, _given(base))
    assert [r.getMessage() for r in caplog.records] == [
        f"adapter {adapter} records no base model (no run.json with base weights beside its checkpoints): "
        f"cannot check that it was trained on the base in {base}"
    ]


def test_a_stale_latest_falls_back_to_the_newest_complete_checkpoint(tmp_path, caplog):
    from mas.checkpointing import RECIPE_STATE_FILE, latest_checkpoint

    checkpoints = tmp_path / "run" / "checkpoints"
    for name in ("step_0000003", "step_0000006", "step_0000009.tmp"):
        (checkpoints / name).mkdir(parents=True)
        (checkpoints / name / RECIPE_STATE_FILE).write_bytes(b"state")
    (checkpoints / "step_0000008").mkdir()  # torn: no recipe state
    (checkpoints / "latest").write_text("step_0000012")  # deleted by hand
    with caplog.at_level("WARNING"):
        assert latest_checkpoint(tmp_path / "run") == checkpoints / "step_0000006"
    assert "names step_0000012, which is not a complete checkpoint; using the newest complete checkpoint" in caplog.text
    (checkpoints / "latest").write_text("step_0000003")
    assert latest_checkpoint(tmp_path / "run") == checkpoints / "step_0000003", "a good pointer wins"
    (checkpoints / "latest").unlink()
    assert latest_checkpoint(tmp_path / "run") == checkpoints / "step_0000006"
    assert latest_checkpoint(tmp_path / "none") is None
