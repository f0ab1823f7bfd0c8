"""Tests for mas/masks.py: each mask_mod alone, id validation, and the dense MAS mask vs Eq. 14."""

import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings

from mas.errors import ConfigError
from mas.masks import (
    CAUSAL,
    PAD,
    as_causal,
    causal,
    causal_from,
    dense_mas_mask,
    key_not_padding,
    mas_mask_mod,
    materialize_mask_mod,
    same_document,
    same_prompt_segment,
    validate_attention_mode,
    validate_segment_ids,
)

from support.masks import CAUSAL_ID, PAD_ID, Layout, eq14_allowed, eq14_allowed_loops, layouts


def _dense(mask_mod, batch_size: int, q_len: int, kv_len: int) -> torch.Tensor:
    """bool ``[b, q_len, kv_len]`` of a mask_mod, evaluated pair by pair."""
    out = torch.zeros(batch_size, q_len, kv_len, dtype=torch.bool)
    h = torch.tensor(0)
    for b, i, j in np.ndindex(batch_size, q_len, kv_len):
        out[b, i, j] = bool(mask_mod(torch.tensor(b), h, torch.tensor(i), torch.tensor(j)))
    return out


def test_id_convention_matches_helpers():
    assert (PAD, CAUSAL) == (PAD_ID, CAUSAL_ID) == (-2, -1)


# ---------------------------------------------------------------------------------------------
# Each mask_mod alone.
# ---------------------------------------------------------------------------------------------


def test_causal_is_lower_triangular():
    assert torch.equal(_dense(causal, 1, 5, 5)[0], torch.ones(5, 5, dtype=torch.bool).tril())


def test_causal_from_offsets_queries():
    # Queries 0..2 are key positions 3..5 of a 6-token sequence.
    expected = torch.ones(6, 6, dtype=torch.bool).tril()[3:]
    assert torch.equal(_dense(causal_from(3), 1, 3, 6)[0], expected)
    assert causal_from(0) is causal


def test_same_prompt_segment_ignores_causal_and_padding_queries():
    segment_ids = torch.tensor([[0, 0, 1, CAUSAL, CAUSAL, PAD]])
    got = _dense(same_prompt_segment(segment_ids), 1, 6, 6)[0]
    expected = torch.zeros(6, 6, dtype=torch.bool)
    expected[:2, :2] = True
    expected[2, 2] = True
    # CAUSAL (-1) and PAD (-2) are no segment: equal ids do not join them.
    assert torch.equal(got, expected)


def test_same_prompt_segment_with_query_window():
    segment_ids = torch.tensor([[0, 0, 1, 1, 1], [2, 2, 2, 3, 3]])
    got = _dense(same_prompt_segment(segment_ids, query_start=2), 2, 3, 5)
    assert got[0].tolist() == [[False, False, True, True, True]] * 3
    assert got[1].tolist() == [[True, True, True, False, False]] + [
        [False, False, False, True, True]
    ] * 2


def test_same_document():
    document_ids = torch.tensor([[0, 0, 1, 1, 2]])
    got = _dense(same_document(document_ids), 1, 5, 5)[0]
    expected = torch.tensor(
        [[i in (0, 1) and j in (0, 1) or i in (2, 3) and j in (2, 3) or i == j == 4 for j in range(5)]
         for i in range(5)]
    )
    assert torch.equal(got, expected)
    # Query window: query 0 is position 3 (document 1).
    got = _dense(same_document(document_ids, query_start=3), 1, 2, 5)[0]
    assert got.tolist() == [[False, False, True, True, False], [False] * 4 + [True]]


def test_key_not_padding_looks_at_keys_only():
    segment_ids = torch.tensor([[PAD, 0, CAUSAL, PAD], [0, 0, 0, 0]])
    got = _dense(key_not_padding(segment_ids), 2, 4, 4)
    assert got[0].tolist() == [[False, True, True, False]] * 4
    assert got[1].all()


def test_mas_mask_mod_is_named():
    assert mas_mask_mod(torch.zeros(1, 3, dtype=torch.long)).__name__ == "mas"


def test_materialize_mask_mod_broadcasts_to_full_shape():
    def keys_after_zero(b, h, q_idx, kv_idx):
        return kv_idx > 0  # ignores b and q: broadcasts to [1, 1, kv]

    dense = materialize_mask_mod(keys_after_zero, 2, 3, 4, torch.device("cpu"))
    assert dense.shape == (2, 3, 4) and dense.dtype == torch.bool
    assert dense[:, :, 0].logical_not().all() and dense[:, :, 1:].all()
    dense[0, 0, 1] = False  # a real tensor, not an expanded view
    assert dense[1, 0, 1]


# ---------------------------------------------------------------------------------------------
# Validation.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "segment_ids, match",
    [
        (torch.zeros(5, dtype=torch.long), r"\[batch, seq\]"),
        (torch.zeros(1, 2, 3, dtype=torch.long), r"\[batch, seq\]"),
        (torch.zeros(1, 4), "integer"),
        (torch.zeros(1, 4, dtype=torch.bool), "integer"),
        (torch.tensor([[0, -3, 1]]), "-3"),
    ],
)
def test_validate_segment_ids_rejects(segment_ids, match):
    with pytest.raises(ValueError, match=match):
        validate_segment_ids(segment_ids)
    with pytest.raises(ValueError, match=match):
        mas_mask_mod(segment_ids)


def test_validate_segment_ids_rejects_document_shape():
    with pytest.raises(ValueError, match="document_ids shape"):
        validate_segment_ids(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long))


def test_validate_segment_ids_accepts_convention():
    validate_segment_ids(torch.tensor([[PAD, CAUSAL, 0, 7]], dtype=torch.int32))
    validate_segment_ids(torch.zeros(0, 0, dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# The whole rule.
# ---------------------------------------------------------------------------------------------


def test_docstring_example():
    segment_ids = torch.tensor([[0, 0, 1, 1, 1, CAUSAL, CAUSAL]])
    expected = [
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1, 1],
    ]
    assert dense_mas_mask(segment_ids)[0].int().tolist() == expected


def test_padding_keys_masked_and_padding_queries_causal():
    segment_ids = torch.tensor([[PAD, 0, 0, CAUSAL, PAD]])
    mask = dense_mas_mask(segment_ids)[0]
    assert not mask[:, 0].any() and not mask[:, 4].any()
    assert not mask[0].any()  # left padding: nothing earlier to attend
    assert mask[4].tolist() == [False, True, True, True, False]  # right padding: causal


def test_packed_documents_do_not_mix():
    segment_ids = torch.tensor([[0, 0, CAUSAL, 1, 1, CAUSAL]])
    document_ids = torch.tensor([[0, 0, 0, 1, 1, 1]])
    mask = dense_mas_mask(segment_ids, document_ids)[0]
    assert not mask[3:, :3].any() and not mask[:3, 3:].any()
    assert mask[3, 4]  # bidirectional inside document 1's prompt


def test_eq14_references_agree():
    """The numpy reference used by the property tests equals the pair-by-pair loops."""
    rng = random.Random(0)
    for _ in range(50):
        seq_len = rng.randint(1, 24)
        segments = [rng.randint(PAD_ID, 3) for _ in range(seq_len)]
        documents = [rng.randint(0, 1) for _ in range(seq_len)]
        query_start = rng.randint(0, seq_len - 1)
        query_len = rng.randint(1, seq_len - query_start)
        layout = Layout(np.array([segments]), np.array([documents]), query_start, query_len)
        loops = eq14_allowed_loops(segments, documents, query_start, query_len)
        assert eq14_allowed(layout)[0].tolist() == loops


@settings(max_examples=100, deadline=None)
@given(layouts(contiguous=True) | layouts(contiguous=False))
def test_dense_mas_mask_equals_eq14(layout):
    segment_ids, document_ids = layout.torch_ids()
    dense = dense_mas_mask(
        segment_ids, document_ids, query_start=layout.query_start, query_len=layout.query_len
    )
    assert dense.shape == (segment_ids.shape[0], layout.query_len, layout.seq_len)
    np.testing.assert_array_equal(dense.numpy(), eq14_allowed(layout))


def test_dense_mas_mask_default_query_len_covers_the_rest():
    segment_ids = torch.tensor([[0, 0, 1, CAUSAL, CAUSAL]])
    assert dense_mas_mask(segment_ids, query_start=2).shape == (1, 3, 5)


# ---------------------------------------------------------------------------------------------
# The attention mode: as_causal and its validation.
# ---------------------------------------------------------------------------------------------


def test_as_causal_keeps_padding_and_drops_segments():
    seg = torch.tensor([[0, 0, 1, CAUSAL, PAD]])
    assert as_causal(seg).tolist() == [[CAUSAL, CAUSAL, CAUSAL, CAUSAL, PAD]]


def test_validate_attention_mode_names_the_key_in_one_line():
    assert validate_attention_mode("mas") == "mas"
    assert validate_attention_mode("causal") == "causal"
    with pytest.raises(ConfigError, match=r"^attention must be 'mas' or 'causal', got 'both'$"):
        validate_attention_mode("both")
    with pytest.raises(ConfigError, match=r"^generation.attention must be"):
        validate_attention_mode(None, key="generation.attention")
