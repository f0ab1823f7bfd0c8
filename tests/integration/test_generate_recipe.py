"""`tune run mas_generate`: offline on the tiny model, with an adapter, and its clear errors."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from mas.config import ConfigError, load_config
from support.runs import failed_command_line, tune_command


def _overrides(tmp_path: Path, base_dir: Path, **extra) -> list[str]:
    values = {
        "output_dir": str(tmp_path / "gen"),
        "checkpointer.checkpoint_dir": str(base_dir),
        "checkpointer.pretrain_steps": 30,
        "max_new_tokens": 8,
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def _tune_run(tmp_path: Path, overrides: list[str]) -> subprocess.CompletedProcess:
    cmd = [*tune_command(), "run", "mas_generate", "--config", "tiny_generate", *overrides]
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_tune_run_generate_with_adapter_and_prompts_file(tmp_path, tiny_base_dir, tiny_mas_run):
    prompts = tmp_path / "prompts.jsonl"
    rows = [
        {"system": "Be brief.", "user": "Is the sky blue?"},
        {"prompt": "Name a colour."},
        {"instruction": "Please answer the following question with true or false, question: is ice cold?", "input": ""},
    ]
    prompts.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out_file = tmp_path / "out.jsonl"
    result = _tune_run(
        tmp_path,
        _overrides(tmp_path, tiny_base_dir, adapter_checkpoint=tiny_mas_run, prompts_file=prompts, output_file=out_file),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("--- completion") == 3
    assert re.search(r"time to first token: [\d.]+ ms .* decode: [\d.]+ tokens/s", result.stdout)
    written = [json.loads(l) for l in out_file.read_text().splitlines()]
    assert [w["index"] for w in written] == [0, 1, 2]
    assert all(len(w["completion_ids"]) <= 8 for w in written)
    # The commonsense row got the fine-tuning template.
    assert written[2]["prompt"].startswith("Below is an instruction")


@pytest.mark.slow
def test_mode_mismatch_is_reported(tmp_path, tiny_base_dir, tiny_mas_run):
    result = _tune_run(tmp_path, _overrides(tmp_path, tiny_base_dir, adapter_checkpoint=tiny_mas_run, attention="causal"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "attention=causal is used as configured, but the adapter was trained with attention=mas" in result.stderr


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"adapter_checkpoint": "/nope/run"}, r"adapter file not found: /nope/run/adapter_model\.safetensors"),
        ({"prompt.user": "' '"}, "prompt: field 'user' is empty"),
        ({"max_new_tokens": 600}, r"> the 512-slot KV cache"),
        ({"attention": "both"}, "attention must be 'mas' or 'causal'"),
    ],
)
def test_generate_errors_are_clear(tmp_path, tiny_base_dir, extra, message, capsys, monkeypatch):
    import mas_generate

    monkeypatch.chdir(tmp_path)
    err = failed_command_line(mas_generate.recipe_main, ["--config", "tiny_generate", *_overrides(tmp_path, tiny_base_dir, **extra)], capsys)
    assert re.search(message, err), err[-2000:]


def test_adapter_for_a_different_shape_is_refused(tmp_path, tiny_base_dir, tiny_mas_run):
    import mas_generate

    cfg = load_config("tiny_generate", _overrides(tmp_path, tiny_base_dir, adapter_checkpoint=tiny_mas_run, **{"model.lora_rank": 4}))
    with pytest.raises(ConfigError, match=r"does not match the model config: r=8 \(config lora_rank=4\)"):
        mas_generate.run(cfg)
    cfg = load_config(
        "tiny_generate",
        _overrides(tmp_path, tiny_base_dir, adapter_checkpoint=tiny_mas_run, **{"model.embed_dim": 128, "checkpointer.embed_dim": 128}),
    )
    with pytest.raises(ConfigError):
        mas_generate.run(cfg)


def test_generate_recipe_loads_the_trained_adapter(tmp_path, tiny_base_dir, tiny_mas_run):
    """The recipe's model equals the fine-tuned model: same greedy completions as in-process."""
    import torch

    import mas
    import mas_generate
    from mas.checkpointing import HFModelInfo, latest_checkpoint, load_peft_adapter, peft_to_adapter
    from mas.models import lora_tiny_llama3_2, tiny_llama3_tokenizer
    from mas.model_weights import load_adapter_state

    cfg = load_config("tiny_generate", _overrides(tmp_path, tiny_base_dir, adapter_checkpoint=tiny_mas_run))
    texts = mas_generate.run(cfg)["texts"]

    from torchtune.training import FullModelHFCheckpointer

    base = FullModelHFCheckpointer(str(tiny_base_dir), ["model.safetensors"], "LLAMA3_2", str(tmp_path / "x")).load_checkpoint()["model"]
    model = lora_tiny_llama3_2(["q_proj", "v_proj"], lora_rank=8, lora_alpha=16)
    model.load_state_dict(base, strict=False)
    weights, _ = load_peft_adapter(latest_checkpoint(tiny_mas_run))
    load_adapter_state(model, peft_to_adapter(weights, HFModelInfo.from_checkpoint_dir(tiny_base_dir, "LLAMA3_2")))
    prompt = dict(cfg.prompt)
    again = mas.generate(model.eval(), tiny_llama3_tokenizer(), [prompt], max_new_tokens=8)
    assert again.texts == texts
    assert torch.is_tensor(model.layers[0].attn.q_proj.lora_a.weight)


def test_merged_weights_generate_like_base_plus_adapter(tmp_path, tiny_base_dir):
    """A run's merged HF weights, loaded by torchtune's checkpointer into the plain model, give the
    completions of base + adapter; the tiny checkpointer refuses to overwrite them."""
    import mas_generate
    from mas.checkpointing import latest_checkpoint
    from support.runs import finetune_overrides, run_finetune

    run = tmp_path / "run"
    run_finetune("tiny_mas", finetune_overrides(run, tiny_base_dir, max_steps_per_epoch=4, save_merged_weights=True))
    merged = latest_checkpoint(run) / "merged"
    with_adapter = mas_generate.run(load_config("tiny_generate", _overrides(tmp_path, tiny_base_dir, adapter_checkpoint=run)))
    merged_cfg = load_config(
        "tiny_generate",
        _overrides(tmp_path, tiny_base_dir)
        + [
            "model=mas.models.tiny_llama3_2",
            "~model.lora_attn_modules", "~model.apply_lora_to_mlp", "~model.apply_lora_to_output",
            "~model.lora_rank", "~model.lora_alpha", "~model.lora_dropout",
            "checkpointer=torchtune.training.FullModelHFCheckpointer", "~checkpointer.pretrain_steps",
            f"checkpointer.checkpoint_dir={merged}", "checkpointer.checkpoint_files=[model.safetensors]",
            "checkpointer.model_type=LLAMA3_2",
        ],
    )  # fmt: skip
    assert mas_generate.run(merged_cfg)["tokens"] == with_adapter["tokens"]
    with pytest.raises(ConfigError, match="not the embedded tiny model"):
        mas_generate.run(load_config("tiny_generate", _overrides(tmp_path, tiny_base_dir, **{"checkpointer.checkpoint_dir": merged})))


def test_a_relative_output_file_is_written_under_output_dir(tmp_path, tiny_base_dir, monkeypatch):
    import mas_generate

    monkeypatch.chdir(tmp_path)
    mas_generate.run(load_config("tiny_generate", _overrides(tmp_path, tiny_base_dir, output_file="out.jsonl", max_new_tokens=2)))
    assert (tmp_path / "gen" / "out.jsonl").is_file() and not (tmp_path / "out.jsonl").exists()
