"""The compiled decode step's budget covers the shapes the decode loop produces."""

from __future__ import annotations

import torch

from mas.compile_budget import CompiledWithBudget
from mas.generation.decode_loop import DECODE_SHAPE_BUDGET, compiled_decode_step, decode_width


def test_budget_covers_every_width_of_the_largest_cache_for_two_batch_sizes():
    cache_len = 131_072  # Llama 3.2's max_seq_len: the widest cache a model here allows
    widths = {decode_width(written, cache_len) for written in range(1, cache_len + 1)}
    assert len(widths) == 12  # 64, 128, ..., 131072
    # A full and a last, smaller batch: every signature of one generate call compiles.
    assert 2 * len(widths) <= DECODE_SHAPE_BUDGET
    assert DECODE_SHAPE_BUDGET > torch._dynamo.config.recompile_limit


def test_each_mode_has_its_own_budgeted_wrapper():
    default, overhead = compiled_decode_step("default"), compiled_decode_step("reduce-overhead")
    assert isinstance(default, CompiledWithBudget) and isinstance(overhead, CompiledWithBudget)
    assert default is compiled_decode_step("default") and default is not overhead
    assert default.max_shapes == DECODE_SHAPE_BUDGET
    assert "reduce-overhead" in overhead.name
