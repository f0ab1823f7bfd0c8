"""A run's merged weights carry the MAS settings they were trained with in ``config.json``.

A merged folder has no ``adapter_config.json``, so a server that loads it (the vLLM plugin in
``integrations/vllm``) reads the attention mode, prompt format and merge setting from there.
"""

from __future__ import annotations

import importlib
import json

import torch
from torchtune.modules.peft import get_adapter_params

from mas.checkpointing import CheckpointWriter, HFModelInfo
from mas.segments import SegmentSettings
from mas.testing import TINY_FAMILIES
from mas.training.run_state import DataPosition, mas_settings, merged_hf_config, save_run_checkpoint


def test_merged_hf_config_adds_the_settings_and_leaves_the_base_alone():
    base = {"model_type": "llama", "hidden_size": 64}
    mas = mas_settings("causal", SegmentSettings(prompt_format="chat", merge_system_and_user=True))
    out = merged_hf_config(base, mas)
    assert out["mas"]["attention"] == "causal"
    assert out["mas"]["prompt_format"] == "chat" and out["mas"]["merge_system_and_user"] is True
    assert {k: v for k, v in out.items() if k != "mas"} == base and "mas" not in base
    # MAS-trained weights name the vLLM plugin's architecture; causal ones keep the base's.
    named = {**base, "architectures": ["LlamaForCausalLM"]}
    assert merged_hf_config(named, mas)["architectures"] == ["LlamaForCausalLM"]
    trained_mas = merged_hf_config(named, mas_settings("mas", SegmentSettings(prompt_format="chat")))
    assert trained_mas["architectures"] == ["MasLlamaForCausalLM"] and named["architectures"] == ["LlamaForCausalLM"]
    assert merged_hf_config(trained_mas, trained_mas["mas"])["architectures"] == ["MasLlamaForCausalLM"]


def test_merged_checkpoint_config_json_records_the_training_settings(tmp_path):
    spec = TINY_FAMILIES["llama3_2"]
    module, _, name = spec.lora_builder.rpartition(".")
    lora = {
        "lora_rank": 4, "lora_alpha": 8.0, "lora_dropout": 0.0, "lora_attn_modules": ["q_proj", "v_proj"],
        "apply_lora_to_mlp": False, "apply_lora_to_output": False, "use_dora": False,
    }
    torch.manual_seed(0)
    model = getattr(importlib.import_module(module), name)(
        **{k: v for k, v in lora.items() if k != "use_dora"}, **spec.dims
    )
    dims = spec.dims
    head_dim = dims["embed_dim"] // dims["num_heads"]
    info = HFModelInfo(
        "LLAMA3_2", dims["num_heads"], dims["num_kv_heads"], dims["embed_dim"], head_dim, True,
        {"model_type": "llama", "hidden_size": dims["embed_dim"]},
    )
    mas = mas_settings("mas", SegmentSettings(prompt_format="chat"))
    folder = save_run_checkpoint(
        CheckpointWriter(tmp_path), position=DataPosition(global_step=1), adapter_state=get_adapter_params(model),
        info=info, lora=lora, mas=mas, optimizer_state={}, scheduler_state={}, epoch_end=True,
        model_state=model.state_dict(),
    )
    written = json.loads((folder / "merged" / "config.json").read_text())
    assert written["mas"] == json.loads(json.dumps(mas))
    assert written["model_type"] == "llama" and written["hidden_size"] == dims["embed_dim"]
    # The adapter records the same settings.
    assert json.loads((folder / "adapter_config.json").read_text())["mas"] == written["mas"]
