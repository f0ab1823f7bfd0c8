"""The windowed SDPA and the windowed mask builder against their slow twins.

- windowed SDPA (per query tile, only its key window) vs one ``scaled_dot_product_attention``
  call over the full dense mask, rows with no allowed key zeroed (outputs and gradients);
- ``windowed_mas_mask`` (the rule evaluated only inside windows planned from the ids) vs
  ``dense_mas_mask`` and Eq. 14 written independently (``support.masks``).

Layouts are random: pipeline-like and arbitrary ids, packed or not, left and right padding,
query windows of a KV-cache prefill.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mas.masks import CAUSAL, PAD, dense_mas_mask
from mas.windowed_sdpa import MAX_WINDOWED_WORK, key_windows, prepare_sdpa_mask, sdpa_mask_of, windowed_mas_mask, windowed_sdpa
from support.masks import eq14_allowed, layouts


def whole_mask_sdpa(q, k, v, mask):
    """One SDPA call over the whole ``[b, q, kv]`` mask; rows with no key give zeros."""
    row_has_key = mask.any(-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=(mask | ~row_has_key)[:, None], enable_gqa=True)
    return out * row_has_key[:, None].to(out.dtype)


def random_qkv(batch, q_len, kv_len, heads=4, kv_heads=2, head_dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, head_dim, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(batch, kv_heads, kv_len, head_dim, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(batch, kv_heads, kv_len, head_dim, generator=gen, dtype=torch.float64, requires_grad=True)
    return q, k, v


def outputs_and_grads(fn, q, k, v):
    out = fn(q, k, v)
    grad_out = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    return out, grads


def assert_windowed_equals_whole(mask, tile):
    mask = torch.as_tensor(mask)
    batch, q_len, kv_len = mask.shape
    q, k, v = random_qkv(batch, q_len, kv_len)
    windowed = prepare_sdpa_mask(mask, tile=tile, max_work=1.0)
    assert windowed.windows == (key_windows(mask, tile) if q_len > tile else None)
    want, want_grads = outputs_and_grads(lambda q, k, v: whole_mask_sdpa(q, k, v, mask), q, k, v)
    got, got_grads = outputs_and_grads(lambda q, k, v: windowed_sdpa(q, k, v, windowed, enable_gqa=True), q, k, v)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(layout=layouts(max_len=200, max_batch=3), tile=st.sampled_from([1, 7, 16, 128]))
def test_windowed_equals_whole_mask_on_pipeline_layouts(layout, tile):
    """Packed and padded rows, left and right padding, query windows of a KV-cache prefill."""
    assert_windowed_equals_whole(eq14_allowed(layout), tile)


@settings(max_examples=25, deadline=None)
@given(layout=layouts(max_len=64, max_batch=2, contiguous=False), tile=st.sampled_from([1, 5, 16]))
def test_windowed_equals_whole_mask_on_arbitrary_ids(layout, tile):
    """Any ids in any order (masks that are not intervals): the windows still cover every key."""
    assert_windowed_equals_whole(eq14_allowed(layout), tile)


def test_windows_cover_every_allowed_key_and_every_query_once():
    gen = torch.Generator().manual_seed(3)
    mask = torch.rand(2, 50, 60, generator=gen) < 0.05
    mask[:, 10:20] = False  # a tile of queries with no key
    windows = key_windows(mask, tile=8)
    covered_queries = [i for q0, q1, _, _ in windows for i in range(q0, q1)]
    assert covered_queries == list(range(50))
    for q0, q1, k0, k1 in windows:
        outside = mask[:, q0:q1].clone()
        outside[:, :, k0:k1] = False
        assert not outside.any(), f"tile {q0}:{q1} has an allowed key outside [{k0}, {k1})"


def packed_row(lengths, pack_length):
    """Segment and document ids of one pack: per example a system, a user and an answer part."""
    segments, documents, next_segment = [], [], 0
    for document, length in enumerate(lengths):
        answer = 7
        system = (length - answer) // 4
        segments += [next_segment] * system + [next_segment + 1] * (length - answer - system) + [CAUSAL] * answer
        documents += [document] * length
        next_segment += 2
    pad = pack_length - len(segments)
    return torch.tensor([segments + [PAD] * pad]), torch.tensor([documents + [len(lengths)] * pad])


def test_a_pack_of_examples_is_windowed_and_a_padded_batch_is_not():
    """The plan pays only where it saves work: a 1024-token pack of ~125-token examples uses about
    a fifth of the score matrix; a batch of rows padded to its length uses one call."""
    segments, documents = packed_row([125, 118, 131, 122, 127, 120, 133, 119], 1024)
    packed = prepare_sdpa_mask(dense_mas_mask(segments, documents))
    assert packed.windows is not None
    work = sum((q1 - q0) * (k1 - k0) for q0, q1, k0, k1 in packed.windows) / 1024**2
    assert work < 0.3

    rows = torch.full((4, 256), PAD)
    for row, length in enumerate([130, 250, 200, 256]):
        rows[row, :length] = 0
        rows[row, length - 7 : length] = CAUSAL
    padded = prepare_sdpa_mask(dense_mas_mask(rows))
    assert padded.windows is None


def test_no_windows_on_a_mask_that_would_not_save_work():
    mask = torch.ones(1, 512, 512, dtype=torch.bool)
    assert prepare_sdpa_mask(mask).windows is None
    assert MAX_WINDOWED_WORK < 1.0


def test_attention_layer_uses_the_windows_and_rereads_a_mask_changed_in_place():
    """``MASAttention`` caches the prepared mask on the mask; an in-place change invalidates it."""
    from mas.attention import MASAttention

    segments, documents = packed_row([125, 118, 131, 122, 127, 120, 133, 119], 1024)
    mask = dense_mas_mask(segments, documents)
    q, k, v = random_qkv(1, 1024, 1024)
    attend = MASAttention("sdpa")
    torch.testing.assert_close(attend(q, k, v, mask, 0.0, False), whole_mask_sdpa(q, k, v, mask))
    assert mask._mas_sdpa_mask[1].windows is not None
    mask[:, 500:, :400] = True  # queries of later examples now see the first examples too
    torch.testing.assert_close(attend(q, k, v, mask, 0.0, False), whole_mask_sdpa(q, k, v, mask))


def assert_windowed_builder_equals_dense(layout, tile):
    segments, documents = layout.torch_ids()
    kwargs = dict(query_start=layout.query_start, query_len=layout.query_len)
    built = windowed_mas_mask(segments, documents, cut_step=tile, max_work=1.0, **kwargs)
    assert torch.equal(built, dense_mas_mask(segments, documents, **kwargs))
    assert torch.equal(built, torch.as_tensor(eq14_allowed(layout)))
    # The SdpaMask cached by the builder gives what one call over the whole mask gives.
    batch, q_len, kv_len = built.shape
    q, k, v = random_qkv(batch, q_len, kv_len)
    prepared = sdpa_mask_of(built)  # cached by the builder when it planned windows
    torch.testing.assert_close(
        windowed_sdpa(q, k, v, prepared, enable_gqa=True), whole_mask_sdpa(q, k, v, built), rtol=1e-10, atol=1e-10
    )


@settings(max_examples=25, deadline=None)
@given(layout=layouts(max_len=200, max_batch=3), tile=st.sampled_from([1, 7, 16, 128]))
def test_windowed_builder_equals_dense_mask_on_pipeline_layouts(layout, tile):
    assert_windowed_builder_equals_dense(layout, tile)


@settings(max_examples=25, deadline=None)
@given(layout=layouts(max_len=64, max_batch=2, contiguous=False), tile=st.sampled_from([1, 5, 16]))
def test_windowed_builder_equals_dense_mask_on_arbitrary_ids(layout, tile):
    """Ids out of order, documents interleaved: the windows planned from ids still hold every key."""
    assert_windowed_builder_equals_dense(layout, tile)


def test_windowed_builder_plans_a_pack_from_its_ids_and_skips_most_of_the_matrix():
    """In a pack the plan cuts one tile per example, whose window is that example: less work
    than fixed 128-query tiles read from the mask, and every allowed key inside its window."""
    lengths = [125, 118, 131, 122, 127, 120, 133, 119]
    segments, documents = packed_row(lengths, 1024)
    built = windowed_mas_mask(segments, documents)
    prepared = built._mas_sdpa_mask[1]  # attached by the builder: no layer reads the mask again
    assert torch.equal(built, dense_mas_mask(segments, documents))
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    examples = [(a, a + n, a, a + n) for a, n in zip(starts, lengths)]
    # The last example shares its call with the short padding tail (a call costs more than
    # the padding's scores).
    assert prepared.windows[:-1] == examples[:-1]
    assert prepared.windows[-1][0] == prepared.windows[-1][2] == starts[-1]
    for q0, q1, k0, k1 in prepared.windows:
        outside = built[:, q0:q1].clone()
        outside[:, :, k0:k1] = False
        assert not outside.any()
    work = sum((q1 - q0) * (k1 - k0) for q0, q1, k0, k1 in prepared.windows)
    fixed_tiles = sum((q1 - q0) * (k1 - k0) for q0, q1, k0, k1 in key_windows(built))
    assert work < 0.9 * fixed_tiles


def test_masks_built_under_inference_mode_are_prepared_once():
    """Inference tensors keep no version counter (generation runs under inference_mode)."""
    from mas.attention import MASAttention

    segments, documents = packed_row([125, 118, 131], 512)
    with torch.inference_mode():
        mask = windowed_mas_mask(segments, documents)
        prepared = mask._mas_sdpa_mask[1]  # by the builder
        q, k, v = (t.detach() for t in random_qkv(1, 512, 512))
        got = MASAttention("sdpa")(q, k, v, mask, 0.0, False)
        # Taken before the calls: a re-preparation would replace it (and read the mask again).
        assert mask._mas_sdpa_mask[1] is prepared and sdpa_mask_of(mask) is prepared
    torch.testing.assert_close(got, whole_mask_sdpa(q, k, v, mask))


def test_planning_and_windowed_build_refuse_ids_off_the_cpu():
    """They read ids on the host: on a device tensor that would be a sync per read (or a device
    mismatch deep inside), so they refuse it in one line ('meta' stands in for CUDA here)."""
    import pytest

    from mas.windowed_sdpa import plan_key_windows

    ids = torch.zeros(1, 64, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match="segment_ids on meta.*CPU"):
        plan_key_windows(ids)
    with pytest.raises(ValueError, match="document_ids on meta.*CPU"):
        plan_key_windows(torch.zeros(1, 64, dtype=torch.long), ids)
    with pytest.raises(ValueError, match="segment_ids on meta.*CPU"):
        windowed_mas_mask(ids, validate=False, key_windows=[(0, 32, 0, 32), (32, 64, 0, 64)])


def test_windows_handed_in_are_checked_against_the_ids():
    """Windows planned for other ids would drop keys silently: with ``validate`` the builder
    refuses them in one line, and takes the windows planned for these ids."""
    import pytest

    from mas.windowed_sdpa import plan_key_windows

    segments, documents = packed_row([125, 118, 131, 122], 512)
    own = plan_key_windows(segments, documents)
    assert torch.equal(windowed_mas_mask(segments, documents, key_windows=own), dense_mas_mask(segments, documents))
    other_segments, other_documents = packed_row([60, 190, 131, 100], 512)
    other = plan_key_windows(other_segments, other_documents)
    with pytest.raises(ValueError, match="key window .* holds keys .* may see keys"):
        windowed_mas_mask(segments, documents, key_windows=other)
    q0, q1, k0, k1 = own[1]
    one_short = [*own[:1], (q0, q1, k0, k1 - 1), *own[2:]]
    with pytest.raises(ValueError, match="key window 1 "):
        windowed_mas_mask(segments, documents, key_windows=one_short)
    with pytest.raises(ValueError, match="key window 1 covers queries"):
        windowed_mas_mask(segments, documents, key_windows=[own[0], *own[2:]])
    with pytest.raises(ValueError, match="cover queries"):
        windowed_mas_mask(segments, documents, key_windows=own[:-1])


def test_windows_evaluated_together_equal_each_window_alone():
    """The batched evaluation of a pack's windows (one mask_mod call over the windows stacked and
    padded) gives each window's block and SDPA tiles exactly as evaluating it alone; windows of
    very different sizes take the per-window path."""
    from mas.masks import mas_mask_mod, materialize_mask_mod
    from mas.windowed_sdpa import _from_tiles, _tile_masks, plan_key_windows

    cases = [packed_row([125, 118, 131, 122, 127, 120, 133, 119], 1024), packed_row([40, 300, 20, 90], 512)]
    two_rows = [torch.cat([a, b]) for a, b in zip(packed_row([60, 61, 70], 256), packed_row([100, 90, 50], 256))]
    for segments, documents in [*cases, tuple(two_rows)]:
        windows = plan_key_windows(segments, documents)
        mask_mod = mas_mask_mod(segments, documents)
        batch = segments.shape[0]
        alone = [materialize_mask_mod(mask_mod, batch, q1 - q0, k1 - k0, segments.device, q_offset=q0, kv_offset=k0) for q0, q1, k0, k1 in windows]
        blocks, prepared = _tile_masks(mask_mod, batch, windows)
        reference = _from_tiles(windows, alone)
        assert all(torch.equal(b, a) for b, a in zip(blocks, alone))
        assert [t.window for t in prepared.tiles] == [t.window for t in reference.tiles]
        assert all(torch.equal(t.attn_mask, r.attn_mask) for t, r in zip(prepared.tiles, reference.tiles))
        assert torch.equal(prepared.row_has_key, reference.row_has_key)
