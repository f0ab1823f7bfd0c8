"""The training step: LM head on counted targets only, no host read of a device tensor, compile.

Every fast path is compared with its slow twin: the targets-only loss with the full-logits loss
(fp32, tight tolerance), the compiled step with the eager one (stated tolerance).
"""

from __future__ import annotations

import importlib

import pytest
import torch
from torchtune.modules.loss import CEWithChunkedOutputLoss
from torchtune.modules.peft import get_adapter_params, set_trainable_params

from mas.config import ConfigError
from mas.segments import IGNORE_INDEX
from mas.testing import TINY_FAMILIES
from mas.testing._synthetic import causal_layout, staggered_prompt_layout, tokens_for_layout
from mas.lm_head import lm_head_on_rows
from mas.training.loss import check_target_rows_loss
from mas.training.steps import HostBatch, prepare_batch, prepare_host_batch, summed_token_loss

CPU = torch.device("cpu")


def _lora_model(family: str, *, lora_on_output: bool = False, seed: int = 0) -> torch.nn.Module:
    """A tiny LoRA model of ``family`` with non-zero adapters (so every LoRA weight has a gradient)."""
    spec = TINY_FAMILIES[family]
    module, _, name = spec.lora_builder.rpartition(".")
    builder = getattr(importlib.import_module(module), name)
    torch.manual_seed(seed)
    model = builder(
        lora_attn_modules=["q_proj", "v_proj"], apply_lora_to_mlp=False, apply_lora_to_output=lora_on_output,
        lora_rank=4, lora_alpha=8, lora_dropout=0.0, **spec.dims,
    )
    from mas.attention import use_mas_attention

    use_mas_attention(model)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    set_trainable_params(model, get_adapter_params(model))
    return model


def _batch(attention: str, vocab: int, *, seq_len: int = 48, padded: bool = True, seed: int = 0) -> dict:
    layout = staggered_prompt_layout(4, seq_len, padded=padded) if attention == "mas" else causal_layout(4, seq_len)
    if attention == "causal" and padded:
        layout[1:, -seq_len // 4 :] = -2  # PAD: rows of different lengths
    return tokens_for_layout(layout, vocab, seed=seed)


def _loss_and_lora_grads(model, loss_fn, prepared, *, targets_only: bool):
    model.zero_grad(set_to_none=True)
    loss = summed_token_loss(model, loss_fn, prepared, lm_head_on_targets_only=targets_only)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize(
    "family,lora_on_output",
    [("llama3_2", False), ("qwen2_untied", False), ("llama3", True)],
    ids=["tied", "untied", "untied-lora-head"],
)
@pytest.mark.parametrize("attention", ["mas", "causal"])
@pytest.mark.parametrize("chunks", [0, 4], ids=["plain-logits", "chunked-logits"])
def test_targets_only_loss_and_grads_equal_full_logits(family, lora_on_output, attention, chunks):
    model = _lora_model(family, lora_on_output=lora_on_output)
    loss_fn = CEWithChunkedOutputLoss(num_output_chunks=max(chunks, 1))
    model.set_num_output_chunks(chunks)
    if chunks == 0:
        # The full-logits twin over plain [b, s, v] logits: the same summed CE, one chunk.
        loss_fn = _PlainCE()
    prepared = prepare_batch(_batch(attention, TINY_FAMILIES[family].dims["vocab_size"]), attention=attention, device=CPU)
    assert 0 < prepared.num_targets < prepared.targets.numel()  # padding (and MAS prompts) carry no target
    full_loss, full_grads = _loss_and_lora_grads(model, loss_fn, prepared, targets_only=False)
    rows_loss, rows_grads = _loss_and_lora_grads(model, loss_fn, prepared, targets_only=True)
    torch.testing.assert_close(rows_loss, full_loss, rtol=1e-6, atol=1e-5)
    assert set(rows_grads) == set(full_grads) and len(full_grads) >= 4
    for name, grad in full_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(rows_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert "unembed" not in vars(model) and model.num_output_chunks == chunks  # left as it was


class _PlainCE(CEWithChunkedOutputLoss):
    """The mean CE over unchunked ``[b, s, v]`` logits (what the recipe's loss computes per chunk)."""

    def forward(self, logits, labels):
        return self.compute_cross_entropy(logits.flatten(0, 1), labels.flatten()) / (labels != IGNORE_INDEX).sum()


def test_head_on_rows_returns_the_rows_of_the_full_logits():
    model = _lora_model("llama3_2").eval()
    prepared = prepare_batch(_batch("mas", 1024), attention="mas", device=CPU)
    with torch.no_grad():
        full = model(prepared.tokens, **prepared.model_kwargs())  # [b, s, v]
        with lm_head_on_rows(model, prepared.target_index):
            rows = model(prepared.tokens, **prepared.model_kwargs())  # [n, v]
    assert rows.shape == (prepared.num_targets, full.shape[-1])
    torch.testing.assert_close(rows, full.flatten(0, 1)[prepared.target_index], rtol=1e-6, atol=1e-6)
    assert torch.equal(prepared.target_values, prepared.targets.flatten()[prepared.target_index])


def test_no_target_gives_a_zero_loss_with_a_connected_graph():
    model = _lora_model("llama3_2")
    batch = _batch("mas", 1024)
    batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
    prepared = prepare_batch(batch, attention="mas", device=CPU)
    assert prepared.num_targets == 0
    loss = summed_token_loss(model, CEWithChunkedOutputLoss(), prepared)
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_host_batch_counts_on_the_cpu_and_pins():
    batch = _batch("mas", 1024)
    host = prepare_host_batch(batch)
    assert isinstance(host.num_targets, int) and isinstance(host.num_tokens, int)
    assert host.num_tokens == int((batch["segment_ids"] != -2).sum())
    assert host.num_targets == host.target_index.numel() == int((host.targets != IGNORE_INDEX).sum())
    assert prepare_host_batch(host) is host
    prepared = prepare_batch(host, attention="mas", device=CPU)
    assert torch.equal(prepared.targets, prepare_batch(batch, attention="mas", device=CPU).targets)
    if torch.cuda.is_available():
        assert host.pin_memory().tokens.is_pinned()


def test_targets_only_refuses_a_loss_without_summed_cross_entropy():
    model = _lora_model("llama3_2")
    check_target_rows_loss(model, CEWithChunkedOutputLoss())
    with pytest.raises(ConfigError, match="lm_head_on_targets_only=False"):
        check_target_rows_loss(model, torch.nn.CrossEntropyLoss())
    with pytest.raises(ConfigError, match="TransformerDecoder"):
        check_target_rows_loss(torch.nn.Linear(2, 2), CEWithChunkedOutputLoss())


# ----------------------------------------------------------------------------- host reads
_HOST_READS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__")


class _HostReadCounter:
    """Counts host reads of tensor values (on CUDA each one waits for the GPU)."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[str] = []
        for name in _HOST_READS:
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _name=name, _original=original, **kwargs):
                self.calls.append(_name)
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)


def _recipe(tmp_path, base_dir, **extra):
    import mas_lora_finetune
    from support.runs import finetune_overrides

    from mas.config import load_config

    overrides = finetune_overrides(
        tmp_path / "run", base_dir, **{"optimizer.fused": True, "log_every_n_steps": 10, "on_nonfinite": "stop", **extra}
    )
    recipe = mas_lora_finetune.MASLoRAFinetuneRecipe(load_config("tiny_mas", overrides))
    recipe.setup()
    return recipe


def test_optimizer_step_reads_no_tensor_on_the_host(tmp_path, tiny_base_dir, monkeypatch):
    """Outside logging steps, _optimizer_step never reads a tensor's value (with on_nonfinite=stop).

    The batches come from the recipe's own loader (CPU checks and counts happen there, in the
    workers when there are any); two micro-batches per step; the optimizer is the fused AdamW
    of the paper configs (the unfused ones read their CPU step counters). on_nonfinite=skip pays
    exactly one read per step, as documented.
    """
    recipe = _recipe(tmp_path, tiny_base_dir, gradient_accumulation_steps=2)
    batches = list(recipe._micro_batches(0, 0))[:8]
    assert all(isinstance(b, HostBatch) for b in batches)
    stream = iter(batches)
    recipe._optimizer_step(stream)  # warm-up outside the count (lazy optimizer state)
    counter = _HostReadCounter(monkeypatch)
    stats = [recipe._optimizer_step(stream) for _ in range(2)]
    stop_calls = list(counter.calls)
    recipe.opts.on_nonfinite = "skip"
    recipe._optimizer_step(stream)
    monkeypatch.undo()
    assert stop_calls == []
    assert counter.calls == ["__bool__"]
    assert all(isinstance(s["num_tokens"], int) and isinstance(s["loss"], torch.Tensor) for s in stats)
    # The loss read at a logging step is the mean over the step's counted targets.
    assert 0 < float(stats[-1]["loss"]) < 20


def test_training_loop_reads_the_device_only_on_logging_steps(tmp_path, tiny_base_dir, monkeypatch):
    """train() itself (progress, token and time windows, the non-finite guard) reads no tensor
    between two logging steps: reads happen at steps 4 and 8 (log_every_n_steps) and 9 (the
    last), none at the others. Validation and checkpoints, which read by design, are stubbed; the
    batches are collated before counting (collation reads CPU tensors, in loader workers)."""
    recipe = _recipe(tmp_path, tiny_base_dir, log_every_n_steps=4, max_steps_per_epoch=9, save_every_n_steps=None)
    batches = list(recipe._micro_batches(0, 0))
    monkeypatch.setattr(recipe, "_micro_batches", lambda epoch, start: iter(batches))
    monkeypatch.setattr(recipe, "_log_validation", lambda step, epoch: None)
    monkeypatch.setattr(recipe, "save_checkpoint", lambda *, epoch_end: None)
    reads_before_step = []
    step = recipe._optimizer_step

    def counted_step(micro_batches):
        reads_before_step.append(len(counter.calls))
        return step(micro_batches)

    monkeypatch.setattr(recipe, "_optimizer_step", counted_step)
    counter = _HostReadCounter(monkeypatch)
    recipe.train()
    reads_before_step.append(len(counter.calls))
    monkeypatch.undo()
    # Reads during step k and the loop's work after it, for k = 1..9 (step 1 holds the lazy
    # optimizer state's set-up).
    reads = [b - a for a, b in zip(reads_before_step, reads_before_step[1:])]
    assert len(reads) == 9
    assert [k for k, n in enumerate(reads, start=1) if n and k > 1] == [4, 8, 9]


def test_gradients_are_scaled_in_one_fused_call(tmp_path, tiny_base_dir, monkeypatch):
    """One _foreach_mul_ over every LoRA gradient, by 1 / (targets of the step), not one mul per
    gradient: the step's gradients are those of the mean loss over its targets."""
    recipe = _recipe(tmp_path, tiny_base_dir, gradient_accumulation_steps=2)
    stream = iter(list(recipe._micro_batches(0, 0))[:4])
    recipe._optimizer_step(stream)  # warm-up (lazy optimizer state)
    calls = []
    foreach_mul = torch._foreach_mul_

    def recording(tensors, scale):
        calls.append((len(tensors), scale))
        return foreach_mul(tensors, scale)

    monkeypatch.setattr(torch, "_foreach_mul_", recording)
    batches = list(stream)
    targets = sum(b.num_targets for b in batches)
    recipe._optimizer_step(iter(batches))
    monkeypatch.undo()
    # Gradient clipping scales by a device tensor (its own fused call); ours is a host float.
    ours = [(n, scale) for n, scale in calls if not isinstance(scale, torch.Tensor)]
    assert ours == [(len(recipe.trainable), pytest.approx(1.0 / targets))]


def test_host_read_counter_sees_reads(monkeypatch):
    """The counter above would catch what the old step did (int() of a device count, .item())."""
    counter = _HostReadCounter(monkeypatch)
    t = torch.tensor([3, 4])
    int(t.sum()), t.sum().item(), bool(t.all()), float(t[0]), t.tolist()
    monkeypatch.undo()
    assert counter.calls == ["__int__", "item", "__bool__", "__float__", "tolist"]


# ----------------------------------------------------------------------------- compile
#: Compiled vs eager, fp32 on CPU: inductor reorders reductions (RMSNorm, softmax, matmul
#: accumulation), so the two agree to float32 round-off accumulated over two layers, not bitwise.
COMPILE_RTOL, COMPILE_ATOL = 1e-4, 1e-6


@pytest.mark.slow
def test_compiled_step_matches_eager_and_stops_recompiling(monkeypatch):
    """Per-layer compile (torchtune's compile_model) + compiled loss, dense-mask SDPA path.

    Over 8 steps whose padded lengths take 3 values, loss and LoRA gradients match the eager
    twin, no layer has a graph break, and after the warm-up (the first two lengths: a static
    then a dynamic graph) nothing recompiles.
    """
    import copy

    import torch._dynamo
    from torch._dynamo.utils import counters
    from torchtune import training

    torch._dynamo.reset()
    counters.clear()
    eager = _lora_model("llama3_2")
    compiled = copy.deepcopy(eager)
    training.compile_model(compiled, verbose=False)
    compiled_loss = training.compile_loss(CEWithChunkedOutputLoss(), verbose=False)
    eager_loss = CEWithChunkedOutputLoss()
    lengths = [32, 48, 32, 64, 48, 64, 32, 48]
    graphs_after_warmup = None
    try:
        for step, seq_len in enumerate(lengths):
            if step == 2:
                graphs_after_warmup = counters["stats"]["unique_graphs"]
            prepared = prepare_batch(_batch("mas", 1024, seq_len=seq_len, seed=step), attention="mas", device=CPU)
            want_loss, want_grads = _loss_and_lora_grads(eager, eager_loss, prepared, targets_only=True)
            got_loss, got_grads = _loss_and_lora_grads(compiled, compiled_loss, prepared, targets_only=True)
            torch.testing.assert_close(got_loss, want_loss, rtol=COMPILE_RTOL, atol=COMPILE_ATOL)
            for name, grad in want_grads.items():
                torch.testing.assert_close(got_grads[name], grad, rtol=COMPILE_RTOL, atol=COMPILE_ATOL, msg=name)
        assert dict(counters["graph_break"]) == {}
        assert counters["stats"]["unique_graphs"] == graphs_after_warmup, "recompiled after warm-up"
        # first layer (frozen input) and later layers, each static then dynamic; the loss (dynamic rows)
        assert graphs_after_warmup == 5
    finally:
        torch._dynamo.reset()


@pytest.mark.slow
def test_recipe_with_compile_does_not_recompile_over_hundreds_of_steps(tmp_path, tiny_base_dir):
    """``compile: True`` through the recipe: its layers and loss are compiled, and over 200
    optimizer steps of its own loader (batches of 2 rows padded to a multiple of 16, so the
    length and the number of targets change from step to step) dynamo compiles nothing after the
    warm-up (the steps up to the second padded length), and breaks no graph."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    try:
        recipe = _recipe(tmp_path, tiny_base_dir, compile=True, batch_size=2, max_steps_per_epoch=None)
        assert all(layer._compiled_call_impl is not None for layer in recipe.model.layers)
        batches = list(recipe._micro_batches(0, 0))[:200]
        lengths = [b.tokens.shape[1] for b in batches]
        warm = next(i for i, n in enumerate(lengths) if n != lengths[0]) + 1
        assert len(set(lengths[warm:])) >= 3, lengths  # the steps after the warm-up still vary
        stream = iter(batches)
        for _ in range(warm):
            recipe._optimizer_step(stream)
        graphs = counters["stats"]["unique_graphs"]
        losses = [recipe._optimizer_step(stream)["loss"] for _ in range(len(batches) - warm)]
        assert counters["stats"]["unique_graphs"] == graphs, "recompiled after warm-up"
        assert dict(counters["graph_break"]) == {}
        assert all(0 < float(loss) < 20 for loss in losses[-5:])
    finally:
        torch._dynamo.reset()


# ----------------------------------------------------------------------------- loader workers
def test_loader_workers_give_the_same_steps_as_the_main_process(tmp_path, tiny_base_dir):
    """Batches prepared in worker processes (the paper configs' num_workers) train exactly as the
    same batches prepared in the main process: same losses, same LoRA weights after three steps
    (dropout draws in the main process, never in the workers)."""
    results = []
    for workers in (0, 2):
        recipe = _recipe(tmp_path / f"w{workers}", tiny_base_dir, num_workers=workers)
        stream = iter(recipe._micro_batches(0, 0))
        losses = [float(recipe._optimizer_step(stream)["loss"]) for _ in range(3)]
        adapter = {k: v.detach().clone() for k, v in get_adapter_params(recipe.model).items()}
        results.append((losses, adapter))
        del stream
    (losses_main, adapter_main), (losses_workers, adapter_workers) = results
    assert losses_workers == losses_main
    assert adapter_workers.keys() == adapter_main.keys()
    for name, weight in adapter_main.items():
        assert torch.equal(adapter_workers[name], weight), name


def test_loader_collate_pickles_for_spawned_workers(tmp_path, tiny_base_dir):
    """Workers started by spawn or forkserver (macOS; Linux from Python 3.14) receive the
    collate function pickled: it must not be a local lambda, and its copy collates the same."""
    import pickle

    recipe = _recipe(tmp_path, tiny_base_dir)
    collate = pickle.loads(pickle.dumps(recipe.loader.collate_fn))
    items = [recipe.dataset[i] for i in range(3)]
    want, got = recipe.loader.collate_fn(items), collate(items)
    assert isinstance(got, HostBatch)
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.segment_ids, want.segment_ids)
    assert got.key_windows == want.key_windows


def test_fit_check_names_the_tile_padding_when_it_makes_a_pack_too_long():
    """A 1000-token pack fits a 1000-position model, but pad_to_multiple_of=128 makes it 1024:
    the message must say so, not that 1000 is longer than 1000."""
    from types import SimpleNamespace

    from mas.training.finetune import LoRAFinetuneRecipe

    recipe = SimpleNamespace(model=SimpleNamespace(max_seq_len=1000), opts=SimpleNamespace(pad_to_multiple_of=128))
    packs = SimpleNamespace(longest_item=1000, stats=SimpleNamespace(packs=3, pack_length=1000))
    with pytest.raises(ConfigError) as error:
        LoRAFinetuneRecipe._check_fits_model(recipe, packs, "dataset")
    message = str(error.value)
    assert "pad_to_multiple_of=128" in message and "1024 tokens" in message and "\n" not in message
    recipe.opts.pad_to_multiple_of = None
    LoRAFinetuneRecipe._check_fits_model(recipe, packs, "dataset")  # fits unpadded


def test_loader_plans_key_windows_only_for_the_dense_cpu_attention(tmp_path, tiny_base_dir):
    """The CPU step's dense mask uses the planned windows; a FlexAttention step (its BlockMask
    has its own tiles) gets none, so its loader does not plan them."""
    from mas.attention import uses_flex

    from mas.data import collate_segmented

    recipe = _recipe(tmp_path, tiny_base_dir)
    items = [recipe.dataset[i] for i in range(3)]
    assert not uses_flex(recipe.backend, recipe.device) and recipe.loader.collate_fn(items).key_windows
    raw = collate_segmented(items, pad_id=0, pad_to_multiple_of=recipe.opts.pad_to_multiple_of)
    dense, flex_batch = prepare_host_batch(raw), prepare_host_batch(raw, plan_windows=False)
    assert dense.key_windows and flex_batch.key_windows is None
    # Without a plan the CPU mask builder plans itself: the same mask either way.
    with_plan = prepare_batch(dense, attention="mas", device=CPU)
    without_plan = prepare_batch(flex_batch, attention="mas", device=CPU)
    assert torch.equal(with_plan.mask, without_plan.mask)
