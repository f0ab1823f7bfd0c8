"""Tests for mas/attention.py: the dispatch and the patched tiny torchtune Llama 3.2.

Every path must compute the same thing: dense bool mask (SDPA), BlockMask on CPU (dense SDPA
twin), BlockMask with ``backend="flex"`` (compiled FlexAttention forward), and, for an
all-causal layout, the unpatched model with ``mask=None``.
"""

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.attention.flex_attention import BlockMask

from mas.attention import MASAttention, block_mask_to_dense, build_attention_mask, use_mas_attention, uses_flex
from mas.block_mask import create_mas_block_mask
from mas.errors import ConfigError
from mas.masks import dense_mas_mask
from mas.models import TINY_LLAMA3_2, tiny_llama3_2

from support.masks import CAUSAL_ID, PAD_ID, block_mask_token_view, eq14_allowed, layouts, reference_attention

SEQ_LEN = 150  # two 128-token blocks, the second partly filled
VOCAB = TINY_LLAMA3_2["vocab_size"]


def _segment_ids(seq_len: int = SEQ_LEN) -> torch.Tensor:
    """``[2, seq_len]``: a left-padded prompt + answer, and a two-turn row with a padding tail."""
    left_padded = [PAD_ID] * 20 + [0] * 10 + [1] * 50 + [CAUSAL_ID] * (seq_len - 80)
    two_turns = [0] * 30 + [CAUSAL_ID] * 20 + [1] * 60 + [CAUSAL_ID] * 25
    two_turns += [PAD_ID] * (seq_len - len(two_turns))
    return torch.tensor([left_padded, two_turns])


def _tiny_model(seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = tiny_llama3_2()
    return model.eval()


def _tokens(batch_size: int, seq_len: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch_size, seq_len), generator=generator)


# ---------------------------------------------------------------------------------------------
# MASAttention alone.
# ---------------------------------------------------------------------------------------------


def _qkv(batch_size=2, heads=3, q_len=SEQ_LEN, kv_len=SEQ_LEN, head_dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch_size, heads, q_len, head_dim, generator=generator)
    k = torch.randn(batch_size, heads, kv_len, head_dim, generator=generator)
    v = torch.randn(batch_size, heads, kv_len, head_dim, generator=generator)
    return q, k, v


def test_backend_must_be_known():
    with pytest.raises(ValueError, match="auto, flex or sdpa"):
        MASAttention("xla")


@pytest.mark.parametrize("backend", ["auto", "sdpa"])
def test_dense_and_block_mask_paths_equal_reference(backend):
    segment_ids = _segment_ids()
    allowed = dense_mas_mask(segment_ids)
    q, k, v = _qkv()
    attention = MASAttention(backend)
    out_dense = attention(q, k, v, mask=allowed, dropout_p=0.0, is_causal=False)
    out_block = attention(
        q, k, v, mask=create_mas_block_mask(segment_ids), dropout_p=0.0, is_causal=False
    )
    expected = reference_attention(q.double(), k.double(), v.double(), allowed).float()
    assert not out_dense.isnan().any()
    torch.testing.assert_close(out_dense, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_block, expected, atol=1e-5, rtol=1e-5)
    # Left-padding queries attend nothing: zero output, as FlexAttention gives.
    assert (out_dense[0, :, :20] == 0).all() and (out_block[0, :, :20] == 0).all()


def test_no_mask_is_causal_sdpa():
    q, k, v = _qkv()
    out = MASAttention()(q, k, v, mask=None, dropout_p=0.0, is_causal=True)
    causal = torch.ones(SEQ_LEN, SEQ_LEN, dtype=torch.bool).tril().expand(2, -1, -1)
    torch.testing.assert_close(out, reference_attention(q, k, v, causal), atol=1e-5, rtol=1e-5)


def test_block_mask_to_dense_equals_dense_mas_mask():
    segment_ids = _segment_ids()
    dense = block_mask_to_dense(create_mas_block_mask(segment_ids, query_start=40))
    assert torch.equal(dense, dense_mas_mask(segment_ids, query_start=40))


def test_kv_cache_longer_than_mask_equals_slicing():
    """Keys past the mask's kv length are unwritten cache slots: the result must equal
    attention over the sliced keys, whatever the slots hold."""
    segment_ids = _segment_ids()
    q_len, kv_len, cache_len = 30, SEQ_LEN, SEQ_LEN + 50
    q, k, v = _qkv(q_len=q_len, kv_len=cache_len)
    k[:, :, kv_len:], v[:, :, kv_len:] = 1e4, 1e4  # garbage in the unwritten tail
    attention = MASAttention()
    query_start = kv_len - q_len
    for mask in (
        dense_mas_mask(segment_ids, query_start=query_start),
        create_mas_block_mask(segment_ids, query_start=query_start),
    ):
        got = attention(q, k, v, mask=mask, dropout_p=0.0, is_causal=False)
        want = attention(
            q, k[:, :, :kv_len], v[:, :, :kv_len], mask=mask, dropout_p=0.0, is_causal=False
        )
        torch.testing.assert_close(got, want, atol=0, rtol=0)
        assert got.abs().max() < 100


def test_flex_backend_refuses_cpu_training():
    q, k, v = _qkv()
    q.requires_grad_()
    block_mask = create_mas_block_mask(_segment_ids())
    with pytest.raises(RuntimeError, match="cannot train on CPU"):
        MASAttention("flex")(q, k, v, mask=block_mask, dropout_p=0.0, is_causal=False)


def test_flex_backend_refuses_dropout():
    q, k, v = _qkv()
    block_mask = create_mas_block_mask(_segment_ids())
    with pytest.raises(ValueError, match="dropout"):
        MASAttention("flex")(q, k, v, mask=block_mask, dropout_p=0.1, is_causal=False)


# ---------------------------------------------------------------------------------------------
# The tiny torchtune model.
# ---------------------------------------------------------------------------------------------


def test_use_mas_attention_patches_every_attention_layer():
    from torchtune.modules import MultiHeadAttention

    model = _tiny_model()
    keys_before = set(model.state_dict())
    assert use_mas_attention(model, backend="sdpa") is model
    layers = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    assert len(layers) == TINY_LLAMA3_2["num_layers"]
    assert all(isinstance(layer._attention_call, MASAttention) for layer in layers)
    assert set(model.state_dict()) == keys_before


def test_use_mas_attention_rejects_other_models():
    with pytest.raises(ValueError, match="no torchtune MultiHeadAttention"):
        use_mas_attention(nn.Linear(4, 4))


@torch.no_grad()
def test_model_block_mask_equals_dense_mask():
    model = use_mas_attention(_tiny_model())
    segment_ids = _segment_ids()
    tokens = _tokens(*segment_ids.shape)
    logits_dense = model(tokens, mask=dense_mas_mask(segment_ids))
    logits_block = model(tokens, mask=create_mas_block_mask(segment_ids))
    assert torch.isfinite(logits_dense).all()
    torch.testing.assert_close(logits_block, logits_dense, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_model_all_causal_equals_unpatched_causal_model():
    model = _tiny_model()
    tokens = _tokens(2, SEQ_LEN)
    expected = model(tokens)  # torchtune's own causal SDPA
    use_mas_attention(model)
    all_causal = torch.full((2, SEQ_LEN), CAUSAL_ID)
    torch.testing.assert_close(
        model(tokens, mask=dense_mas_mask(all_causal)), expected, atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        model(tokens, mask=create_mas_block_mask(all_causal)), expected, atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(model(tokens), expected, atol=0, rtol=0)


def test_model_gradients_flow_with_block_mask_on_cpu():
    segment_ids = _segment_ids()
    tokens = _tokens(*segment_ids.shape)

    def grads(mask):
        model = use_mas_attention(_tiny_model()).train()
        model(tokens, mask=mask).logsumexp(-1).mean().backward()
        return {name: p.grad for name, p in model.named_parameters()}

    grads_block = grads(create_mas_block_mask(segment_ids))
    grads_dense = grads(dense_mas_mask(segment_ids))
    for name, grad in grads_block.items():
        assert grad is not None and torch.isfinite(grad).all(), name
        torch.testing.assert_close(grad, grads_dense[name], atol=1e-5, rtol=1e-4, msg=name)
    assert grads_block["layers.0.attn.q_proj.weight"].abs().sum() > 0


def test_model_flex_backend_refuses_cpu_training():
    model = use_mas_attention(_tiny_model(), backend="flex")
    segment_ids = _segment_ids()
    with pytest.raises(RuntimeError, match="cannot train on CPU"):
        model(_tokens(*segment_ids.shape), mask=create_mas_block_mask(segment_ids))


@pytest.mark.slow
@torch.no_grad()
def test_model_flex_backend_cpu_inference_equals_dense():
    model = use_mas_attention(_tiny_model(), backend="flex")
    segment_ids = _segment_ids()
    tokens = _tokens(*segment_ids.shape)
    logits_flex = model(tokens, mask=create_mas_block_mask(segment_ids))
    logits_dense = model(tokens, mask=dense_mas_mask(segment_ids))
    torch.testing.assert_close(logits_flex, logits_dense, atol=1e-4, rtol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("mask_kind", ["dense", "block"])
def test_model_kv_cache_prefill_and_decode_equal_full_forward(mask_kind):
    """Prefill into a longer cache, then decode one token: the cache's unwritten tail is never
    attended, so both steps equal a cache-free forward over the whole sequence."""
    seq_len, cache_len = 100, 160
    prompt = [0] * 12 + [1] * 40 + [CAUSAL_ID] * (seq_len - 52)
    segment_ids = torch.tensor([prompt, [PAD_ID] * 30 + prompt[: seq_len - 30]])
    decoded_ids = torch.cat([segment_ids, torch.full((2, 1), CAUSAL_ID)], dim=1)
    tokens = _tokens(2, seq_len + 1)

    def mask(ids, query_start=0):
        if mask_kind == "dense":
            return dense_mas_mask(ids, query_start=query_start)
        return create_mas_block_mask(ids, query_start=query_start)

    model = use_mas_attention(_tiny_model())
    full = model(tokens, mask=dense_mas_mask(decoded_ids))

    model.setup_caches(batch_size=2, dtype=torch.float32, decoder_max_seq_len=cache_len)
    positions = torch.arange(seq_len + 1).expand(2, -1)
    prefill = model(tokens[:, :seq_len], mask=mask(segment_ids), input_pos=positions[:, :seq_len])
    decode = model(
        tokens[:, seq_len:],
        mask=mask(decoded_ids, query_start=seq_len),
        input_pos=positions[:, seq_len:],
    )
    torch.testing.assert_close(prefill, full[:, :seq_len], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(decode, full[:, seq_len:], atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_model_flex_on_cuda_equals_dense_forward_and_backward():
    """On CUDA ``backend="auto"`` runs compiled FlexAttention forward and backward: logits and
    every parameter gradient equal the dense-mask SDPA path."""
    device = torch.device("cuda")
    segment_ids = _segment_ids().to(device)
    tokens = _tokens(*segment_ids.shape).to(device)

    def run(backend, mask):
        model = use_mas_attention(_tiny_model().to(device).train(), backend=backend)
        logits = model(tokens, mask=mask)
        logits.logsumexp(-1).mean().backward()
        return logits, {name: p.grad for name, p in model.named_parameters()}

    logits_flex, grads_flex = run("auto", create_mas_block_mask(segment_ids))
    logits_dense, grads_dense = run("sdpa", dense_mas_mask(segment_ids))
    torch.testing.assert_close(logits_flex, logits_dense, atol=1e-4, rtol=1e-4)
    for name, grad in grads_flex.items():
        torch.testing.assert_close(grad, grads_dense[name], atol=1e-4, rtol=1e-3, msg=name)


# ---------------------------------------------------------------------------------------------
# build_attention_mask: the one entry point, against the Eq. 14 twin.
# ---------------------------------------------------------------------------------------------


def _eq14_for(layout, attention: str) -> np.ndarray:
    """Eq. 14 for ``attention="mas"``; for ``"causal"`` the same rule on the layout with every
    prompt segment made causal (written here from the convention, not with ``mas.as_causal``)."""
    if attention == "causal":
        causal_ids = np.where(layout.segment_ids >= 0, CAUSAL_ID, layout.segment_ids)
        layout = dataclasses.replace(layout, segment_ids=causal_ids)
    return eq14_allowed(layout)


@settings(max_examples=60, deadline=None)
@given(layout=layouts(contiguous=True) | layouts(contiguous=False), attention=st.sampled_from(["mas", "causal"]))
def test_build_attention_mask_dense_equals_eq14(layout, attention):
    """CPU (``auto``) and ``sdpa`` give the dense mask of Eq. 14, documents and windows included."""
    segment_ids, document_ids = layout.torch_ids()
    expected = _eq14_for(layout, attention)
    for backend in ("auto", "sdpa"):
        mask = build_attention_mask(
            segment_ids,
            document_ids,
            attention=attention,
            backend=backend,
            query_start=layout.query_start,
            query_len=layout.query_len,
        )
        assert isinstance(mask, torch.Tensor) and mask.dtype == torch.bool
        np.testing.assert_array_equal(mask.numpy(), expected)


@settings(max_examples=30, deadline=None)
@given(layout=layouts(max_len=300), attention=st.sampled_from(["mas", "causal"]))
def test_build_attention_mask_block_mask_equals_eq14(layout, attention):
    """``backend="flex"`` gives a BlockMask; what FlexAttention computes with it is Eq. 14."""
    segment_ids, document_ids = layout.torch_ids()
    block_mask = build_attention_mask(
        segment_ids,
        document_ids,
        attention=attention,
        backend="flex",
        query_start=layout.query_start,
        query_len=layout.query_len,
    )
    assert isinstance(block_mask, BlockMask)
    assert block_mask.seq_lengths == (layout.query_len, layout.seq_len)
    np.testing.assert_array_equal(block_mask_token_view(block_mask), _eq14_for(layout, attention))


def test_build_attention_mask_causal_mode_on_a_drawn_layout():
    """The docstring's picture: MAS vs the causal baseline on one small layout."""
    segment_ids = torch.tensor([[0, 0, 1, 1, CAUSAL_ID, PAD_ID]])
    mas_rows = [[1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0]]
    causal_rows = [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0]]
    assert build_attention_mask(segment_ids, attention="mas")[0].int().tolist() == mas_rows
    assert build_attention_mask(segment_ids, attention="causal")[0].int().tolist() == causal_rows
    window = build_attention_mask(segment_ids, attention="mas", query_start=2, query_len=2)
    assert window[0].int().tolist() == mas_rows[2:4]


def test_build_attention_mask_rejects_unknown_mode_and_backend():
    segment_ids = torch.tensor([[0, CAUSAL_ID]])
    with pytest.raises(ConfigError, match=r"^attention must be 'mas' or 'causal', got 'bidirectional'$"):
        build_attention_mask(segment_ids, attention="bidirectional")
    with pytest.raises(ConfigError, match=r"^attention_backend must be auto, flex or sdpa, got 'xla'$"):
        build_attention_mask(segment_ids, attention="mas", backend="xla")


def test_mask_form_and_kernel_choice_agree():
    """The mask builder and MASAttention ask the same question (uses_flex)."""
    cpu = torch.device("cpu")
    assert [uses_flex(b, cpu) for b in ("auto", "flex", "sdpa")] == [False, True, False]
    for backend in ("auto", "flex", "sdpa"):
        mask = build_attention_mask(_segment_ids(), attention="mas", backend=backend)
        assert isinstance(mask, BlockMask) == uses_flex(backend, cpu)
        q, k, v = _qkv()
        assert MASAttention(backend)._use_flex(q, k, v) == uses_flex(backend, cpu)


def test_prepare_batch_mask_is_the_entry_points_mask():
    """Training asks build_attention_mask: same mask for both modes, with packed documents."""
    from mas.training import prepare_batch

    segment_ids = _segment_ids()
    document_ids = torch.zeros_like(segment_ids)
    document_ids[:, 60:] = 1
    batch = {
        "tokens": _tokens(*segment_ids.shape),
        "labels": _tokens(*segment_ids.shape, seed=2),
        "segment_ids": segment_ids,
        "document_ids": document_ids,
    }
    for attention in ("mas", "causal"):
        prepared = prepare_batch(batch, attention=attention, device=torch.device("cpu"))
        expected = build_attention_mask(segment_ids, document_ids, attention=attention)
        assert torch.equal(prepared.mask, expected)
    with pytest.raises(ConfigError, match="attention must be 'mas' or 'causal'"):
        prepare_batch(batch, attention="both", device=torch.device("cpu"))
