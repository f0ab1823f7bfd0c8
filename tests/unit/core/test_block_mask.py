"""Tests for mas/block_mask.py: the O(s) BlockMask against Eq. 14, create_block_mask and SDPA.

What ``create_mas_block_mask`` guarantees, and what is checked here:

- exact: the BlockMask read token by token (full tile -> allowed; partial tile -> mask_mod;
  otherwise masked) equals Eq. 14, for any ids;
- conservative: every tile holding an allowed pair is listed (partial or full), and a tile
  listed as full allows every in-range pair;
- as sparse as ``create_block_mask`` on pipeline-like layouts (contiguous, increasing ids)
  when query blocks line up with key blocks (a prefill from position 0, or a window starting on
  a block boundary): the same tiles are listed, and every tile it calls full, ours calls full
  too. Ours may also call full a tile of the last, partly filled query block whose in-range
  pairs are all allowed: ``create_block_mask`` counts the out-of-range pairs as masked, a
  choice, not a requirement (the kernel never uses those rows). A window that starts inside a
  block can leave a diagonal tile partial (or listed) that ``create_block_mask`` calls full
  (or empty): exact, slightly less sparse.
- laid out as the kernels read it: contiguous int32 tables (checked directly, since a
  transposed table decodes fine in Python but corrupted dK/dV on CUDA).
"""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import flex_attention

from mas.block_mask import create_mas_block_mask, create_mas_block_mask_reference
from mas.masks import dense_mas_mask

from support.masks import (
    CAUSAL_ID,
    PAD_ID,
    Layout,
    block_mask_tiles,
    block_mask_token_view,
    eq14_allowed,
    layouts,
    ordered_to_tiles,
    reference_attention,
    true_tiles,
)

BLOCK_SIZES = st.sampled_from([16, 32, 64, 128])


def _build(layout, block_size: int, reference: bool = False):
    segment_ids, document_ids = layout.torch_ids()
    builder = create_mas_block_mask_reference if reference else create_mas_block_mask
    return builder(
        segment_ids,
        document_ids,
        query_start=layout.query_start,
        query_len=layout.query_len,
        block_size=block_size,
    )


def _check_exact_and_conservative(layout, block_size: int) -> None:
    block_mask = _build(layout, block_size)
    allowed = eq14_allowed(layout)
    assert block_mask.seq_lengths == (layout.query_len, layout.seq_len)
    assert tuple(block_mask.BLOCK_SIZE) == (block_size, block_size)

    np.testing.assert_array_equal(block_mask_token_view(block_mask), allowed)

    partial, full = block_mask_tiles(block_mask)
    partial, full = partial[:, 0], full[:, 0]
    truly_nonempty, truly_full = true_tiles(allowed, block_size)
    assert not (partial & full).any(), "a tile is both partial and full"
    assert not (truly_nonempty & ~(partial | full)).any(), "a tile with an allowed pair is skipped"
    assert not (full & ~truly_full).any(), "a tile called full masks some pair"

    # The backward pass reads the same table by key block.
    n_q, n_kv = partial.shape[-2:]
    q_partial = ordered_to_tiles(block_mask.q_num_blocks, block_mask.q_indices, n_q)[:, 0]
    q_full = ordered_to_tiles(block_mask.full_q_num_blocks, block_mask.full_q_indices, n_q)[:, 0]
    np.testing.assert_array_equal(q_partial, partial.transpose(0, 2, 1))
    np.testing.assert_array_equal(q_full, full.transpose(0, 2, 1))


@settings(max_examples=80, deadline=None)
@given(layouts(contiguous=True), BLOCK_SIZES)
def test_block_mask_exact_on_pipeline_layouts(layout, block_size):
    _check_exact_and_conservative(layout, block_size)


@settings(max_examples=60, deadline=None)
@given(layouts(contiguous=False, max_len=200), BLOCK_SIZES)
def test_block_mask_exact_on_arbitrary_ids(layout, block_size):
    _check_exact_and_conservative(layout, block_size)


@settings(max_examples=60, deadline=None)
@given(layouts(contiguous=True), BLOCK_SIZES)
def test_block_mask_as_sparse_as_create_block_mask(layout, block_size):
    # Query blocks aligned with key blocks: a prefill from position 0, or a window that starts
    # on a block boundary and runs to the end (see test_block_mask_misaligned_window_is_loose).
    query_start = layout.query_start - layout.query_start % block_size
    layout = dataclasses.replace(
        layout, query_start=query_start, query_len=layout.seq_len - query_start
    )
    ours_partial, ours_full = (t[:, 0] for t in block_mask_tiles(_build(layout, block_size)))
    ref_partial, ref_full = (
        t[:, 0] for t in block_mask_tiles(_build(layout, block_size, reference=True))
    )
    np.testing.assert_array_equal(ours_partial | ours_full, ref_partial | ref_full)
    assert not (ref_full & ~ours_full).any(), "create_block_mask finds a full tile we miss"
    # Extra full tiles only in the last, partly filled query block, where create_block_mask
    # counts the out-of-range queries as masked.
    extra = ours_full & ~ref_full
    if layout.query_len % block_size == 0:
        assert not extra.any()
    else:
        assert not extra[:, :-1].any()


def test_block_mask_misaligned_window_is_loose_but_exact():
    """A query window that does not start on a block boundary can leave a tile partial (or
    listed) that create_block_mask calls full (or empty): the builder's tile tests compare whole
    blocks, and such a tile mixes "causal" and "same segment" pairs. Exactness is unaffected
    (the partial tile runs the mask_mod); the cost is at most the tiles on the diagonal."""
    # 48 pads, a 16-token segment, one more segment; queries are positions 33..64.
    segment_ids = np.array([[PAD_ID] * 48 + [0] * 16 + [1]])
    layout = Layout(segment_ids, None, query_start=33, query_len=32)
    _check_exact_and_conservative(layout, block_size=16)
    ours_partial, ours_full = (t[0, 0] for t in block_mask_tiles(_build(layout, 16)))
    ref_partial, ref_full = (t[0, 0] for t in block_mask_tiles(_build(layout, 16, reference=True)))
    assert ref_full[1, 3] and ours_partial[1, 3]  # every pair allowed, some causally
    assert not (ours_full & ~ref_full).any()
    assert not ((ref_partial | ref_full) & ~(ours_partial | ours_full)).any()


def test_block_mask_lists_diagonal_segment_as_full():
    # One 256-token system segment then a causal answer: the first two query blocks see the
    # whole segment (full tiles above the diagonal), the answer block sees it causally.
    segment_ids = torch.tensor([[0] * 256 + [CAUSAL_ID] * 128])
    partial, full = (t[0, 0] for t in block_mask_tiles(create_mas_block_mask(segment_ids)))
    assert full.tolist() == [[True, True, False], [True, True, False], [True, True, False]]
    assert partial.tolist() == [[False, False, False], [False, False, False], [False, False, True]]


def test_block_mask_skips_padding_blocks():
    segment_ids = torch.tensor([[PAD_ID] * 128 + [0] * 100 + [CAUSAL_ID] * 28])
    partial, full = (t[0, 0] for t in block_mask_tiles(create_mas_block_mask(segment_ids)))
    assert not (partial | full)[:, 0].any()  # no query attends the left-padding block


@pytest.mark.parametrize("query_start, query_len", [(-1, 2), (0, 0), (3, 6)])
def test_block_mask_rejects_bad_query_window(query_start, query_len):
    with pytest.raises(ValueError, match="exceed"):
        create_mas_block_mask(
            torch.zeros(1, 8, dtype=torch.long), query_start=query_start, query_len=query_len
        )


_TABLES = [
    "kv_num_blocks",
    "kv_indices",
    "full_kv_num_blocks",
    "full_kv_indices",
    "q_num_blocks",
    "q_indices",
    "full_q_num_blocks",
    "full_q_indices",
]


@pytest.mark.parametrize("seq_len", [100, 256, 300])
def test_block_tables_are_laid_out_like_create_block_mask(seq_len):
    """The kernels read the tables as contiguous int32 rows. A q table left with transposed
    strides decodes correctly in Python (so the tests above pass) yet gave dK/dV errors of
    order 1 in the CUDA backward: check the memory layout itself."""
    segment_ids = torch.tensor([([0] * 60 + [1] * 90 + [CAUSAL_ID] * seq_len)[:seq_len]] * 2)
    ours = create_mas_block_mask(segment_ids)
    reference = create_mas_block_mask_reference(segment_ids)
    for name in _TABLES:
        table, expected = getattr(ours, name), getattr(reference, name)
        assert table.is_contiguous(), name
        assert table.dtype == expected.dtype == torch.int32, name
        assert table.shape == expected.shape, name


def test_block_mask_on_device_of_ids():
    block_mask = create_mas_block_mask(torch.zeros(2, 10, dtype=torch.long))
    assert block_mask.kv_num_blocks.device == torch.device("cpu")
    assert block_mask.kv_num_blocks.shape == (2, 1, 1)


# ---------------------------------------------------------------------------------------------
# The kernel: FlexAttention with the BlockMask equals SDPA with the dense mask.
# ---------------------------------------------------------------------------------------------


def _kernel_layout(seq_len: int):
    """``[3, seq_len]`` segment ids and ``[3, seq_len]`` document ids: a left-padded prompt,
    a packed row with a padding tail, and a multi-turn row."""
    def row(*parts):
        ids = [value for value, count in parts for _ in range(count)]
        return (ids + [PAD_ID] * seq_len)[:seq_len]

    n = seq_len
    segment_ids = torch.tensor(
        [
            row((PAD_ID, n // 3), (0, 7), (1, n // 3), (CAUSAL_ID, n)),
            row((0, n // 4), (CAUSAL_ID, n // 8), (1, n // 5), (CAUSAL_ID, n // 6)),
            row((0, 5), (1, 40), (CAUSAL_ID, 30), (2, n // 2), (CAUSAL_ID, n)),
        ]
    )
    document_ids = torch.zeros_like(segment_ids)
    document_ids[1, n // 4 + n // 8 :] = 1
    document_ids[1, n // 4 + n // 8 + n // 5 + n // 6 :] = 2  # padding: its own document
    return segment_ids, document_ids


def _sdpa_dense(q, k, v, allowed):
    """SDPA with the dense mask; rows that may attend nothing output zeros."""
    row_has_key = allowed.any(-1, keepdim=True)[:, None]  # [b, 1, s_q, 1]
    attn_mask = (allowed[:, None] | ~row_has_key)  # [b, 1, s_q, s_kv]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask) * row_has_key


@pytest.fixture(scope="module")
def compiled_flex():
    # dynamic=False: a dynamic-shape recompile breaks the CPU kernel in torch 2.13.
    return torch.compile(flex_attention, dynamic=False)


@pytest.mark.slow
@pytest.mark.parametrize(
    "seq_len, query_start",
    [(200, 0), (200, 150)],  # two shapes: a full prefill and a query window
    ids=["prefill", "window"],
)
def test_flex_forward_equals_sdpa_cpu(compiled_flex, seq_len, query_start):
    torch.manual_seed(0)
    segment_ids, document_ids = _kernel_layout(seq_len)
    query_len = seq_len - query_start
    batch_size, heads, head_dim = segment_ids.shape[0], 2, 16
    q = torch.randn(batch_size, heads, query_len, head_dim)
    k, v = (torch.randn(batch_size, heads, seq_len, head_dim) for _ in range(2))
    block_mask = create_mas_block_mask(segment_ids, document_ids, query_start=query_start)
    allowed = dense_mas_mask(segment_ids, document_ids, query_start=query_start)

    out_flex = compiled_flex(q, k, v, block_mask=block_mask)
    out_sdpa = _sdpa_dense(q, k, v, allowed)
    out_math = reference_attention(q.double(), k.double(), v.double(), allowed)

    assert not out_flex.isnan().any() and not out_sdpa.isnan().any()
    empty_rows = ~allowed.any(-1)  # [b, s_q]
    if query_start == 0:
        assert empty_rows[0, : seq_len // 3].all(), "the left-padded row has empty queries"
    assert (out_flex.permute(0, 2, 1, 3)[empty_rows] == 0).all()
    assert (out_sdpa.permute(0, 2, 1, 3)[empty_rows] == 0).all()
    torch.testing.assert_close(out_flex, out_sdpa, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out_flex.double(), out_math, atol=2e-5, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("seq_len, query_start", [(300, 0), (1000, 700)], ids=["prefill", "window"])
def test_flex_forward_backward_equals_sdpa_cuda(dtype, seq_len, query_start):
    torch.manual_seed(0)
    device = torch.device("cuda")
    segment_ids, document_ids = (t.to(device) for t in _kernel_layout(seq_len))
    query_len = seq_len - query_start
    batch_size, heads, head_dim = segment_ids.shape[0], 4, 64
    block_mask = create_mas_block_mask(segment_ids, document_ids, query_start=query_start)
    allowed = dense_mas_mask(segment_ids, document_ids, query_start=query_start)
    q64 = torch.randn(batch_size, heads, query_len, head_dim, device=device, dtype=torch.float64)
    k64, v64 = (
        torch.randn(batch_size, heads, seq_len, head_dim, device=device, dtype=torch.float64)
        for _ in range(2)
    )
    grad_out = torch.randn(batch_size, heads, query_len, head_dim, device=device, dtype=dtype)
    flex = torch.compile(flex_attention, dynamic=False)

    def run(attention, precision):
        q, k, v = (t.detach().clone().to(precision).requires_grad_() for t in (q64, k64, v64))
        out = attention(q, k, v)
        out.backward(grad_out.to(precision))
        return [t.double() for t in (out, q.grad, k.grad, v.grad)]

    results_flex = run(lambda q, k, v: flex(q, k, v, block_mask=block_mask), dtype)
    results_sdpa = run(lambda q, k, v: _sdpa_dense(q, k, v, allowed), dtype)
    results_exact = run(lambda q, k, v: reference_attention(q, k, v, allowed), torch.float64)

    names = ["out", "dq", "dk", "dv"]
    for name, got, sdpa, exact in zip(names, results_flex, results_sdpa, results_exact):
        assert torch.isfinite(got).all(), name
        if dtype == torch.float32:
            torch.testing.assert_close(got, exact, atol=1e-4, rtol=1e-4, msg=name)
            torch.testing.assert_close(got, sdpa, atol=1e-4, rtol=1e-4, msg=name)
        else:
            # bf16: flex may not be worse than bf16 SDPA by more than a small margin.
            flex_error = (got - exact).abs().max().item()
            sdpa_error = (sdpa - exact).abs().max().item()
            assert flex_error <= 2 * sdpa_error + 1e-2, (name, flex_error, sdpa_error)
            torch.testing.assert_close(got, sdpa, atol=5e-2, rtol=5e-2, msg=name)
    empty_rows = ~allowed.any(-1)
    out, dq = results_flex[0], results_flex[1]
    assert (out.permute(0, 2, 1, 3)[empty_rows] == 0).all()
    assert (dq.permute(0, 2, 1, 3)[empty_rows] == 0).all()


def test_compiled_block_tables_equal_eager_tables():
    from mas.masks import CAUSAL, PAD

    """``compile=True`` builds the same tables (the compiled graph fuses the eager ops)."""
    from mas.block_mask import create_mas_block_mask

    seg = torch.full((3, 300), CAUSAL)
    seg[:, :40] = 0
    seg[:, 40:170] = 1
    seg[1, 250:] = PAD
    seg[2, :20] = PAD
    docs = torch.zeros_like(seg)
    docs[0, 150:] = 1
    for kwargs in ({}, {"document_ids": docs}, {"query_start": 100, "query_len": 150}):
        eager = create_mas_block_mask(seg, **kwargs)
        compiled = create_mas_block_mask(seg, compile=True, **kwargs)
        for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                     "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):  # fmt: skip
            assert torch.equal(getattr(eager, name), getattr(compiled, name)), (name, kwargs)
