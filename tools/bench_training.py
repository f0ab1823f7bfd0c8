"""Benchmark a LoRA training step: MAS vs causal on the same attention path, and the paper's way.

Four variants of one full optimizer step (mask build, forward, loss, backward, AdamW step) on the
same model and batch:

- ``MAS``: ``mas.training.prepare_batch(attention="mas")`` - one mask per batch from the segment
  ids (a BlockMask and compiled FlexAttention on CUDA; the dense twin and SDPA on CPU, where flex
  has no backward);
- ``causal``: the same with every prompt segment made causal (the baseline, same path);
- ``causal SDPA``: no mask at all, ``is_causal=True`` - the speed a causal model gets for free;
- ``paper reference``: what the paper's reference code does, re-implemented: a dense float
  additive mask ``[b, 1, s, s]`` built with Python loops every forward and eager attention
  (``softmax(QK^T / sqrt(d) + mask) V``).

Variants are timed in turn, step after step, so their ratios are fair on a shared machine.
Reported: step time, tokens/s, peak memory (CUDA), MAS/causal ratios, the mask density (MAS
attends more keys: its attention FLOP increase), and on CUDA the model FLOP utilisation.

Usage::

    python tools/bench_training.py                                   # CPU, tiny model
    python tools/bench_training.py --device cuda --model llama3_2_1b # GPU, Llama-3.2-1B shape
"""

from __future__ import annotations

import argparse
import datetime
import math
import statistics
from typing import Callable, Dict, List, Optional

import torch

from mas import dense_mas_mask, use_mas_attention
from mas.masks import as_causal
from mas.testing import PAPER_LORA, benchmark_model, loop_additive_mask, tokens_for_layout, uniform_prompt_layout
from mas.testing.benchlib import BENCHMARKS_FILE, machine_description, markdown_table, time_once_ms, update_section
from mas.training import prepare_batch

NAME = "bench_training"
TITLE = "LoRA training step: MAS vs causal vs the paper's reference (`tools/bench_training.py`)"
#: H100/H200 SXM dense bf16 peak (vendor datasheet); the measured 8192^3 bf16 matmul reaches ~790.
PEAK_BF16_TFLOPS = 989.0


class EagerAttention:
    """``softmax(QK^T / sqrt(d) + mask) V`` with the float mask of the current forward."""

    mask: Optional[torch.Tensor] = None

    def __call__(self, q, k, v, mask, dropout_p, is_causal):
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + self.mask
        return scores.softmax(-1) @ v


def matmul_params(model: torch.nn.Module) -> int:
    """Weights that multiply activations (all Linear-like weights, the output projection included)."""
    total = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "lora" not in n and "tok_embeddings" not in n)
    if not any("output" in n for n, _ in model.named_parameters()):  # tied output = embedding
        total += model.tok_embeddings.weight.numel()
    return total


def step_flops(model: torch.nn.Module, batch_size: int, seq_len: int, keys_per_query: float) -> float:
    """Useful FLOPs of one LoRA step: frozen base => forward 2N + backward 2N per token (no base
    weight gradients); attention 4 * layers * keys * dim forward, twice that backward."""
    n = matmul_params(model)
    layers = len(model.layers)
    dim = model.layers[0].attn.num_heads * model.layers[0].attn.head_dim
    attention = 12 * layers * keys_per_query * dim
    return batch_size * seq_len * (4 * n + attention)


def bench(args: argparse.Namespace) -> str:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backend = "flex" if device.type == "cuda" else "sdpa"
    rows, notes = [], []
    for seq_len in args.seqs:
        model = benchmark_model(args.model, device, dtype, lora=PAPER_LORA)
        use_mas_attention(model, backend)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        loss_fn = torch.nn.CrossEntropyLoss(ignore_index=-100)
        # Rows filled to the length: system 1/8, user 5/8, answer 1/4 (a long-prompt SFT layout).
        layout = uniform_prompt_layout(args.batch, seq_len, system=seq_len // 8, user=(5 * seq_len) // 8)
        batch = tokens_for_layout(layout, model.tok_embeddings.num_embeddings)
        mas_call, eager = model.layers[0].attn._attention_call, EagerAttention()

        def set_attention(call) -> None:
            for layer in model.layers:
                layer.attn._attention_call = call

        def finish(logits, targets) -> None:
            loss = loss_fn(logits.flatten(0, 1).float(), targets.flatten())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def masked_step(attention: str) -> Callable[[], None]:
            def step() -> None:
                prepared = prepare_batch(dict(batch), attention=attention, device=device, backend=backend)
                finish(model(prepared.tokens, **prepared.model_kwargs()), prepared.targets)

            return step

        def sdpa_causal_step() -> None:
            prepared = prepare_batch(dict(batch), attention="causal", device=device, backend=backend)
            finish(model(prepared.tokens), prepared.targets)

        def paper_step() -> None:
            set_attention(eager)
            try:
                eager.mask = loop_additive_mask(batch["segment_ids"].to(device), dtype)
                prepared = prepare_batch(dict(batch), attention="mas", device=device, backend="sdpa")
                finish(model(prepared.tokens, mask=prepared.mask), prepared.targets)
            finally:
                set_attention(mas_call)

        variants = {"MAS": masked_step("mas"), "causal": masked_step("causal"), "causal SDPA": sdpa_causal_step, "paper reference": paper_step}
        times: Dict[str, List[float]] = {k: [] for k in variants}
        peaks: Dict[str, float] = {}
        for name, fn in variants.items():  # warm-up (compiles) and peak memory, one variant at a time
            for _ in range(args.warmup):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                fn()
                torch.cuda.synchronize(device)
                peaks[name] = torch.cuda.max_memory_allocated(device) / 2**30
        for _ in range(args.steps):
            for name, fn in variants.items():
                times[name].append(time_once_ms(fn, device))
        medians = {k: statistics.median(v) for k, v in times.items()}
        mas_keys = dense_mas_mask(batch["segment_ids"]).float().sum(-1).mean().item()
        causal_keys = dense_mas_mask(as_causal(batch["segment_ids"])).float().sum(-1).mean().item()
        tokens = args.batch * seq_len
        for name, ms in medians.items():
            row = {
                "seq": str(seq_len),
                "variant": name,
                "step (ms)": f"{ms:.1f}",
                "tokens/s": f"{tokens / ms * 1e3:,.0f}",
                "vs causal": f"{ms / medians['causal']:.3f}",
            }
            if device.type == "cuda":
                keys = mas_keys if name in ("MAS", "paper reference") else causal_keys
                row["peak mem (GiB)"] = f"{peaks[name]:.2f}"
                row["MFU"] = f"{step_flops(model, args.batch, seq_len, keys) / (ms / 1e3) / (PEAK_BF16_TFLOPS * 1e12):.1%}"
            rows.append(row)
        extra = f"keys per query MAS {mas_keys:.0f} vs causal {causal_keys:.0f} (attention FLOPs x{mas_keys / causal_keys:.2f})"
        if device.type == "cuda":
            extra += f"; peak memory MAS/causal {peaks['MAS'] / peaks['causal']:.3f}"
        extra += f"; MAS/causal step time {medians['MAS'] / medians['causal']:.3f}; paper reference / MAS {medians['paper reference'] / medians['MAS']:.1f}x"
        notes.append(f"- seq {seq_len}: {extra}")
        del model, optimizer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    path = "compiled FlexAttention with a BlockMask (forward and backward)" if device.type == "cuda" else "SDPA with the dense MAS mask (FlexAttention has no CPU backward)"
    return "\n".join(
        [
            f"### {device.type}",
            "",
            f"Measured {datetime.date.today().isoformat()} with `python tools/bench_training.py --device {device.type} --model {args.model}`.",
            f"Machine: {machine_description(device)}.",
            f"Model: {args.model} shape, random weights, {str(dtype).replace('torch.', '')}, LoRA r=32 alpha=64 on q and v (the paper's setting); "
            f"batch {args.batch}; rows filled to the length: system 1/8, user 5/8, answer 1/4. MAS and causal run on {path}. "
            f"Medians of {args.steps} interleaved steps after {args.warmup} warm-up steps; a step is mask build + forward + loss + backward + AdamW."
            + (f" MFU: useful FLOPs (frozen base: 4N per token + masked attention) / {PEAK_BF16_TFLOPS:.0f} TFLOP/s bf16 peak." if device.type == "cuda" else ""),
            "",
            markdown_table(rows),
            "",
            *notes,
        ]
    )


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default=None, help="tiny (default on CPU) or llama3_2_1b (default on CUDA)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seqs", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    args.model = args.model or ("llama3_2_1b" if args.device == "cuda" else "tiny")
    args.steps = args.steps or (10 if args.device == "cuda" else 5)
    report = bench(args)
    print(report)
    if not args.no_write:
        update_section(BENCHMARKS_FILE, NAME, TITLE, args.device, report)


if __name__ == "__main__":
    main()
