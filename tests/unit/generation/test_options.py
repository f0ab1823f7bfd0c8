"""Options mean one thing in every inference recipe: one mapping to the engine's settings, one
policy for an adapter's recorded prompt settings against the config's."""

from __future__ import annotations

import dataclasses
import importlib

import pytest

from mas.config import load_config, to_options
from mas.evaluation.options import EvalOptions
from mas.generation.options import GenerateOptions, InferenceOptions, generation_settings, prompt_settings, with_prompt_settings
from mas.serving.options import ServeOptions

COMPONENTS = dict(model={}, checkpointer={}, tokenizer={})
RECORDED = {"attention": "causal", "prompt_format": "chat", "merge_system_and_user": False}


@pytest.mark.parametrize("options_type", [GenerateOptions, EvalOptions, ServeOptions])
def test_unset_prompt_keys_follow_the_adapter_and_set_ones_win_with_a_warning(options_type):
    extra = {"output_dir": "/tmp/x"} if options_type is EvalOptions else {}
    unset = options_type(**COMPONENTS, **extra)
    chosen = prompt_settings(RECORDED, unset)
    assert (chosen.attention, chosen.prompt_format, chosen.merge_system_and_user) == ("causal", "chat", False)
    assert chosen.mismatches == []
    assert (prompt_settings(None, unset).attention, prompt_settings(None, unset).prompt_format) == ("mas", "text")
    crossed = prompt_settings(RECORDED, options_type(**COMPONENTS, **extra, attention="mas", prompt_format="chat"))
    assert crossed.attention == "mas" and len(crossed.mismatches) == 1
    assert "attention=mas is used as configured, but the adapter was trained with attention=causal" in crossed.mismatches[0]


def test_merged_segments_get_the_same_note_everywhere():
    for options in (GenerateOptions(**COMPONENTS, merge_system_and_user=True), ServeOptions(**COMPONENTS, merge_system_and_user=True)):
        notes = prompt_settings(None, options).notes
        assert any("no prefix before the end of a user turn is reusable" in n for n in notes)


def test_every_shared_key_reaches_the_engine_settings_through_one_function():
    shared = {f.name for f in dataclasses.fields(InferenceOptions)}
    values = dict(
        attention="causal", attention_backend="sdpa", reuse_system_cache=False, prefix_cache_max_tokens=77, prefix_cache_max_mib=3.0,
        prefill_chunk_tokens=99, compile_decode=True, compile_mode="reduce-overhead", stop_check_every=4, max_cache_len=300,
        max_new_tokens=11, seed=5,
    )  # fmt: skip
    options = GenerateOptions(**COMPONENTS, **values)
    settings = generation_settings(options, rows=3)
    for key, value in values.items():
        assert key in shared and getattr(settings, key) == value, key
    assert settings.batch_size == 3
    unresolved = GenerateOptions(**COMPONENTS)
    with pytest.raises(ValueError, match="resolve the prompt settings"):
        generation_settings(unresolved, rows=1)
    resolved = with_prompt_settings(unresolved, prompt_settings(None, unresolved))
    assert generation_settings(resolved, rows=1).attention == "mas"


def test_the_server_rows_have_their_own_key():
    assert "batch_size" not in {f.name for f in dataclasses.fields(ServeOptions)}
    opts = to_options(load_config("tiny_serve", ["max_num_seqs=3"]), ServeOptions, "mas_serve")
    assert opts.max_num_seqs == 3
    with pytest.raises(Exception, match="max_num_seqs"):
        to_options(load_config("tiny_serve", ["batch_size=3"]), ServeOptions, "mas_serve")


def test_no_recipe_maps_options_by_hand():
    """The recipes and the evaluation build their settings with generation_settings only."""
    for module in ("mas_generate", "mas.evaluation.run", "mas.serving._setup"):
        source = importlib.import_module(module).__file__
        text = open(source).read()
        assert "generation_settings(" in text and "GenerationSettings(" not in text, module
