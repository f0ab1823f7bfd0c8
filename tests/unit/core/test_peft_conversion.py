"""Tests for the PEFT adapter conversion in mas/checkpointing.py: names, row permutation, config.

torchtune and Hugging Face order the rotary dimensions of q/k projections differently for Llama
and Mistral (interleaved pairs vs two halves per head), so a LoRA ``B`` matrix of ``q_proj`` or
``k_proj`` is permuted on export to PEFT and un-permuted on import; Qwen2 checkpoints share
torchtune's order and are never permuted. The end-to-end family tests (tests/integration) load
the result with PEFT; these check each piece alone, on small hand-checked examples, and against
torchtune's own converter of base weights as an independent reference.
"""

from __future__ import annotations

from typing import Dict

import pytest
import torch
from torchtune.models.convert_weights import tune_to_hf

from mas.checkpointing import (
    HFModelInfo,
    _permute_rows,
    _unpermute_rows,
    adapter_to_peft,
    peft_adapter_config,
    peft_target_modules,
    peft_to_adapter,
)
from mas.testing import TINY_FAMILIES

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, RANK = 4, 2, 6, 3
DIM = NUM_HEADS * HEAD_DIM
HIDDEN = 10
PERMUTED_FAMILIES = {"llama3", "llama3_2", "mistral"}

#: torchtune module -> PEFT module, for layer 1 (what adapter_config.json's reader expects).
EXPECTED_PEFT_MODULES = {
    "layers.1.attn.q_proj": "base_model.model.model.layers.1.self_attn.q_proj",
    "layers.1.attn.k_proj": "base_model.model.model.layers.1.self_attn.k_proj",
    "layers.1.attn.v_proj": "base_model.model.model.layers.1.self_attn.v_proj",
    "layers.1.attn.output_proj": "base_model.model.model.layers.1.self_attn.o_proj",
    "layers.1.mlp.w1": "base_model.model.model.layers.1.mlp.gate_proj",
    "layers.1.mlp.w2": "base_model.model.model.layers.1.mlp.down_proj",
    "layers.1.mlp.w3": "base_model.model.model.layers.1.mlp.up_proj",
    "output": "base_model.model.lm_head",
}


def _info(model_type: str, tie_word_embeddings: bool = False) -> HFModelInfo:
    return HFModelInfo(
        model_type=model_type,
        num_heads=NUM_HEADS,
        num_kv_heads=NUM_KV_HEADS,
        dim=DIM,
        head_dim=HEAD_DIM,
        tie_word_embeddings=tie_word_embeddings,
        hf_config={},
    )


def _out_features(module: str) -> int:
    if module.endswith("k_proj") or module.endswith("v_proj"):
        return NUM_KV_HEADS * HEAD_DIM
    if module.endswith("w1") or module.endswith("w3"):
        return HIDDEN
    if module == "output":
        return 50
    return DIM


def _in_features(module: str) -> int:
    return HIDDEN if module.endswith("w2") else DIM


def _adapter_state(seed: int = 0) -> Dict[str, torch.Tensor]:
    """Random LoRA weights of every adaptable module of layer 1 (A: ``[r, in]``, B: ``[out, r]``)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for module in EXPECTED_PEFT_MODULES:
        state[f"{module}.lora_a.weight"] = torch.randn(RANK, _in_features(module), generator=generator)
        state[f"{module}.lora_b.weight"] = torch.randn(_out_features(module), RANK, generator=generator)
    return state


# ------------------------------------------------------------------------------- row permutation
def test_permute_rows_by_hand_two_heads_head_dim_4():
    """Per head, torchtune's interleaved pairs (x0 y0 x1 y1) become HF's halves (x0 x1 y0 y1)."""
    rows = torch.arange(8.0)[:, None]  # [n_heads * head_dim, r=1]: row i holds the value i
    assert _permute_rows(rows, n_heads=2, head_dim=4).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_permute_and_unpermute_by_hand_one_head_head_dim_6():
    """With 3 pairs the two directions differ (for head_dim 4 the permutation is its own inverse)."""
    rows = torch.arange(6.0)[:, None]
    assert _permute_rows(rows, n_heads=1, head_dim=6).flatten().tolist() == [0, 2, 4, 1, 3, 5]
    assert _unpermute_rows(rows, n_heads=1, head_dim=6).flatten().tolist() == [0, 3, 1, 4, 2, 5]


@pytest.mark.parametrize("n_heads, head_dim, rank", [(1, 2, 1), (2, 4, 3), (4, 6, 2), (8, 64, 16)])
def test_permute_rows_round_trips(n_heads, head_dim, rank):
    t = torch.randn(n_heads * head_dim, rank)
    assert torch.equal(_unpermute_rows(_permute_rows(t, n_heads, head_dim), n_heads, head_dim), t)
    assert torch.equal(_permute_rows(_unpermute_rows(t, n_heads, head_dim), n_heads, head_dim), t)
    moved = _permute_rows(t, n_heads, head_dim)
    assert not torch.equal(moved, t) or head_dim == 2  # head_dim 2 has one pair: nothing moves
    # Rows never leave their head.
    for head in range(n_heads):
        rows = slice(head * head_dim, (head + 1) * head_dim)
        assert sorted(moved[rows, 0].tolist()) == sorted(t[rows, 0].tolist())


@pytest.mark.parametrize("projection, heads", [("q_proj", NUM_HEADS), ("k_proj", NUM_KV_HEADS)])
def test_permuted_lora_delta_matches_torchtunes_conversion_of_the_merged_weight(projection, heads):
    """HF(W + B A) == HF(W) + permute(B) A: the exported adapter applies to the HF base weights
    exactly as the torchtune adapter applies to torchtune's (reference: torchtune's tune_to_hf)."""
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(heads * HEAD_DIM, DIM, generator=generator)
    lora_a = torch.randn(RANK, DIM, generator=generator)
    lora_b = torch.randn(heads * HEAD_DIM, RANK, generator=generator)
    key = f"layers.0.attn.{projection}.weight"
    hf_key = f"model.layers.0.self_attn.{projection}.weight"

    def to_hf(weight: torch.Tensor) -> torch.Tensor:
        return tune_to_hf({key: weight}, num_heads=NUM_HEADS, num_kv_heads=NUM_KV_HEADS, dim=DIM)[hf_key]

    merged_then_converted = to_hf(base + lora_b @ lora_a)
    converted_then_merged = to_hf(base) + _permute_rows(lora_b, heads, HEAD_DIM) @ lora_a
    torch.testing.assert_close(merged_then_converted, converted_then_merged)


# ---------------------------------------------------------------------------------- name mapping
def test_adapter_to_peft_names_every_attention_and_mlp_module():
    peft = adapter_to_peft(_adapter_state(), _info("LLAMA3"))
    expected = {f"{EXPECTED_PEFT_MODULES[m]}.lora_{ab}.weight" for m in EXPECTED_PEFT_MODULES for ab in "AB"}
    assert set(peft) == expected


def test_peft_to_adapter_rejects_unknown_modules_and_keys():
    info = _info("QWEN2")
    with pytest.raises(ValueError, match="unexpected PEFT adapter module 'self_attn.rotary'"):
        peft_to_adapter({"base_model.model.model.layers.0.self_attn.rotary.lora_A.weight": torch.zeros(1, 1)}, info)
    with pytest.raises(ValueError, match="unexpected PEFT adapter key"):
        peft_to_adapter({"base_model.model.encoder.lora_A.weight": torch.zeros(1, 1)}, info)
    with pytest.raises(ValueError, match="not a LoRA weight"):
        adapter_to_peft({"layers.0.attn.q_proj.weight": torch.zeros(1, 1)}, info)
    with pytest.raises(ValueError, match="cannot map LoRA module 'layers.0.attn.pos_embeddings'"):
        adapter_to_peft({"layers.0.attn.pos_embeddings.lora_a.weight": torch.zeros(1, 1)}, info)


def test_peft_to_adapter_names_an_adapter_for_another_base_model():
    """A q_proj B matrix with the wrong row count is refused, naming the key and both sizes."""
    peft = {"base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(DIM + HEAD_DIM, RANK)}
    with pytest.raises(ValueError, match=rf"q_proj.lora_B.weight has {DIM + HEAD_DIM} rows.*has {DIM}"):
        peft_to_adapter(peft, _info("LLAMA3_2"))


# ------------------------------------------------------------------------ each family's layout
@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_round_trip_and_which_matrices_are_permuted(family):
    spec = TINY_FAMILIES[family]
    info = _info(spec.model_type, spec.tie_word_embeddings)
    assert info.permutes_qk == (family in PERMUTED_FAMILIES)
    state = _adapter_state()
    peft = adapter_to_peft(state, info)

    back = peft_to_adapter(peft, info)
    assert back.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(back[key], value), key

    for module, peft_module in EXPECTED_PEFT_MODULES.items():
        a, b = state[f"{module}.lora_a.weight"], state[f"{module}.lora_b.weight"]
        peft_a, peft_b = peft[f"{peft_module}.lora_A.weight"], peft[f"{peft_module}.lora_B.weight"]
        assert torch.equal(peft_a, a), f"{module}: A is never permuted"
        heads = {"attn.q_proj": NUM_HEADS, "attn.k_proj": NUM_KV_HEADS}.get(module.partition(".")[2].partition(".")[2])
        if heads is not None and info.permutes_qk:
            assert torch.equal(peft_b, _permute_rows(b, heads, HEAD_DIM)), f"{family} {module}: B permuted"
            assert not torch.equal(peft_b, b)
        else:
            assert torch.equal(peft_b, b), f"{family} {module}: B kept as is"


# ---------------------------------------------------------------------------- adapter_config.json
@pytest.mark.parametrize(
    "attn, mlp, output, expected",
    [
        (["q_proj", "v_proj"], False, False, ["q_proj", "v_proj"]),
        (["q_proj", "k_proj", "v_proj"], True, False, ["q_proj", "k_proj", "v_proj", "gate_proj", "down_proj", "up_proj"]),
        (["output_proj"], False, True, ["o_proj", "lm_head"]),
    ],
)
def test_peft_target_modules(attn, mlp, output, expected):
    assert peft_target_modules(attn, mlp, output) == expected


def test_peft_adapter_config_carries_the_lora_settings_and_mas_metadata():
    config = peft_adapter_config(
        lora_rank=32,
        lora_alpha=64,
        lora_dropout=0.05,
        lora_attn_modules=["q_proj", "v_proj"],
        apply_lora_to_mlp=False,
        apply_lora_to_output=False,
        use_dora=False,
        mas={"attention": "mas"},
        base_model_name_or_path="meta-llama/Llama-3.2-1B",
    )
    assert config == {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": 32,
        "lora_alpha": 64,
        "lora_dropout": 0.05,
        "target_modules": ["q_proj", "v_proj"],
        "use_dora": False,
        "bias": "none",
        "base_model_name_or_path": "meta-llama/Llama-3.2-1B",
        "mas": {"attention": "mas"},
    }
