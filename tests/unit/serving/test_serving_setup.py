"""mas_serve's choice of served models: adapter_checkpoint alone, or adapters by name."""

from __future__ import annotations

import pytest

from mas.config import load_config, to_options
from mas.errors import ConfigError
from mas.serving import ServeOptions
from mas.serving._setup import _adapter_specs


def _options(*overrides: str) -> ServeOptions:
    return to_options(load_config("tiny_serve", list(overrides)), ServeOptions, "mas_serve")


def test_one_adapter_or_several_by_name(monkeypatch):
    assert _adapter_specs(_options("adapter_checkpoint=/runs/a", "served_model_name=m")) == [("m", "/runs/a")]
    monkeypatch.setenv("RUNS", "/runs")
    assert _adapter_specs(_options("adapter_checkpoint=null", "adapters={mas: $RUNS/mas, causal: ~/causal}")) == [
        ("mas", "/runs/mas"),
        ("causal", str(__import__("pathlib").Path("~/causal").expanduser())),
    ]


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["adapter_checkpoint=/runs/a", "adapters={x: /runs/b}"], "not both"),
        (["adapter_checkpoint=null", "served_model_name=m", "adapters={x: /runs/b}"], "served_model_name"),
    ],
)
def test_conflicting_keys_are_one_line(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        _adapter_specs(_options(*overrides))
