"""Measure the peak GPU memory of MAS training steps for the paper's configs (needs CUDA).

No weights are downloaded: each config's model is built on the GPU with random weights (the
memory does not depend on the values), then three MAS training steps run on a synthetic batch
with the config's shapes (rows of a system segment, a user segment and an answer, up to the
cutoff), through the same ``prepare_batch`` / ``summed_token_loss`` as the recipe and the
config's optimizer and loss. Variants: bf16 LoRA and QLoRA (the QLoRA launch line of each
config's header), each with and without activation checkpointing; batch 8 and 4 at 1024 tokens.

Each result is one JSON line (peak ``torch.cuda.max_memory_allocated`` since the model was
built, in GiB; step times). ``MEASURED_H200`` in ``tools/estimate_memory.py`` holds one such run.
Usage::

    python tools/measure_memory.py [CONFIG_PREFIX ...] > memory.jsonl
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Dict, List

import torch

REPO = Path(__file__).resolve().parents[1]


def paper_models() -> List[str]:
    """The paper's models from ``configs/models/`` (data, not a list kept here)."""
    from mas.config import bundled_models

    return [m.name for m in bundled_models() if m.about.get("hf_id")]


def qlora_overrides(name: str) -> List[str]:
    """The QLoRA builder of the model file's ``qlora`` variant (activation checkpointing is a separate axis)."""
    from mas.config import load_config

    return [f"model._component_={load_config(name + '_qlora').model._component_}"]


def synthetic_batch(vocab: int, batch: int, seq: int) -> Dict[str, torch.Tensor]:
    """Rows of different lengths (the longest fills ``seq``): system | user | 24-token answer."""
    from mas.masks import CAUSAL, PAD

    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (batch, seq), generator=generator)
    segments = torch.full((batch, seq), PAD)
    labels = torch.full((batch, seq), -100)
    for i in range(batch):
        n, system, answer = seq - 8 * i, 40, 24
        segments[i, :system] = 0
        segments[i, system : n - answer] = 1
        segments[i, n - answer : n] = CAUSAL
        labels[i, n - answer : n] = tokens[i, n - answer : n]
    return {"tokens": tokens, "labels": labels, "segment_ids": segments}


def measure(name: str, *, qlora: bool, checkpointing: bool, batch: int, steps: int = 3) -> Dict:
    from torchtune import training
    from torchtune.modules import TransformerSelfAttentionLayer
    from torchtune.modules.peft import get_adapter_params, set_trainable_params

    from mas.attention import use_mas_attention
    from mas.config import instantiate, load_config
    from mas.training.steps import prepare_batch, summed_token_loss

    device = torch.device("cuda")
    cfg = load_config(name, qlora_overrides(name.removesuffix("_1024")) if qlora else [])
    seq = int(cfg.tokenizer.max_seq_len)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with training.set_default_dtype(torch.bfloat16), device:
        model = instantiate(cfg.model)
    set_trainable_params(model, get_adapter_params(model))
    if checkpointing:
        training.set_activation_checkpointing(model, auto_wrap_policy={TransformerSelfAttentionLayer})
    use_mas_attention(model, "auto")
    loss_fn = instantiate(cfg.loss)
    model.set_num_output_chunks(loss_fn.num_output_chunks)
    optimizer = instantiate(cfg.optimizer, [p for p in model.parameters() if p.requires_grad])
    weights = torch.cuda.memory_allocated()
    data = synthetic_batch(model.tok_embeddings.num_embeddings, batch, seq)
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        prepared = prepare_batch(data, attention="mas", device=device, backend="auto")
        summed_token_loss(model, loss_fn, prepared).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return dict(
        config=name, qlora=qlora, ac=checkpointing, batch=batch, seq=seq, mask=type(prepared.mask).__name__,
        weights_gib=weights / 2**30, peak_alloc_gib=torch.cuda.max_memory_allocated() / 2**30,
        peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30, step_s=times[-1], first_step_s=times[0],
    )  # fmt: skip


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prefixes", nargs="*", help="only configs starting with these")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("measure_memory.py needs a CUDA GPU")
    # Many model shapes: compiled flex attention must not hit the recompile limit (it would then
    # fall back to the unfused path, which materializes the scores).
    torch._dynamo.config.cache_size_limit = 64
    jobs = [(f"{k}_mas", q, ac, 8) for k in paper_models() for q in (False, True) for ac in (False, True)]
    jobs += [(f"{k}_mas_1024", False, ac, b) for k in ("llama3_2_1b", "llama3_2_3b", "qwen2_5_3b") for ac, b in ((False, 8), (False, 4), (True, 8))]
    print(f"# torch {torch.__version__}, {torch.cuda.get_device_name()}", file=sys.stderr)
    for name, qlora, ac, batch in jobs:
        if args.prefixes and not name.startswith(tuple(args.prefixes)):
            continue
        try:
            record = measure(name, qlora=qlora, checkpointing=ac, batch=batch)
        except Exception as e:  # one failing variant must not hide the others
            traceback.print_exc()
            record = dict(config=name, qlora=qlora, ac=ac, batch=batch, error=f"{type(e).__name__}: {e}"[:500])
        print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
