"""CUDA-only checks: the FlexAttention paths against their dense twins, end to end.

Skipped on machines without CUDA (CI has none); run on a GPU with ``pytest -m gpu``.
"""

from __future__ import annotations

import copy

import pytest
import torch

import mas
from mas import CAUSAL, PAD, create_mas_block_mask, dense_mas_mask

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _lora_model(dtype):
    from mas.models import lora_tiny_llama3_2

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = lora_tiny_llama3_2(["q_proj", "v_proj"], lora_rank=8, lora_alpha=16).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.normal_(0, 0.02)  # non-zero adapters so their gradients are not trivial
    from torchtune.modules.peft import get_adapter_params, set_trainable_params

    set_trainable_params(model, get_adapter_params(model))
    return model


def _layout(b: int, s: int) -> torch.Tensor:
    seg = torch.full((b, s), CAUSAL)
    for row in range(b):
        sys_len, user_len = 20 + 7 * row, 90 + 31 * row
        seg[row, :sys_len] = 0
        seg[row, sys_len : sys_len + user_len] = 1
        seg[row, s - 13 * row :] = PAD  # right padding of different lengths
    return seg.cuda()


# bf16: logits of a few units carry ~0.03-0.1 of rounding (bf16 keeps 8 bits of mantissa) that
# flex and SDPA accumulate in different orders; the mean difference stays far smaller.
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-4), (torch.bfloat16, 0.25)])
def test_training_forward_and_backward_flex_equals_dense(dtype, tol):
    flex_model = mas.use_mas_attention(_lora_model(dtype), "flex")
    dense_model = mas.use_mas_attention(copy.deepcopy(flex_model), "sdpa")
    seg = _layout(4, 300)
    tokens = torch.randint(0, 1000, seg.shape, device="cuda")
    out_flex = flex_model(tokens, mask=create_mas_block_mask(seg))
    out_dense = dense_model(tokens, mask=dense_mas_mask(seg))
    real = seg != PAD
    torch.testing.assert_close(out_flex[real].float(), out_dense[real].float(), atol=tol, rtol=tol)
    assert (out_flex[real].float() - out_dense[real].float()).abs().mean() < tol / 20
    (out_flex[real].float().square().mean()).backward()
    (out_dense[real].float().square().mean()).backward()
    for (name, a), (_, b) in zip(flex_model.named_parameters(), dense_model.named_parameters()):
        if a.requires_grad:
            scale = b.grad.abs().max().clamp(min=1e-6)
            assert ((a.grad - b.grad).abs().max() / scale) < min(tol * 10, 0.5), name


def test_generation_flex_prefill_equals_dense_prefill():
    from mas.models import tiny_llama3_2, tiny_llama3_tokenizer

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = tiny_llama3_2().eval()
    tokenizer = tiny_llama3_tokenizer()
    prompts = [{"system": "Below is an instruction.", "user": "Is ice cold? " * k} for k in range(1, 6)]
    flex = mas.generate(model, tokenizer, prompts, max_new_tokens=12, attention_backend="flex")
    dense = mas.generate(model, tokenizer, prompts, max_new_tokens=12, attention_backend="sdpa")
    cached = mas.generate(model, tokenizer, prompts, max_new_tokens=12, attention_backend="flex", reuse_system_cache=True)
    compiled = mas.generate(model, tokenizer, prompts, max_new_tokens=12, compile_decode=True, compile_mode="reduce-overhead")
    assert flex.tokens == dense.tokens == cached.tokens == compiled.tokens


def test_recipe_on_cuda_flex_matches_sdpa(tmp_path, tiny_base_dir):
    from mas.training import read_metrics
    from support.runs import finetune_overrides, run_finetune

    curves = {}
    for backend in ("flex", "sdpa"):
        out = tmp_path / backend
        run_finetune(
            "tiny_mas",
            finetune_overrides(out, tiny_base_dir, device="cuda", attention_backend=backend, **{"model.lora_dropout": 0.0}),
        )
        curves[backend] = [r["loss"] for r in read_metrics(out / "metrics.jsonl")]
    assert curves["flex"] == pytest.approx(curves["sdpa"], rel=1e-3)


def test_compiled_block_tables_equal_eager_on_cuda():
    seg = _layout(4, 700)
    eager = create_mas_block_mask(seg)
    compiled = create_mas_block_mask(seg, compile=True)
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                 "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):  # fmt: skip
        assert torch.equal(getattr(eager, name), getattr(compiled, name)), name
        assert getattr(compiled, name).is_contiguous(), name
