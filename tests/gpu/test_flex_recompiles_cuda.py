"""CUDA: more FlexAttention shapes than dynamo's default recompile limit, all compiled.

Before mas.compile_budget, the ninth shape of the process-wide compiled ``flex_attention`` (and
of the compiled block-table builder) silently ran uncompiled. Here twelve lengths (128-token
buckets up to 1,536, past the limit of 8) each run the compiled kernel, equal the dense SDPA
twin, and a second pass over them compiles nothing. Skipped without CUDA; ``pytest -m gpu``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from mas import attention, block_mask
from mas.attention import block_mask_to_dense
from mas.block_mask import create_mas_block_mask
from mas.masks import CAUSAL, PAD

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

LENGTHS = [128 * n for n in range(1, 13)]


def _layout(b: int, s: int) -> torch.Tensor:
    seg = torch.full((b, s), CAUSAL)
    for row in range(b):
        seg[row, : 10 + 3 * row] = 0
        seg[row, 10 + 3 * row : s // 2] = 1
        seg[row, s - 7 * row :] = PAD
    return seg.cuda()


def _dense_twin(q, k, v, mask):
    dense = block_mask_to_dense(mask)[:, None]
    has_key = dense.any(-1, keepdim=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=dense | ~has_key) * has_key


def test_more_flex_shapes_than_the_recompile_limit_all_run_compiled():
    assert len(LENGTHS) > torch._dynamo.config.recompile_limit
    torch._dynamo.reset()
    attention._compiled_flex.cache_clear()
    block_mask._compiled_block_tables.cache_clear()
    counters.clear()
    try:
        generator = torch.Generator(device="cuda").manual_seed(0)
        graphs_after_each = []
        for s in LENGTHS:
            mask = create_mas_block_mask(_layout(2, s), compile=True)
            q, k, v = (torch.randn(2, 4, s, 64, device="cuda", dtype=torch.bfloat16, generator=generator) for _ in range(3))
            out = attention._flex(q, k, v, mask)
            torch.testing.assert_close(out.float(), _dense_twin(q, k, v, mask).float(), atol=2e-2, rtol=2e-2)
            graphs_after_each.append(counters["stats"]["unique_graphs"])
        # Every new length compiled something (flex and the tables): no shape fell back.
        assert all(b > a for a, b in zip(graphs_after_each, graphs_after_each[1:])), graphs_after_each
        assert attention._compiled_flex().uncompiled_calls == 0
        assert block_mask._compiled_block_tables().uncompiled_calls == 0
        warm = counters["stats"]["unique_graphs"]
        for s in reversed(LENGTHS):
            mask = create_mas_block_mask(_layout(2, s), compile=True)
            q = torch.randn(2, 4, s, 64, device="cuda", dtype=torch.bfloat16, generator=generator)
            attention._flex(q, q, q, mask)
        assert counters["stats"]["unique_graphs"] == warm, "a seen shape recompiled"
    finally:
        torch._dynamo.reset()
        attention._compiled_flex.cache_clear()
        block_mask._compiled_block_tables.cache_clear()
