"""The config layer: typed options, variables, inheritance, strict components, and mas-config."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import List, Literal, Optional

import pytest
from omegaconf import OmegaConf

import mas_config
from mas.config import (
    ConfigError,
    check_value,
    component,
    format_help,
    load_config,
    option,
    option_infos,
    resolved_yaml,
    to_options,
)
from mas.training.options import FinetuneOptions


@dataclasses.dataclass(kw_only=True)
class ToyOptions:
    name: str = option(help="required name")
    steps: int = option(3, "how many", min=1)
    lr: float = option(1e-3, "a rate", min=0.0)
    mode: Literal["a", "b"] = option("a", "one of two")
    tags: List[str] = option(["x"], "labels")
    limit: Optional[int] = option(None, "cap", min=1)
    model: object = component("a builder", required=False)


def _cfg(**values):
    return OmegaConf.create(values)


def test_defaults_fill_in_and_values_are_typed():
    opts = to_options(_cfg(name="n", lr="2e-4"), ToyOptions, "toy")
    assert (opts.name, opts.steps, opts.lr, opts.mode, opts.tags, opts.limit) == ("n", 3, 2e-4, "a", ["x"], None)
    assert isinstance(opts.lr, float)


@pytest.mark.parametrize(
    "values, message",
    [
        ({}, "missing name"),
        ({"name": "n", "stepz": 2}, "unknown config key 'stepz'.*did you mean 'steps'"),
        ({"name": "n", "steps": 0}, "steps: must be >= 1, got 0"),
        ({"name": "n", "steps": True}, "steps: expected int, got True"),
        ({"name": "n", "steps": 2.5}, "steps: expected int"),
        ({"name": "n", "mode": "c"}, "mode must be 'a' or 'b', got 'c'"),
        ({"name": "n", "tags": "x"}, "tags: expected list of str"),
        ({"name": "n", "limit": -1}, "limit: must be >= 1"),
        ({"name": "n", "model": {"x": 1}}, "model: expected a node with a _component_"),
        ({"name": "n", "model": {"_component_": "torch.nn.Linear", "in_featurs": 2}}, "model.in_featurs: .*did you mean 'in_features'"),
        ({"name": "n", "model": {"_component_": "torch.nn.Linear", "in_features": "two"}}, "model.in_features: expected int"),
        ({"name": "n", "model": {"_component_": "torch.nn.Nope"}}, "model._component_: cannot import 'torch.nn.Nope'"),
    ],
)
def test_bad_values_name_the_key(values, message):
    with pytest.raises(ConfigError, match=message):
        to_options(_cfg(**values), ToyOptions, "toy")


def test_variables_used_by_interpolation_are_allowed_and_unused_ones_are_not():
    opts = to_options(_cfg(base_dir="/data/run1", name="${base_dir}/model"), ToyOptions, "toy")
    assert opts.name == "/data/run1/model"
    with pytest.raises(ConfigError, match="unknown config key 'base_dir'"):
        to_options(_cfg(base_dir="/data/run1", name="n"), ToyOptions, "toy")
    with pytest.raises(ConfigError, match="did you mean 'steps'"):
        to_options(_cfg(base_dir="/d", name="${base_dir}", step=2), ToyOptions, "toy")


def test_check_value_accepts_ints_for_floats_and_pep604_unions():
    assert check_value("lr", 1, float) == 1.0
    assert check_value("x", None, int | None) is None
    with pytest.raises(ConfigError, match="x: expected int or null"):
        check_value("x", "y", int | None)


def test_every_finetune_key_has_a_type_a_default_or_required_and_a_reason():
    infos = option_infos(FinetuneOptions)
    assert len(infos) >= 35
    for info in infos:
        assert info.help, f"{info.name} has no reason"
    text = format_help("mas_lora_finetune", FinetuneOptions)
    for info in infos:
        assert f"  {info.name}  (" in text
    assert "batch_size  (int, 8)" in text and "tiny_mas" in text


def test_a_user_file_can_start_from_a_bundled_experiment(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("base_config: tiny_mas\nbase_dir: /tmp/x\noutput_dir: ${base_dir}/run\nepochs: 1\n")
    opts = to_options(load_config(str(mine)), FinetuneOptions, "mas_lora_finetune")
    assert (opts.output_dir, opts.epochs, opts.attention) == ("/tmp/x/run", 1, "mas")


def test_mas_config_cp_writes_a_standalone_file_that_runs_the_same(tmp_path, capsys):
    out = tmp_path / "copy.yaml"
    assert mas_config.main(["cp", "tiny_causal", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# recipe: mas_lora_finetune") and "mas_asset" not in text and "${output_dir}" in text
    copied = to_options(load_config(str(out)), FinetuneOptions, "mas_lora_finetune")
    named = to_options(load_config("tiny_causal"), FinetuneOptions, "mas_lora_finetune")
    assert copied == named
    assert mas_config.main(["validate", str(out)]) == 0
    with pytest.raises(SystemExit):
        mas_config.main(["cp", "tiny_causal", str(out)])  # refuses to overwrite
    assert "exists; pass --force" in capsys.readouterr().err


def test_mas_config_ls_lists_every_experiment_with_its_recipe(capsys):
    mas_config.main(["ls"])
    out = capsys.readouterr().out
    assert "llama3_2_1b_mas_1024" in out and "tiny_eval_mmlu" in out and "mas_lora_finetune_distributed" in out


def test_saved_config_is_fully_resolved(tmp_path):
    text = resolved_yaml(load_config("tiny_mas", [f"output_dir={tmp_path}"]), FinetuneOptions)
    assert "${" not in text
    assert OmegaConf.create(text).checkpointer.output_dir == str(tmp_path)


def test_unknown_experiment_words_are_refused_with_close_names():
    with pytest.raises(ConfigError, match="did you mean"):
        load_config("llama3_2_1b_mas_2048")
    with pytest.raises(ConfigError, match="not a file"):
        load_config(str(Path("/nope/cfg.yaml")))


def test_a_new_model_is_one_file(tmp_path, monkeypatch):
    """docs/architecture.md's example: a model file alone gives its MAS, causal and eval experiments."""
    import re
    import shutil

    import torch
    from torchtune import training

    import mas.config._bundled as bundled
    from mas.config import bundled_experiments, instantiate

    root = tmp_path / "configs"
    real = bundled.bundled_config_dirs()[0]
    shutil.copytree(real / "base", root / "base")
    shutil.copytree(real / "overlays", root / "overlays")
    doc = (Path(__file__).resolve().parents[3] / "docs" / "architecture.md").read_text()
    example = re.search(r"```yaml\n(# Phi-3-mini.*?)```", doc, flags=re.S).group(1)
    (root / "models").mkdir()
    (root / "models" / "phi3_mini.yaml").write_text(example)
    monkeypatch.setattr(bundled, "bundled_config_dirs", lambda: [root])

    assert {"phi3_mini_mas", "phi3_mini_causal", "phi3_mini_eval"} <= set(bundled_experiments())
    opts = to_options(load_config("phi3_mini_causal"), FinetuneOptions, "mas_lora_finetune")
    assert (opts.attention, opts.model.lora_rank, opts.tokenizer.max_seq_len) == ("causal", 32, 256)
    with training.set_default_dtype(torch.bfloat16), torch.device("meta"):
        model = instantiate(opts.model)
    assert model.tok_embeddings.num_embeddings == 32064 and len(model.layers) == 32
    qlora = to_options(load_config("phi3_mini_mas_qlora"), FinetuneOptions, "mas_lora_finetune")
    assert qlora.model._component_.endswith("qlora_phi3_mini")


def test_tilde_and_environment_variables_are_expanded_in_every_path_key(monkeypatch, tmp_path):
    monkeypatch.setenv("MAS_TEST_DATA", str(tmp_path))
    cfg = load_config("tiny_mas", ["output_dir=~/mas_runs/x", "checkpointer.checkpoint_dir=$MAS_TEST_DATA/base", "dataset.source=${oc.env:HOME}/rows.json"])
    opts = to_options(cfg, FinetuneOptions, "mas_lora_finetune")
    home = str(Path.home())
    assert opts.output_dir == f"{home}/mas_runs/x"
    assert opts.checkpointer.checkpoint_dir == f"{tmp_path}/base"
    assert cfg.checkpointer.output_dir == f"{home}/mas_runs/x", "interpolations see the expanded path"
    assert "~" not in resolved_yaml(cfg, FinetuneOptions)


def test_a_path_naming_an_unset_variable_is_refused(monkeypatch):
    monkeypatch.delenv("MAS_NOT_SET", raising=False)
    with pytest.raises(ConfigError, match=r"output_dir=\$MAS_NOT_SET/x: environment variable MAS_NOT_SET is not set"):
        to_options(load_config("tiny_mas", ["output_dir=$MAS_NOT_SET/x"]), FinetuneOptions, "mas_lora_finetune")


def test_a_slice_override_stays_text_even_where_yaml_would_read_base_60():
    for value in ("1:30", "0:5000", ":100", "20:"):
        assert load_config("tiny_mas", [f"dataset.rows={value}"]).dataset.rows == value


def test_mas_config_validate_takes_the_recipe_of_a_base_config_file(tmp_path, capsys):
    (tmp_path / "mine.yaml").write_text("base_config: tiny_mas\nepochs: 2\n")
    assert mas_config.main(["validate", str(tmp_path / "mine.yaml")]) == 0
    (tmp_path / "child.yaml").write_text("base_config: mine.yaml\nbatch_size: 2\n")
    assert mas_config.main(["validate", str(tmp_path / "child.yaml")]) == 0
    assert "valid mas_lora_finetune config" in capsys.readouterr().out
