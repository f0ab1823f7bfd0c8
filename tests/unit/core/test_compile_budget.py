"""Tests for mas/compile_budget.py: a budgeted compiled function compiles every shape up to its
budget (past dynamo's default limit of 8), never recompiles a shape it has seen, and past the
budget says so in one line (warn and run uncompiled, or raise) instead of falling back silently.

The mechanism is generic, so these use a trivial function and a counting ``eager`` backend
(seconds, not minutes); tests/unit/core/test_flex_compile.py runs the real FlexAttention wrapper.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from mas.compile_budget import RecompileBudgetExceeded, compile_with_budget

DEFAULT_LIMIT = torch._dynamo.config.recompile_limit


def _scaled_sine(x: torch.Tensor, scale: float = 2.0) -> torch.Tensor:
    return (x * scale).sin()


def _budgeted(max_shapes: int, on_exceed: str = "raise"):
    backend = CompileCounter()  # counts graphs compiled; runs them eagerly
    fn = compile_with_budget(
        _scaled_sine, name="scaled sine", max_shapes=max_shapes, fix="bucket the lengths", on_exceed=on_exceed, backend=backend
    )
    return fn, backend


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_default_limit_is_what_the_budget_must_beat():
    # The hazard this module exists for: dynamo's global limit is 8 and stays untouched.
    assert DEFAULT_LIMIT == 8
    _budgeted(40)
    assert torch._dynamo.config.recompile_limit == DEFAULT_LIMIT
    assert torch._dynamo.config.fail_on_recompile_limit_hit is False


def test_more_shapes_than_the_default_limit_all_run_compiled():
    shapes = 3 * DEFAULT_LIMIT
    fn, backend = _budgeted(max_shapes=shapes)
    for n in range(1, shapes + 1):
        x = torch.randn(n)
        torch.testing.assert_close(fn(x), _scaled_sine(x))
        assert backend.frame_count == n, f"shape {n} did not compile"
    assert fn.uncompiled_calls == 0


def test_unbudgeted_compile_falls_back_silently_past_the_default_limit():
    # The slow twin of the test above: plain torch.compile stops compiling after 8 shapes.
    backend = CompileCounter()
    plain = torch.compile(_scaled_sine, dynamic=False, backend=backend)
    for n in range(1, DEFAULT_LIMIT + 4):
        plain(torch.randn(n))
    assert backend.frame_count == DEFAULT_LIMIT


def test_seen_shapes_never_recompile():
    fn, backend = _budgeted(max_shapes=12)
    shapes = list(range(1, 11))
    for n in shapes:  # warm-up
        fn(torch.randn(n))
    warm = backend.frame_count
    counters = torch._dynamo.utils.counters
    counters.clear()
    for _ in range(3):
        for n in reversed(shapes):
            fn(torch.randn(n))
    assert warm == len(shapes)
    assert backend.frame_count == warm
    assert counters["stats"]["unique_graphs"] == 0  # dynamo's own count of new graphs
    assert fn.uncompiled_calls == 0


def test_past_the_budget_raises_one_line_naming_the_fix():
    fn, backend = _budgeted(max_shapes=3, on_exceed="raise")
    for n in range(1, 4):
        fn(torch.randn(n))
    with pytest.raises(RecompileBudgetExceeded) as error:
        fn(torch.randn(4))
    message = str(error.value)
    assert "\n" not in message
    assert "scaled sine" in message and "3 distinct input shapes" in message and "bucket the lengths" in message
    # Shapes inside the budget keep running compiled afterwards.
    fn(torch.randn(2))
    assert backend.frame_count == 3


def test_past_the_budget_warns_once_and_runs_uncompiled(caplog):
    fn, backend = _budgeted(max_shapes=2, on_exceed="warn")
    fn(torch.randn(1))
    fn(torch.randn(2))
    with caplog.at_level(logging.WARNING, logger="mas.compile_budget"):
        for n in (3, 4, 5):
            x = torch.randn(n)
            torch.testing.assert_close(fn(x), _scaled_sine(x))
    ours = [r for r in caplog.records if r.name == "mas.compile_budget"]
    assert len(ours) == 1
    assert "scaled sine" in ours[0].getMessage() and "bucket the lengths" in ours[0].getMessage()
    assert fn.uncompiled_calls == 3
    assert backend.frame_count == 2


def test_static_arguments_count_as_shapes_and_are_specialized():
    fn, backend = _budgeted(max_shapes=4)
    x = torch.randn(5)
    for scale in (1.0, 2.0, 3.0):
        torch.testing.assert_close(fn(x, scale=scale), _scaled_sine(x, scale))
    fn(x, scale=2.0)
    assert backend.frame_count == 3


def test_inside_a_compiled_region_the_plain_function_is_traced():
    fn, backend = _budgeted(max_shapes=2)
    outer_backend = CompileCounter()
    outer = torch.compile(lambda x: fn(x) + 1, backend=outer_backend, fullgraph=True)
    x = torch.randn(6)
    torch.testing.assert_close(outer(x), _scaled_sine(x) + 1)
    assert outer_backend.frame_count == 1
    assert backend.frame_count == 0  # traced into the outer graph, not compiled on its own


def test_bad_budget_and_policy_are_refused():
    with pytest.raises(ValueError, match="max_shapes must be >= 1"):
        compile_with_budget(_scaled_sine, name="x", max_shapes=0, fix="")
    with pytest.raises(ValueError, match="on_exceed must be"):
        compile_with_budget(_scaled_sine, name="x", max_shapes=1, fix="", on_exceed="ignore")



def test_training_layer_compile_goes_dynamic_instead_of_spending_the_limit(monkeypatch):
    """The training recipe compiles layers with torchtune's ``compile_model`` (``dynamic=None``):
    the second length recompiles once with dynamic shapes, so 16 lengths never reach dynamo's
    limit of 8 and none runs uncompiled (the budgeted static wrappers above are for code that
    must stay static: flex's CPU kernel, CUDA graphs)."""
    from torchtune import training

    from mas.models import tiny_llama3_2

    monkeypatch.setenv("TORCH_COMPILE_BACKEND", "eager")
    torch.manual_seed(0)
    model = tiny_llama3_2().eval()
    training.compile_model(model, verbose=False)
    counters = torch._dynamo.utils.counters
    counters.clear()
    with torch.no_grad():
        for s in range(4, 4 + 2 * DEFAULT_LIMIT):
            model(torch.randint(0, 100, (1, s)))
    assert 1 <= counters["stats"]["unique_graphs"] <= 2
    assert not [k for k in counters["unimplemented"] if "recompile limit" in k.lower()]


def _with_graph_break(x: torch.Tensor) -> torch.Tensor:
    y = x.sin()
    torch._dynamo.graph_break()
    return y.cos()


def test_a_function_with_a_graph_break_still_runs_compiled_in_pieces(caplog):
    """fullgraph=True must not turn a model dynamo cannot trace whole into a crash."""
    backend = CompileCounter()
    fn = compile_with_budget(_with_graph_break, name="broken step", max_shapes=4, fix="-", backend=backend)
    with caplog.at_level(logging.WARNING, logger="mas.compile_budget"):
        x = torch.randn(5)
        torch.testing.assert_close(fn(x), x.sin().cos())
        torch.testing.assert_close(fn(x), x.sin().cos())
    assert backend.frame_count == 2  # the two pieces, compiled once
    assert fn.uncompiled_calls == 0
    assert sum("graph break" in r.getMessage() for r in caplog.records) == 1
