"""Benchmark generation: MAS vs causal prefill, decoding, torchtune's generate, the bandwidth roofline.

Measured on one model with random weights (tiny on CPU, Llama-3.2-1B shape on CUDA):

- prefill latency of one prompt batch, MAS mask vs causal mask on the same path (target
  MAS / causal <= 1.05), with the LM head on each row's last slot as ``mas.generate`` runs it,
  and beside it the same MAS prefill projecting every slot to the vocabulary (as before);
- decode tokens/s after a MAS vs a causal prefill (decoding is causal in both; target >= 0.98),
  through ``mas.generate`` (the inference engine: one decode step with sampling and stops on the
  device, a host read every 8 tokens, native grouped-query attention, widths bucketed);
- greedy tokens/s of ``mas.generate`` against torchtune's ``generate`` on the same model and prompt;
- the compiled decode step in each ``torch.compile`` mode side by side (CUDA: ``default`` and
  ``reduce-overhead``, i.e. CUDA graphs; CPU: ``default``); on CUDA as a fraction of the
  memory-bandwidth roofline (every weight and the written KV cache read once per token, at the
  device-to-device copy bandwidth measured in the same run);
- a ``torch.profiler`` summary of a few compiled decode steps per mode, taken inside a real
  generation after the prefill (top kernels, GPU-busy fraction, kernels per token), so a missed
  target comes with what limits it.

Usage::

    python tools/bench_generation.py                   # CPU, tiny model
    python tools/bench_generation.py --device cuda     # GPU, Llama-3.2-1B shape, bf16
    python tools/bench_generation.py --device cuda --profile-dir gpu_logs   # also keep the traces
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import statistics
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

import mas
from mas import use_mas_attention
from mas.generation import GenerationSettings, InferenceEngine, compiled_decode_step, install_slot_caches, layout_chunks, prefill
from mas.generation.slot_cache import remove_caches
from mas.segments import SegmentedSequence
from mas.testing import benchmark_model, random_prompt
from mas.testing.benchlib import BENCHMARKS_FILE, interleaved_median_ms, machine_description, markdown_table, update_section
from mas.testing.profiling import ProfilerWindow, ProfileSummary

NAME = "bench_generation"
TITLE = "Generation: MAS vs causal prefill and decode, torchtune's generate, roofline (`tools/bench_generation.py`)"


def prompt(length: int, vocab: int, seed: int = 0) -> SegmentedSequence:
    """A system segment (1/4) and a user segment (3/4) of random tokens."""
    return random_prompt(length, vocab, system=length // 4, seed=seed)


def copy_bandwidth_gbs(device: torch.device) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), GB/s."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    ms = interleaved_median_ms({"copy": lambda: y.copy_(x)}, device, warmup=3, min_repeats=10)["copy"]
    return 2 * x.numel() / (ms / 1e3) / 1e9


def compile_modes(device: torch.device) -> List[str]:
    """``torch.compile`` modes of the decode step to compare: CUDA graphs need CUDA."""
    return ["default", "reduce-overhead"] if device.type == "cuda" else ["default"]


def profile_decode_steps(
    model, seq: SegmentedSequence, settings: GenerationSettings, steps: int, trace_path: Optional[Path] = None, skip: int = 4
) -> ProfileSummary:
    """Profile ``steps`` decode steps of one ``mas.generate`` generation, after ``skip`` steps.

    The generation runs with the compiled step of ``settings.compile_mode`` (warmed up by the
    timed rounds), wrapped so that the profiler window opens before decode step ``skip + 1``
    and closes after ``skip + steps``: prefill and the first steps stay out of the summary.
    """
    if settings.max_new_tokens < skip + steps + 1:
        raise ValueError(f"--profile-steps {steps} needs --new-tokens >= {skip + steps + 1}")
    device = model.tok_embeddings.weight.device
    compiled = compiled_decode_step(settings.compile_mode)
    window = ProfilerWindow(device, trace_path=trace_path)
    calls = 0

    def step(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == skip + 1:
            window.start()
        out = compiled(*args, **kwargs)
        if calls == skip + steps:
            summary.append(window.stop(steps))
        return out

    summary: List[ProfileSummary] = []
    settings = dataclasses.replace(settings, batch_size=1)  # one row, as mas.generate makes for one prompt
    with InferenceEngine(model, settings) as engine:
        engine._step_fn = step  # the engine's compiled step, inside a profiler window
        mas.generate(model, [seq], settings=settings, engine=engine)
    return summary[0]


def decode_tokens_per_s(model, seq: SegmentedSequence, settings: GenerationSettings) -> float:
    """Decoded tokens per second of one ``mas.generate`` call (the engine's own decode clock)."""
    return mas.generate(model, [seq], settings=settings).decode_tokens_per_s


def bench(args: argparse.Namespace) -> str:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backend = "flex" if device.type == "cuda" else "sdpa"
    model = benchmark_model(args.model, device, dtype)
    use_mas_attention(model, "auto")
    vocab = model.tok_embeddings.num_embeddings
    cache_len = min(max(args.prompt_lens) + args.new_tokens + 8, model.max_seq_len)
    rows, decode_rows = [], []

    for length in args.prompt_lens:
        for batch_size in args.batch_sizes:
            seqs = [prompt(length, vocab, seed=i) for i in range(batch_size)]
            layout = layout_chunks(seqs, [len(s) for s in seqs], start=0).to(device)
            caches = install_slot_caches(model, batch_size, cache_len, dtype)

            # As mas.generate runs it: the LM head on each row's last slot only.
            last_slot = torch.full((batch_size,), layout.num_slots - 1, dtype=torch.long, device=device)

            def run_prefill(attention: str, every_slot: bool = False):
                def fn():
                    caches.plan_rows(list(range(batch_size)), layout.positions, layout.num_slots, start=0)
                    with torch.inference_mode():
                        prefill(model, layout, attention=attention, backend=backend, logits_at=None if every_slot else last_slot)

                return fn

            ms = interleaved_median_ms(
                {"mas": run_prefill("mas"), "causal": run_prefill("causal"), "every slot": run_prefill("mas", every_slot=True)},
                device,
                budget_s=2.0,
            )
            rows.append(
                {
                    "prompt": str(length),
                    "batch": str(batch_size),
                    "prefill MAS (ms)": f"{ms['mas']:.2f}",
                    "prefill causal (ms)": f"{ms['causal']:.2f}",
                    "MAS / causal": f"{ms['mas'] / ms['causal']:.3f}",
                    "MAS, logits of every slot (ms)": f"{ms['every slot']:.2f}",
                }
            )

    # Decode after a MAS and after a causal prefill, and torchtune's generate, batch 1. The
    # compiled step in each compile mode side by side: reduce-overhead replays CUDA graphs (one
    # launch per token), default launches every kernel from the host.
    length = args.prompt_lens[0]
    seq = prompt(length, vocab)
    remove_caches(model)
    modes = compile_modes(device)
    mode = modes[-1]  # the best mode of the device
    compiled_names = {m: f"MAS compiled ({m})" for m in modes}
    decode: Dict[str, List[float]] = {
        "MAS": [],
        "causal": [],
        **{name: [] for name in compiled_names.values()},
        "torchtune generate": [],
    }
    settings = {
        "MAS": GenerationSettings(attention="mas", max_new_tokens=args.new_tokens, max_cache_len=cache_len, stop_tokens=[]),
        "causal": GenerationSettings(attention="causal", max_new_tokens=args.new_tokens, max_cache_len=cache_len, stop_tokens=[]),
        **{
            name: GenerationSettings(
                attention="mas", max_new_tokens=args.new_tokens, max_cache_len=cache_len, stop_tokens=[], compile_decode=True, compile_mode=m
            )
            for m, name in compiled_names.items()
        },
    }
    from torchtune.generation import generate as tt_generate

    def torchtune_run() -> float:
        remove_caches(model)
        with device:
            model.setup_caches(batch_size=1, dtype=dtype, decoder_max_seq_len=cache_len)
        prompt_ids = torch.tensor(seq.tokens, device=device)
        start = time.perf_counter()
        with torch.inference_mode():
            tt_generate(model, prompt_ids, max_generated_tokens=args.new_tokens, pad_id=0, temperature=1.0, top_k=1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        remove_caches(model)
        return args.new_tokens / (time.perf_counter() - start)

    for round_index in range(args.rounds + 1):
        # Alternate the order each round: whichever runs first after torchtune's run pays for
        # re-allocating the caches' memory, and that must not count against one variant.
        names = list(settings) if round_index % 2 else list(reversed(settings))
        for name in names:
            tokens_per_s = decode_tokens_per_s(model, seq, settings[name])
            if round_index:  # round 0 warms up (and compiles)
                decode[name].append(tokens_per_s)
        tokens_per_s = torchtune_run()
        if round_index:
            decode["torchtune generate"].append(tokens_per_s)
    median = {k: statistics.median(v) for k, v in decode.items()}
    for name, value in median.items():
        decode_rows.append({"batch 1, greedy": name, "tokens/s": f"{value:,.1f}", "vs MAS": f"{value / median['MAS']:.3f}"})

    notes = [
        f"- decode after a MAS prefill / after a causal prefill: {median['MAS'] / median['causal']:.3f} (target >= 0.98)",
        f"- mas.generate (eager) / torchtune generate: {median['MAS'] / median['torchtune generate']:.2f}x; compiled "
        f"({mode}): {median[compiled_names[mode]] / median['torchtune generate']:.2f}x",
    ]
    if len(modes) > 1:
        notes.append(
            f"- compiled decode, reduce-overhead (CUDA graphs) / default: "
            f"{median[compiled_names['reduce-overhead']] / median[compiled_names['default']]:.2f}x"
        )
    if device.type == "cuda":
        params = sum(p.numel() for p in model.parameters())
        layer = model.layers[0].attn
        kv_bytes = 2 * len(model.layers) * layer.num_kv_heads * layer.head_dim * (length + args.new_tokens / 2) * 2
        bytes_per_token = params * 2 + kv_bytes
        bandwidth = copy_bandwidth_gbs(device)
        roofline = bandwidth * 1e9 / bytes_per_token
        reached = "; ".join(
            f"{m}: {median[name]:,.0f} tokens/s = {median[name] / roofline:.0%}" for m, name in compiled_names.items()
        )
        notes.append(
            f"- roofline: {params / 1e9:.2f}B bf16 parameters + KV cache = {bytes_per_token / 1e9:.2f} GB read per token; "
            f"measured copy bandwidth {bandwidth:,.0f} GB/s -> {roofline:,.0f} tokens/s; compiled batch-1 decode reaches "
            f"{reached} of the roofline (target >= 50%)"
        )
    timings = "\n".join(
        [
            f"### {device.type}",
            "",
            f"Measured {datetime.date.today().isoformat()} with `python tools/bench_generation.py --device {device.type} --model {args.model} "
            f"--rounds {args.rounds} --new-tokens {args.new_tokens}`.",
            f"Machine: {machine_description(device)}.",
            f"Model: {args.model} shape, random weights, {str(dtype).replace('torch.', '')}. Prompts: random tokens, a system segment (1/4) "
            f"and a user segment (3/4). Prefill on {'compiled FlexAttention (BlockMask)' if device.type == 'cuda' else 'SDPA with the dense mask'}; "
            f"decode: SDPA over the KV cache (compiled step: modes {', '.join(modes)}). Medians of interleaved repeats; decode over {args.new_tokens} new tokens after a {length}-token prompt, {args.rounds} rounds.",
            "",
            "**Prefill latency** (the LM head on each row's last slot, as `mas.generate` runs it; the last column projects every slot)",
            "",
            markdown_table(rows),
            "",
            "**Decode throughput**",
            "",
            markdown_table(decode_rows),
            "",
            *notes,
        ]
    )
    print(timings, flush=True)
    if not args.no_write:  # the timings are safe before the profiler runs
        update_section(BENCHMARKS_FILE, NAME, TITLE, args.device, timings)
    profiles = []
    if args.profile_steps:
        for m, name in compiled_names.items():
            trace = Path(args.profile_dir) / f"bench_generation_decode_{m}.trace.json.gz" if args.profile_dir else None
            summary = profile_decode_steps(model, seq, settings[name], args.profile_steps, trace)
            profiles.append(
                summary.markdown(f"batch-1 decode steps compiled with mode {m} ({name})", "token", measured_ms=1e3 / median[name])
            )
        if args.profile_dir:
            Path(args.profile_dir).mkdir(parents=True, exist_ok=True)
            (Path(args.profile_dir) / "bench_generation_decode_profile.md").write_text("\n\n".join(profiles) + "\n")
        print("\n" + "\n\n".join(profiles), flush=True)
    return "\n\n".join([timings, *profiles])


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default=None, help="tiny (CPU default) or llama3_2_1b (CUDA default)")
    parser.add_argument("--prompt-lens", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile-steps", type=int, default=16, help="decode steps profiled per compile mode (0: none)")
    parser.add_argument("--profile-dir", default=None, help="also write the profile summaries and Chrome traces here")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    args.model = args.model or ("llama3_2_1b" if args.device == "cuda" else "tiny")
    report = bench(args)  # prints (and writes) the timings, then profiles
    if not args.no_write:
        update_section(BENCHMARKS_FILE, NAME, TITLE, args.device, report)


if __name__ == "__main__":
    main()
