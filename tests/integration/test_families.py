"""Every model family end to end on a tiny random model in its Hugging Face layout.

For each family (Llama 3, Llama 3.2, Qwen2 tied and untied, Mistral) a tiny checkpoint written by
:mod:`mas.testing` goes through torchtune's ``FullModelHFCheckpointer``, the fine-tuning recipe
trains two MAS steps on CPU and saves; then:

* the PEFT adapter reloads to exactly the trained weights;
* the PEFT adapter applied to the HF base weights gives the merged HF weights (this checks the
  per-family q/k permutation of LoRA ``B``, which Qwen2 must not get);
* the merged HF weights, loaded back into the plain model, give the LoRA model's logits;
* FlexAttention with the MAS BlockMask gives the dense-mask SDPA logits.

A QLoRA run (NF4 base weights) on a slightly wider tiny Llama 3.2 checks loading, training,
the adapter and the dequantized merged weights.

Generation tests can reuse :func:`family_model_and_tokenizer` (trained LoRA model + tokenizer
of each family).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from mas.checkpointing import (
    HFModelInfo,
    latest_checkpoint,
    load_peft_adapter,
    peft_to_adapter,
)
from mas.config import load_config, to_options
from mas.training.options import FinetuneOptions
from mas.testing import TINY_FAMILIES, TinyCheckpoint, write_tiny_checkpoint
from mas.training import read_metrics

import mas_lora_finetune  # noqa: E402  (installed top-level recipe module)

FAMILIES = ["llama3", "llama3_2", "qwen2_tied", "qwen2_untied", "mistral"]
# One padded length for every family: compiled flex attention on CPU costs seconds per shape.
SEQ_LEN = 256
# All seven projections: every PEFT name mapping and both permuted (q, k) matrices are used.
LORA_ATTN = ["q_proj", "k_proj", "v_proj", "output_proj"]
LORA_RANK, LORA_ALPHA = 8, 16
ATOL = 1e-4


@dataclass
class FamilyRun:
    ckpt: TinyCheckpoint
    recipe: Any
    output_dir: Path

    @property
    def info(self) -> HFModelInfo:
        return self.recipe.hf_info


def _run_recipe(
    ckpt: TinyCheckpoint,
    out: Path,
    *,
    extra: List[str] = (),
    lora_attn: List[str] = LORA_ATTN,
    mlp: bool = True,
    **model_kwargs: Any,
):
    overrides = [
        f"output_dir={out}",
        "epochs=1",
        "max_steps_per_epoch=2",
        "batch_size=2",
        'dataset.rows="0:16"',
        'val_dataset.rows="16:20"',
        "optimizer.lr=1e-2",  # adapters far enough from zero that a layout mistake shows
        "save_every_n_steps=None",
        "val_every_n_steps=None",
        "save_merged_weights=True",
        "progress_bar=False",
        *extra,
    ]
    cfg = load_config("tiny_mas", overrides)
    cfg.model = OmegaConf.create(
        ckpt.lora_model_node(lora_attn, apply_lora_to_mlp=mlp, lora_rank=LORA_RANK, lora_alpha=LORA_ALPHA,
                             lora_dropout=0.05, **model_kwargs)
    )  # fmt: skip
    cfg.tokenizer = OmegaConf.create(ckpt.tokenizer_node(max_seq_len=SEQ_LEN))
    cfg.checkpointer = OmegaConf.create(ckpt.checkpointer_node(str(out)))
    to_options(cfg, FinetuneOptions, "mas_lora_finetune")
    recipe = mas_lora_finetune.MASLoRAFinetuneRecipe(cfg)
    recipe.setup()
    recipe.train()
    recipe.cleanup()
    return recipe


@pytest.fixture(scope="module", params=FAMILIES)
def family_run(request, tmp_path_factory) -> FamilyRun:
    root = tmp_path_factory.mktemp(request.param)
    ckpt = write_tiny_checkpoint(request.param, root / "base")
    return FamilyRun(ckpt, _run_recipe(ckpt, root / "run"), root / "run")


@pytest.fixture(scope="module")
def family_model_and_tokenizer(family_run):
    """(trained LoRA model, tokenizer) of each family: the hook for generation tests."""
    return family_run.recipe.model, family_run.recipe.tokenizer


def _logits(model: torch.nn.Module, tokens: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    out = model(tokens, **kwargs)
    return torch.cat(out, dim=1) if isinstance(out, list) else out  # chunked output -> [b, s, v]


def _hf_checkpointer(checkpoint_dir: Path, model_type: str, output_dir: Path):
    from torchtune.training import FullModelHFCheckpointer

    return FullModelHFCheckpointer(
        checkpoint_dir=str(checkpoint_dir),
        checkpoint_files=["model.safetensors"],
        model_type=model_type,
        output_dir=str(output_dir),
    )


def _batch(run: FamilyRun) -> Dict[str, torch.Tensor]:
    from mas.data import collate_segmented, pad_token_id

    items = [run.recipe.dataset[i] for i in range(2)]
    batch = collate_segmented(items, pad_id=pad_token_id(run.recipe.tokenizer), pad_to_multiple_of=SEQ_LEN)
    assert batch["tokens"].shape == (2, SEQ_LEN)
    return batch


def _trained_adapter(run: FamilyRun) -> Dict[str, torch.Tensor]:
    from torchtune.modules.peft import get_adapter_params

    return {k: v.detach().cpu().clone() for k, v in get_adapter_params(run.recipe.model).items()}


# ------------------------------------------------------------------------------------------ tests
def test_tiny_checkpoint_has_its_familys_hf_layout(family_run, tmp_path):
    ckpt = family_run.ckpt
    hf = load_file(str(ckpt.checkpoint_dir / "model.safetensors"))
    assert ("lm_head.weight" in hf) == (not ckpt.family.tie_word_embeddings)
    has_bias = "model.layers.0.self_attn.q_proj.bias" in hf
    assert has_bias == (ckpt.family.model_type == "QWEN2")
    state = _hf_checkpointer(ckpt.checkpoint_dir, ckpt.family.model_type, tmp_path).load_checkpoint()["model"]
    model = ckpt.build_model()
    model.load_state_dict(state, strict=True)
    assert family_run.info.model_type == ckpt.family.model_type
    assert family_run.info.tie_word_embeddings == ckpt.family.tie_word_embeddings


def test_recipe_trains_and_saves(family_run):
    train = read_metrics(family_run.output_dir / "metrics.jsonl")
    assert [r["step"] for r in train] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    folder = latest_checkpoint(family_run.output_dir)
    assert folder is not None and (folder / "merged" / "model.safetensors").exists()
    _, config = load_peft_adapter(folder)
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]
    )
    assert config["r"] == LORA_RANK and config["mas"]["attention"] == "mas"


def test_peft_adapter_reloads_exactly(family_run):
    peft, _ = load_peft_adapter(latest_checkpoint(family_run.output_dir))
    reloaded = peft_to_adapter(peft, family_run.info)
    trained = _trained_adapter(family_run)
    assert set(reloaded) == set(trained)
    for key, value in trained.items():
        assert torch.equal(reloaded[key], value), key
    assert any(v.abs().max() > 1e-3 for k, v in trained.items() if "lora_b" in k), "adapters did not train"


def test_peft_adapter_on_hf_base_weights_gives_merged_weights(family_run):
    """Per-family layout: HF base + scale * B_peft @ A_peft == merged HF weights."""
    from torchtune.models.convert_weights import tune_to_peft_adapter_weights

    folder = latest_checkpoint(family_run.output_dir)
    base = load_file(str(family_run.ckpt.checkpoint_dir / "model.safetensors"))
    merged = load_file(str(folder / "merged" / "model.safetensors"))
    peft, _ = load_peft_adapter(folder)
    assert set(base) == set(merged)
    scale = LORA_ALPHA / LORA_RANK

    def merged_with(adapter: Dict[str, torch.Tensor], key: str) -> torch.Tensor:
        module = key[: -len(".weight")]
        a, b = adapter[f"base_model.model.{module}.lora_A.weight"], adapter[f"base_model.model.{module}.lora_B.weight"]
        return base[key] + scale * b @ a

    adapted = {k[len("base_model.model.") : -len(".lora_A.weight")] + ".weight" for k in peft if ".lora_A." in k}
    assert len(adapted) == 7 * family_run.ckpt.dims["num_layers"]
    for key in base:
        if key in adapted:
            torch.testing.assert_close(merged_with(peft, key), merged[key], atol=1e-5, rtol=1e-5, msg=key)
        else:
            assert torch.equal(base[key], merged[key]), key

    # torchtune 0.6.1's own PEFT export permutes q/k lora_B for every family. Right for Llama and
    # Mistral (their HF q/k rows are permuted too), wrong for Qwen2 (whose are not).
    info = family_run.info
    theirs = tune_to_peft_adapter_weights(
        _trained_adapter(family_run), num_heads=info.num_heads, num_kv_heads=info.num_kv_heads, dim=info.dim
    )
    q_key = "model.layers.0.self_attn.q_proj.weight"
    torchtune_is_right = torch.allclose(merged_with(theirs, q_key), merged[q_key], atol=1e-5)
    assert torchtune_is_right == (info.model_type != "QWEN2")


def test_merged_weights_give_the_lora_models_logits(family_run, tmp_path):
    ckpt = family_run.ckpt
    folder = latest_checkpoint(family_run.output_dir)
    plain = ckpt.build_model().eval()
    state = _hf_checkpointer(folder / "merged", ckpt.family.model_type, tmp_path / "out").load_checkpoint()["model"]
    plain.load_state_dict(state, strict=True)
    base = ckpt.build_model().eval()
    base_state = _hf_checkpointer(ckpt.checkpoint_dir, ckpt.family.model_type, tmp_path / "out2").load_checkpoint()
    base.load_state_dict(base_state["model"], strict=True)

    tokens = _batch(family_run)["tokens"][:, :64]
    model = family_run.recipe.model.eval()
    with torch.no_grad():
        lora_logits = _logits(model, tokens)
        merged_logits = _logits(plain, tokens)
        base_logits = _logits(base, tokens)
    model.train()
    torch.testing.assert_close(merged_logits, lora_logits, atol=ATOL, rtol=1e-4)
    assert (base_logits - lora_logits).abs().max() > 100 * ATOL, "the adapter is too small to test anything"


def test_flex_mas_logits_equal_dense_sdpa_logits(family_run):
    from mas import create_mas_block_mask, dense_mas_mask, use_mas_attention
    from mas.masks import PAD
    from mas.masks import as_causal

    batch = _batch(family_run)
    tokens, segments = batch["tokens"], batch["segment_ids"]
    real = segments != PAD
    model = family_run.recipe.model.eval()
    try:
        with torch.no_grad():
            use_mas_attention(model, backend="flex")
            flex = _logits(model, tokens, mask=create_mas_block_mask(segments))
            use_mas_attention(model, backend="sdpa")
            dense = _logits(model, tokens, mask=dense_mas_mask(segments))
            causal = _logits(model, tokens, mask=dense_mas_mask(as_causal(segments)))
    finally:
        use_mas_attention(model, backend=family_run.recipe.backend)
        model.train()
    torch.testing.assert_close(flex[real], dense[real], atol=ATOL, rtol=1e-4)
    assert (causal[real] - dense[real]).abs().max() > 100 * ATOL, "MAS and causal masks gave the same logits"


# ------------------------------------------------------------------------------------------ QLoRA
# torchtune's RMSNorm computes in fp32 next to a bf16 scale; torch warns that it cannot fuse that.
@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
@pytest.mark.parametrize("family", ["llama3_2", "qwen2_untied"])
def test_qlora_trains_saves_adapter_and_dequantized_merged_weights(family, tmp_path):
    """NF4 base weights (torchao) on CPU in bf16: load, train, save PEFT and merged HF weights.

    Llama 3.2 through torchtune's own ``quantize_base``; Qwen2 through
    ``mas.models.lora_with_nf4_base``, which also quantizes the projections without adapters.
    """
    from torchao.dtypes.nf4tensor import NF4Tensor

    # NF4 quantizes in blocks of 64 values with scalers in blocks of 256: every weight needs a
    # multiple of 16384 elements, so these tiny models are 256 wide.
    ckpt = write_tiny_checkpoint(family, tmp_path / "base", embed_dim=256, intermediate_dim=512)
    out = tmp_path / "run"
    if family == "qwen2_untied":
        # Adapters on q and v only (as the paper's configs): k, o and the MLP are swapped to NF4.
        cfg_model = {"_component_": "mas.models.lora_with_nf4_base", "builder": ckpt.family.lora_builder}
        recipe = _run_recipe(ckpt, out, extra=["dtype=bf16"], lora_attn=["q_proj", "v_proj"], mlp=False,
                             **cfg_model)  # fmt: skip
    else:
        recipe = _run_recipe(ckpt, out, extra=["dtype=bf16"], quantize_base=True)
    run = FamilyRun(ckpt, recipe, out)
    model = recipe.model
    layer = model.layers[0]
    for proj in (layer.attn.q_proj, layer.attn.k_proj, layer.attn.v_proj, layer.attn.output_proj,
                 layer.mlp.w1, layer.mlp.w2, layer.mlp.w3):  # fmt: skip
        assert isinstance(proj.weight, NF4Tensor)
    assert all(p.dtype == torch.bfloat16 for p in recipe.trainable)
    # torchtune's builder registered reparametrize_as_dtype_state_dict_post_hook: no NF4 leaves.
    assert not any(isinstance(v, NF4Tensor) for v in model.state_dict().values())

    peft, _ = load_peft_adapter(latest_checkpoint(out))
    reloaded = peft_to_adapter(peft, run.info)
    for key, value in _trained_adapter(run).items():
        assert torch.equal(reloaded[key], value), key

    merged = load_file(str(latest_checkpoint(out) / "merged" / "model.safetensors"))
    base = load_file(str(ckpt.checkpoint_dir / "model.safetensors"))
    assert all(v.dtype == torch.bfloat16 for v in merged.values())
    k = "model.layers.0.mlp.down_proj.weight"  # not adapted: base weight after NF4 round trip
    error = (merged[k].float() - base[k]).abs().max() / base[k].abs().max()
    assert 0 < error < 0.2, f"NF4 round-trip error {error}"

    merged_dir = latest_checkpoint(out) / "merged"
    state = _hf_checkpointer(merged_dir, ckpt.family.model_type, tmp_path / "o").load_checkpoint()["model"]
    with torch.device("cpu"):
        plain = ckpt.build_model().to(torch.bfloat16).eval()
    plain.load_state_dict(state, strict=True)
    tokens = _batch(run)["tokens"][:, :64]
    model.eval()
    with torch.no_grad():
        qlora_logits = _logits(model, tokens).float()
        merged_logits = _logits(plain, tokens).float()
    model.train()
    # bf16 arithmetic in two different orders (adapter path vs merged weight).
    assert (qlora_logits - merged_logits).abs().max() < 0.05 * qlora_logits.abs().max()


def test_every_family_is_covered():
    assert sorted(FAMILIES) == sorted(TINY_FAMILIES)


def test_generation_runs_and_its_cache_is_exact(family_model_and_tokenizer):
    """Each family generates with the shared builder; the engine equals a full recompute per token."""
    import mas
    from mas.generation import SamplingParams
    from mas.testing.reference_decoding import reference_generate

    model, tokenizer = family_model_and_tokenizer
    model.eval()
    prompt = {"system": "Below is an instruction that describes a task.", "user": "### Instruction:\nIs ice cold?\n\n### Response:\n"}
    out = mas.generate(model, tokenizer, [prompt], max_new_tokens=6, stop_tokens=[])
    assert len(out.tokens[0]) == 6 and isinstance(out.texts[0], str)
    assert out.tokens[0] == reference_generate(model, out.prompts[0], SamplingParams(6))[0]
