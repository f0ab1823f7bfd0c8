"""CUDA checks of the training step: targets-only LM head with FlexAttention, no host sync inside
a step (CUDA's sync debug mode), per-layer compile with BlockMasks over bucketed lengths.

Skipped without CUDA; run on a GPU with ``pytest -m gpu tests/gpu``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torchtune.modules.loss import CEWithChunkedOutputLoss

import mas
from mas import CAUSAL, PAD
from mas.training.steps import HostBatch, prepare_batch, summed_token_loss

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CUDA = torch.device("cuda")


def _lora_model(dtype: torch.dtype) -> torch.nn.Module:
    from torchtune.modules.peft import get_adapter_params, set_trainable_params

    from mas.models import lora_tiny_llama3_2

    torch.manual_seed(0)
    with CUDA:
        model = lora_tiny_llama3_2(["q_proj", "v_proj"], lora_rank=8, lora_alpha=16).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.normal_(0, 0.02)
    set_trainable_params(model, get_adapter_params(model))
    return mas.use_mas_attention(model, "flex")


def _batch(b: int, s: int, seed: int = 0) -> dict:
    """Rows of a ~25-token answer after prompts of different lengths, right-padded (CPU tensors)."""
    seg = torch.full((b, s), PAD)
    for row in range(b):
        system, user, answer = 10 + 3 * row, s // 2 - 9 * row, 25
        seg[row, :system] = 0
        seg[row, system : system + user] = 1
        seg[row, system + user : system + user + answer] = CAUSAL
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 1000, (b, s), generator=generator)
    labels = torch.where(seg == CAUSAL, tokens, torch.full_like(tokens, -100))
    return {"tokens": tokens, "labels": labels, "segment_ids": seg}


def _loss_and_grads(model, loss_fn, prepared, targets_only):
    model.zero_grad(set_to_none=True)
    loss = summed_token_loss(model, loss_fn, prepared, lm_head_on_targets_only=targets_only)
    loss.backward()
    return loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_targets_only_equals_full_logits_with_flex(dtype, rtol):
    model = _lora_model(dtype)
    loss_fn = CEWithChunkedOutputLoss()
    model.set_num_output_chunks(loss_fn.num_output_chunks)
    prepared = prepare_batch(_batch(4, 256), attention="mas", device=CUDA)
    full_loss, full_grads = _loss_and_grads(model, loss_fn, prepared, False)
    rows_loss, rows_grads = _loss_and_grads(model, loss_fn, prepared, True)
    torch.testing.assert_close(rows_loss, full_loss, rtol=rtol, atol=0.0)
    for name, grad in full_grads.items():
        scale = grad.abs().max()
        assert scale > 0
        assert (rows_grads[name] - grad).abs().max() <= 5 * rtol * scale, name


def test_optimizer_step_never_syncs_on_cuda(tmp_path, tiny_base_dir):
    """CUDA's sync debug mode raises on any synchronizing call inside two non-logging steps."""
    import mas_lora_finetune
    from support.runs import finetune_overrides

    from mas.config import load_config

    overrides = finetune_overrides(
        tmp_path / "run", tiny_base_dir, device="cuda", dtype="bf16", log_every_n_steps=10,
        gradient_accumulation_steps=2, **{"optimizer.fused": True},
    )
    # A fresh dynamo cache: the eager model's flex kernel is compiled once per shape
    # (mas.attention._flex, dynamic=False); past dynamo's recompile limit (8 shapes in one
    # process, earlier tests included) it silently runs the unfused kernel, which syncs.
    torch._dynamo.reset()
    recipe = mas_lora_finetune.MASLoRAFinetuneRecipe(load_config("tiny_mas", overrides))
    recipe.setup()
    batches = list(recipe._micro_batches(0, 0))[:4]
    assert all(isinstance(b, HostBatch) and b.tokens.is_pinned() for b in batches)
    warm_up = iter(batches)
    # Warm-up over every shape: lazy optimizer state, and the BlockMask tables compiled once per
    # padded length (compiling is not a step; it may synchronize).
    for _ in range(2):
        recipe._optimizer_step(warm_up)
    torch.cuda.synchronize()
    stream = iter(batches)
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats = [recipe._optimizer_step(stream) for _ in range(2)]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert 0 < float(stats[-1]["loss"]) < 20


def test_compiled_flex_layers_match_eager_without_recompiles():
    """Per-layer compile with BlockMasks: no graph break, no recompile after the warm-up lengths."""
    from torch._dynamo.utils import counters
    from torchtune import training

    torch._dynamo.reset()
    counters.clear()
    eager = _lora_model(torch.bfloat16)
    compiled = copy.deepcopy(eager)
    training.compile_model(compiled, verbose=False)
    compiled_loss = training.compile_loss(CEWithChunkedOutputLoss(), verbose=False)
    # The paper's unpacked setting: cutoff 256, pad_to_multiple_of=128, so two buckets.
    lengths = [128, 256, 128, 256, 256, 128, 128, 256]
    warm = None
    try:
        for step, s in enumerate(lengths):
            if step == 2:
                warm = counters["stats"]["unique_graphs"]
            prepared = prepare_batch(_batch(4, s, seed=step), attention="mas", device=CUDA)
            want, _ = _loss_and_grads(eager, CEWithChunkedOutputLoss(), prepared, True)
            got, _ = _loss_and_grads(compiled, compiled_loss, prepared, True)
            torch.testing.assert_close(got, want, rtol=2e-2, atol=0.0)
        assert dict(counters["graph_break"]) == {}
        assert counters["stats"]["unique_graphs"] == warm, "recompiled after warm-up"
    finally:
        torch._dynamo.reset()
