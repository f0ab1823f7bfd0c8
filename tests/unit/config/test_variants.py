"""The variants a bundled name can end with (``mas-config ls`` lists them): each composes and
validates for every model (what the packing variants set: tests/unit/config/test_configs.py)."""

from __future__ import annotations

import pytest

import mas_config
from mas.config import ConfigError, bundled_models, load_config, parse_experiment_name, shared_variants, to_options

MODELS = [m.name for m in bundled_models()]
#: The name word that selects the recipe each variant is for.
_KINDS = ("mas", "eval", "generate", "serve")


def _options(name: str):
    recipe = parse_experiment_name(name).recipe
    return to_options(load_config(name, []), mas_config.options_of(recipe), recipe)


def test_ls_lists_every_variant_and_names_them_as_users_type_them(capsys):
    assert mas_config.main(["ls"]) == 0
    out = capsys.readouterr().out
    listed = out.split("VARIANTS")[1]
    for variant in shared_variants():
        assert variant in listed.splitlines()[1]
    for model in bundled_models():
        for variant in model.variants:
            assert any(line.startswith(model.name + " ") and variant in line for line in listed.splitlines()), (model.name, variant)
    assert {"packed", "1024"} <= set(shared_variants())


@pytest.mark.parametrize("model", MODELS)
def test_every_listed_variant_of_a_model_validates_for_some_recipe(model):
    """A name `mas-config ls` suggests never fails on its own keys."""
    for variant in shared_variants() + next(m for m in bundled_models() if m.name == model).variants:
        errors = []
        for kind in _KINDS:
            try:
                _options(f"{model}_{kind}_{variant}")
                break
            except ConfigError as e:
                errors.append(f"{kind}: {e}")
        else:
            pytest.fail(f"{model}_*_{variant} validates for no recipe: {errors}")


def test_an_unknown_variant_is_named_with_the_closest_one_and_the_models_variants():
    with pytest.raises(ConfigError, match=r"unknown variant 'packd'; did you mean tiny_mas_packed\? the variants of tiny: .*throughput"):
        parse_experiment_name("tiny_mas_packd")
    with pytest.raises(ConfigError, match=r"'llama3_2_1b_mas_zzz' has the unknown variant 'zzz'; the variants of llama3_2_1b: 1024, lora5"):
        parse_experiment_name("llama3_2_1b_mas_zzz")
