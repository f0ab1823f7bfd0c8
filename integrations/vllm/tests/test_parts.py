"""The plugin's parts without an engine: settings, segment items, the tokenizer, the config hook."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from helpers import CHATS, write_adapter, write_model

from mas.masks import CAUSAL
from mas.segments import SegmentBuilder
from mas_vllm.segments import segment_items, segment_ranges
from mas_vllm.settings import MasSettingsError, settings_from_hf_config
from mas_vllm.tokenizer import MasTokenizer


def test_segment_ranges_are_the_runs_of_prompt_segments():
    C = CAUSAL
    assert segment_ranges([0, 0, 0, 1, 1, C, C, 2, C]) == [(0, 3), (3, 5), (7, 8)]
    assert segment_ranges([C, C]) == [] and segment_ranges([]) == []
    assert segment_items([5, 6, 7, 8], [0, 0, C, 1]) == [{"start": 0, "token_ids": [5, 6]}, {"start": 3, "token_ids": [8]}]


def test_settings_from_config_dict_adapter_folder_and_defaults(models_dir):
    model = write_model("llama", models_dir / "settings", adapter_attention="causal")
    from_adapter = settings_from_hf_config(SimpleNamespace(mas=str(model.adapter)))
    assert (from_adapter.attention, from_adapter.prompt_format) == ("causal", "chat")
    # A run folder means its latest checkpoint, as adapter_checkpoint does in the recipes.
    assert settings_from_hf_config(SimpleNamespace(mas=str(model.adapter.parent.parent))).attention == "causal"
    merged = settings_from_hf_config(SimpleNamespace(mas={"attention": "mas", "prompt_format": "text", "merge_system_and_user": True}))
    assert (merged.attention, merged.merge_system_and_user) == ("mas", True)
    default = settings_from_hf_config(SimpleNamespace())
    assert (default.attention, default.prompt_format, default.merge_system_and_user) == ("mas", "text", False)
    with pytest.raises(MasSettingsError, match="attention must be"):
        settings_from_hf_config(SimpleNamespace(mas={"attention": "bidirectional"}))
    with pytest.raises(MasSettingsError, match="adapter_config.json"):
        settings_from_hf_config(SimpleNamespace(mas=str(models_dir)))


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_tokenizer_decodes_as_torchtune_and_detokenizes_incrementally(family, models_dir):
    from vllm.tokenizers.detokenizer_utils import detokenize_incrementally

    model = write_model(family, models_dir / f"tok_{family}")
    tok = MasTokenizer.from_pretrained(model.path)
    text = "Grüße, 世界! Once upon a time…"
    ids = tok.torchtune.encode(text, add_bos=False, add_eos=False)
    assert tok.encode(text, add_special_tokens=False) == ids
    assert tok.decode(ids) == (text if family == "llama" else tok.torchtune.decode(ids))
    # vLLM's slow incremental detokenizer, one id at a time, ends with the whole text.
    tokens, prefix, read, out = None, 0, 0, ""
    for n in range(1, len(ids) + 1):
        new_tokens, piece, prefix, read = detokenize_incrementally(tok, ids[:n], tokens, prefix, read)
        tokens = new_tokens if tokens is None else tokens + new_tokens
        out += piece
    assert out == tok.decode(ids)


def test_renderer_rules_are_the_builders(models_dir):
    """The renderer builds with SegmentBuilder itself: same ids, same segments (chat format)."""
    from mas_vllm.renderer import MasRenderer

    model = write_model("qwen2", models_dir / "render")
    tok = MasTokenizer.from_pretrained(model.path)
    renderer = MasRenderer.__new__(MasRenderer)  # the builder part only; no engine config
    renderer.builder = SegmentBuilder(tok.torchtune, prompt_format="chat")
    for chat in CHATS:
        built = renderer.segmented([{"role": ("developer" if m["role"] == "system" else m["role"]), "content": [{"type": "text", "text": m["content"]}]} for m in chat])
        from mas.generation.api import prompt_messages

        assert built.tokens == SegmentBuilder(tok.torchtune, prompt_format="chat")(prompt_messages({"messages": chat}), for_generation=True).tokens
    with pytest.raises(ValueError, match="messages\\[0\\].role"):
        renderer.segmented([{"role": "tool", "content": "x"}])


def test_config_hook_turns_ranges_on_and_requires_the_mas_tokenizer_mode():
    from mas_vllm.config_hook import MasConfig

    hf = SimpleNamespace()
    model_config = SimpleNamespace(hf_config=hf, tokenizer_mode="auto", architecture="MasLlamaForCausalLM", get_model_arch_config=lambda: "rebuilt")
    with pytest.raises(ValueError, match="--tokenizer-mode mas"):
        MasConfig.verify_and_update_model_config(model_config)
    model_config.tokenizer_mode = "mas"
    MasConfig.verify_and_update_model_config(model_config)
    assert hf.is_mm_prefix_lm is True and model_config.model_arch_config == "rebuilt"
    scheduler = SimpleNamespace(
        disable_chunked_mm_input=False, enable_chunked_prefill=True, max_num_batched_tokens=64,
        max_num_encoder_input_tokens=64, encoder_cache_size=64,
    )
    MasConfig.verify_and_update_config(SimpleNamespace(scheduler_config=scheduler, model_config=SimpleNamespace(max_model_len=256)))
    assert scheduler.disable_chunked_mm_input is True and scheduler.enable_chunked_prefill is False
    assert scheduler.max_num_batched_tokens == scheduler.max_num_encoder_input_tokens == scheduler.encoder_cache_size == 256


def test_merged_checkpoint_settings_reach_the_plugin(tmp_path):
    """What the fine-tuning recipe writes into merged/config.json is what the plugin reads."""
    from mas.segments import SegmentSettings
    from mas.training.run_state import mas_settings, merged_hf_config

    config = merged_hf_config({"model_type": "llama"}, mas_settings("causal", SegmentSettings(prompt_format="chat", merge_system_and_user=True)))
    hf = SimpleNamespace(**json.loads(json.dumps(config)))
    read = settings_from_hf_config(hf)
    assert (read.attention, read.prompt_format, read.merge_system_and_user) == ("causal", "chat", True)
    # MAS-trained merged weights name one of the plugin's architectures, for every family it serves.
    from mas_vllm import _MODELS

    for stock in ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"):
        named = merged_hf_config({"architectures": [stock]}, mas_settings("mas", SegmentSettings(prompt_format="chat")))
        assert named["architectures"][0] in _MODELS, stock


def test_each_request_runs_under_its_adapters_recorded_mode(models_dir):
    """The policy (mas_vllm.policy): the base takes the server's mode, an adapter its recorded one;
    causal drops the segments, mas keeps them and refuses a prompt without any, and an adapter
    recorded with another prompt format is refused, naming it."""
    from vllm.exceptions import VLLMValidationError
    from vllm.lora.request import LoRARequest

    from mas_vllm.policy import SegmentLimits, apply_request_policy, request_settings

    model = write_model("llama", models_dir / "policy", adapter_attention="mas")
    causal_dir = write_adapter(model, models_dir / "policy" / "causal_run", "causal")
    text_dir = write_adapter(model, models_dir / "policy" / "text_run", "mas", prompt_format="text")
    server = settings_from_hf_config(SimpleNamespace(mas=str(model.adapter)))
    assert request_settings(server, None) is server
    assert request_settings(server, LoRARequest("causal", 1, str(causal_dir))).attention == "causal"
    assert request_settings(server, LoRARequest("mas", 2, str(model.adapter))).attention == "mas"
    with pytest.raises(VLLMValidationError, match="'text' was trained with prompt_format=text.*prompt_format=chat"):
        request_settings(server, LoRARequest("text", 3, str(text_dir)))
    with pytest.raises(VLLMValidationError, match="adapter_config.json"):
        request_settings(server, LoRARequest("nowhere", 4, str(models_dir / "policy" / "missing")))

    limits = SegmentLimits(max_tokens=256, sliding_window=8)
    ranges = [SimpleNamespace(offset=0, length=2), SimpleNamespace(offset=2, length=1)]
    segmented = {"type": "multimodal", "prompt_token_ids": [1, 2, 3], "mm_placeholders": {"mas_segment": ranges}, "mm_kwargs": {}, "mm_hashes": {}, "cache_salt": "s"}
    causal = request_settings(server, LoRARequest("causal", 1, str(causal_dir)))
    assert apply_request_policy(segmented, server, limits) is segmented
    assert apply_request_policy(segmented, causal, limits) == {"type": "token", "prompt_token_ids": [1, 2, 3], "cache_salt": "s"}
    plain = {"type": "token", "prompt_token_ids": [1, 2, 3]}
    assert apply_request_policy(plain, causal, limits) is plain
    with pytest.raises(VLLMValidationError, match="carries no segments"):
        apply_request_policy(plain, server, limits)
    # A segment over the sliding window is refused under mas only: causally it needs no range.
    long = {**segmented, "prompt_token_ids": list(range(12)), "mm_placeholders": {"mas_segment": [SimpleNamespace(offset=0, length=12)]}}
    with pytest.raises(VLLMValidationError, match="prompt segment 0 has 12 tokens, more than the model's sliding window \\(8\\)"):
        apply_request_policy(long, server, limits)
    assert apply_request_policy(long, causal, limits)["type"] == "token"
