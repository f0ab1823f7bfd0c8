"""The real compiled FlexAttention wrapper (``mas.attention._flex``) on CPU, under its budget.

Compiled flex forward works on CPU (about 20 s per new shape here), so this keeps to two
shapes: both run compiled (none uncompiled), equal the dense SDPA twin of the same BlockMask,
and a repeated shape compiles nothing. tests/gpu/test_flex_recompiles_cuda.py runs more shapes
than dynamo's default limit on CUDA; tests/unit/core/test_compile_budget.py checks the budget
itself past that limit with a trivial function.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from mas import attention
from mas.attention import FLEX_SHAPE_BUDGET, block_mask_to_dense
from mas.block_mask import create_mas_block_mask
from mas.compile_budget import CompiledWithBudget

from support.masks import CAUSAL_ID, PAD_ID


def _layout(batch_size: int, seq_len: int) -> torch.Tensor:
    """``[b, s]``: a system and a user segment, a causal answer, right padding per row."""
    seg = torch.full((batch_size, seq_len), CAUSAL_ID)
    for row in range(batch_size):
        seg[row, : 10 + row] = 0
        seg[row, 10 + row : seq_len // 2] = 1
        seg[row, seq_len - 5 * row :] = PAD_ID
    return seg


def _dense_twin(q, k, v, block_mask):
    """SDPA over the BlockMask's dense mask; rows without a key give zeros, as flex does."""
    mask = block_mask_to_dense(block_mask)[:, None]  # [b, 1, q, kv]
    has_key = mask.any(-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | ~has_key)
    return out * has_key


def test_flex_budget_beats_the_default_limit():
    assert FLEX_SHAPE_BUDGET > torch._dynamo.config.recompile_limit
    assert isinstance(attention._compiled_flex(), CompiledWithBudget)
    assert attention._compiled_flex().max_shapes == FLEX_SHAPE_BUDGET


@pytest.mark.slow
@torch.no_grad()
def test_compiled_flex_on_cpu_equals_dense_twin_and_never_recompiles_a_seen_shape():
    torch._dynamo.reset()
    attention._compiled_flex.cache_clear()
    counters.clear()
    try:
        generator = torch.Generator().manual_seed(0)
        # Two (batch, length) shapes, one not a multiple of the 128-token tile.
        for batch_size, seq_len in ((2, 150), (1, 256)):
            seg = _layout(batch_size, seq_len)
            block_mask = create_mas_block_mask(seg)
            q, k, v = (torch.randn(batch_size, 2, seq_len, 16, generator=generator) for _ in range(3))
            out = attention._flex(q, k, v, block_mask)
            torch.testing.assert_close(out, _dense_twin(q, k, v, block_mask), atol=1e-5, rtol=1e-5)
        warm = counters["stats"]["unique_graphs"]
        assert warm >= 2  # each shape compiled (flex's own graphs may add to the count)
        seg = _layout(2, 150)
        block_mask = create_mas_block_mask(seg)  # a new BlockMask and mask_mod closure, same shape
        q, k, v = (torch.randn(2, 2, 150, 16, generator=generator) for _ in range(3))
        torch.testing.assert_close(attention._flex(q, k, v, block_mask), _dense_twin(q, k, v, block_mask), atol=1e-5, rtol=1e-5)
        assert counters["stats"]["unique_graphs"] == warm, "a seen shape recompiled"
        assert attention._compiled_flex().uncompiled_calls == 0
    finally:
        torch._dynamo.reset()
        attention._compiled_flex.cache_clear()
