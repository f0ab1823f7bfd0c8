"""MAS on vLLM (``mas-vllm``): exact tokens on the backend vLLM picks, and what the mask costs.

Runs in the vLLM environment (``tools/make_vllm_env.sh``), on a GPU::

    ~/.cache/mas/vllm-env/bin/python tools/bench_vllm.py                 # CUDA; updates BENCHMARKS.md
    ~/.cache/mas/vllm-env/bin/python tools/bench_vllm.py --device cpu --tiny   # the mechanics on CPU

1. **Exact tokens.** A tiny Llama 3.2 (head_dim 32) with a MAS and a causal adapter of the same
   weights, in one engine: greedy tokens of vLLM with the plugin, on the attention backend vLLM
   selects, against ``mas.generate`` for the chats of the plugin's tests (the table names the
   backend). On CPU vLLM's only backend ignores the ranges, so ``--device cpu`` runs vLLM's
   FlexAttention through the plugin's test oracle (``integrations/vllm/tests/cpu_oracle.py``).
2. **Cost of the mask.** The Llama-3.2-1B shape (random weights, bf16 on CUDA): each request is a
   system segment and a user segment (token ids with their segments, ``--system-len`` +
   ``--user-len``) and ``--new-tokens`` greedy tokens; 1, 8 and 32 requests at once, offline
   (``LLM.generate``). MAS is the plugin's ``MasLlamaForCausalLM``; causal is stock vLLM's
   ``LlamaForCausalLM`` on the same weights and token ids, with the scheduler settings the plugin
   imposes (no chunked prefill, a token budget of ``max_model_len``), so the ratio is the mask and
   the backend it needs. Prefix caching is off (each prompt is computed).

``--tiny`` shrinks part 2 to the tiny shape and 1, 2 and 4 requests: a check of the script, not a
benchmark, so BENCHMARKS.md is left as it is (as with ``--no-write``).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, List, Sequence

# vLLM's engine in this process: the CPU test oracle patches reach it, and so does apply_model.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "integrations" / "vllm" / "tests"))  # the plugin's test helpers

NAME = "bench_vllm"
TITLE = "vLLM with the mas-vllm plugin: exact tokens and the cost of the mask (`tools/bench_vllm.py`)"
#: The Llama-3.2-1B shape (torchtune's llama3_2 builder arguments).
LLAMA3_2_1B = {"vocab_size": 128_256, "num_layers": 16, "num_heads": 32, "num_kv_heads": 8, "embed_dim": 2048, "intermediate_dim": 8192, "max_seq_len": 2048}


def _oracle(device: str) -> Any:
    if device != "cpu":
        return nullcontext()
    from cpu_oracle import cpu_flex_oracle

    return cpu_flex_oracle()


def _collect() -> None:
    """After the caller's ``del llm``: the engine shuts down now, before the next one starts (an
    engine collected later tears down the process groups its successor set up)."""
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def exact_tokens(device: str, root: Path) -> List[Dict[str, str]]:
    """Part 1: one row per adapter (tokens equal / compared, the backend vLLM used)."""
    from helpers import CHATS, llm_kwargs, mas_reference, write_adapter, write_model
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from mas_vllm.models import _attention_backends

    model = write_model("llama", root / "exact", adapter_attention="mas")
    adapters = {"mas": model.adapter, "causal": write_adapter(model, root / "exact" / "causal_run", "causal")}
    prompts = [{"messages": chat} for chat in CHATS]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    rows = []
    with _oracle(device):
        llm = LLM(**llm_kwargs(model, mas_entry=str(adapters["mas"]), lora=True, max_loras=2))
        try:
            (backends,) = llm.apply_model(lambda m: sorted({b.get_name() for b in _attention_backends(m)}))
            for lora_id, (mode, folder) in enumerate(adapters.items(), start=1):
                want = mas_reference(model, prompts, attention=mode, adapter=True, max_new_tokens=16).tokens
                outs = llm.chat(CHATS, params, lora_request=LoRARequest(mode, lora_id, str(folder)), use_tqdm=False)
                got = [list(o.outputs[0].token_ids) for o in outs]
                equal = sum(g == w for g, w in zip(got, want))
                rows.append({"adapter": mode, "sequences equal to mas.generate": f"{equal}/{len(want)}", "backend": ", ".join(backends)})
        finally:
            del llm
            _collect()
    return rows


def _prompts(count: int, system_len: int, user_len: int, vocab: int, seed: int) -> List[Dict[str, Any]]:
    """``count`` requests: one shared system segment, then a distinct user segment each."""
    import random

    rng = random.Random(seed)
    system = [rng.randrange(1, vocab) for _ in range(system_len)]
    prompts = []
    for _ in range(count):
        user = [rng.randrange(1, vocab) for _ in range(user_len)]
        items = [{"start": 0, "token_ids": system}, {"start": system_len, "token_ids": user}]
        prompts.append({"prompt_token_ids": system + user, "multi_modal_data": {"mas_segment": items}})
    return prompts


def _engine(mode: str, folder: Path, *, dtype: str, max_model_len: int, max_num_seqs: int, memory: Dict[str, Any], enforce_eager: bool) -> Any:
    from vllm import LLM

    common = dict(
        model=str(folder), dtype=dtype, seed=0, max_model_len=max_model_len, max_num_seqs=max_num_seqs, enable_prefix_caching=False,
        enable_chunked_prefill=False, max_num_batched_tokens=max_model_len, enforce_eager=enforce_eager, **memory,
    )
    if mode == "mas":
        return LLM(tokenizer_mode="mas", hf_overrides={"architectures": ["MasLlamaForCausalLM"], "mas": {"attention": "mas", "prompt_format": "chat"}}, **common)
    return LLM(skip_tokenizer_init=True, **common)


def throughput(device: str, root: Path, *, tiny: bool, concurrency: Sequence[int], system_len: int, user_len: int, new_tokens: int, rounds: int) -> List[Dict[str, str]]:
    """Part 2: one row per (mode, requests at once): median wall time and output tokens/s."""
    from helpers import DIMS
    from vllm import SamplingParams

    from mas.testing import write_tiny_checkpoint

    dims = DIMS if tiny else LLAMA3_2_1B
    folder = root / "shape"
    write_tiny_checkpoint("llama3_2", folder, seed=3, **dims)
    vocab = dims.get("vocab_size", 1000)
    max_model_len = system_len + user_len + new_tokens
    memory = {"kv_cache_memory_bytes": 64 << 20} if device == "cpu" else {"gpu_memory_utilization": 0.35}
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True, detokenize=False)
    prompts = _prompts(max(concurrency), system_len, user_len, vocab, seed=5)
    seconds: Dict[str, Dict[int, float]] = {}
    for mode in ("causal", "mas"):
        asked = prompts if mode == "mas" else [{"prompt_token_ids": p["prompt_token_ids"]} for p in prompts]
        with _oracle(device) if mode == "mas" else nullcontext():
            llm = _engine(mode, folder, dtype="float32" if device == "cpu" else "bfloat16", max_model_len=max_model_len, max_num_seqs=max(concurrency), memory=memory, enforce_eager=device == "cpu")
            try:
                llm.generate(asked[:1], params, use_tqdm=False)  # warm-up
                seconds[mode] = {}
                for n in concurrency:
                    times = []
                    for _ in range(rounds):
                        begin = time.perf_counter()
                        outs = llm.generate(asked[:n], params, use_tqdm=False)
                        times.append(time.perf_counter() - begin)
                        assert all(len(o.outputs[0].token_ids) == new_tokens for o in outs)
                    seconds[mode][n] = sorted(times)[len(times) // 2]
            finally:
                del llm
                _collect()
    rows = []
    for n in concurrency:
        for mode in ("causal", "mas"):
            s = seconds[mode][n]
            rows.append({
                "requests at once": str(n), "mode": "MAS (plugin)" if mode == "mas" else "causal (stock vLLM)",
                "wall s (median)": f"{s:.3f}", "output tokens/s": f"{n * new_tokens / s:,.0f}",
                "MAS / causal time": f"{s / seconds['causal'][n]:.2f}" if mode == "mas" else "",
            })
    return rows


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny shape, 1/2/4 requests: a check, never written")
    parser.add_argument("--system-len", type=int, default=None, help="system segment tokens (default 128; tiny 16)")
    parser.add_argument("--user-len", type=int, default=None, help="user segment tokens (default 384; tiny 32)")
    parser.add_argument("--new-tokens", type=int, default=None, help="generated tokens per request (default 128; tiny 8)")
    parser.add_argument("--rounds", type=int, default=3, help="timed repeats per point (median)")
    parser.add_argument("--skip-exact", action="store_true", help="part 2 only")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md")
    args = parser.parse_args(argv)
    import importlib.util

    missing = [name for name in ("vllm", "mas_vllm") if importlib.util.find_spec(name) is None]
    if missing:
        parser.error(f"needs vLLM and the mas-vllm plugin (missing here: {', '.join(missing)}): run it with the vLLM venv's python (tools/make_vllm_env.sh)")
    from mas.testing.benchlib import BENCHMARKS_FILE, machine_description, markdown_table, update_section

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here (use --device cpu --tiny to check the script)")
    tiny = args.tiny
    system_len = args.system_len or (16 if tiny else 128)
    user_len = args.user_len or (32 if tiny else 384)
    new_tokens = args.new_tokens or (8 if tiny else 128)
    concurrency = (1, 2, 4) if tiny else (1, 8, 32)
    import vllm

    parts = [f"Machine: {machine_description(torch.device(args.device))}; vLLM {vllm.__version__}, {time.strftime('%Y-%m-%d')}."]
    with tempfile.TemporaryDirectory(prefix="bench_vllm_") as scratch:
        root = Path(scratch)
        if not args.skip_exact:
            parts.append("Greedy tokens, 16 per chat, 4 chats, tiny Llama 3.2 (head_dim 32), one engine holding both adapters:\n\n" + markdown_table(exact_tokens(args.device, root)))
        shape = "tiny Llama 3.2 (a check)" if tiny else "Llama-3.2-1B shape, random weights, bf16"
        rows = throughput(args.device, root, tiny=tiny, concurrency=concurrency, system_len=system_len, user_len=user_len, new_tokens=new_tokens, rounds=args.rounds)
        parts.append(
            f"Offline `LLM.generate`, {shape}: a {system_len}-token system segment and a {user_len}-token user segment per "
            f"request, {new_tokens} greedy tokens, prefix caching off, no chunked prefill for either mode, median of {args.rounds}:\n\n" + markdown_table(rows)
        )
    body = "\n\n".join(parts)
    print(body)
    if args.no_write or tiny:
        print("(BENCHMARKS.md left as it is)")
    else:
        update_section(BENCHMARKS_FILE, NAME, TITLE, args.device, f"### {args.device}\n\n{body}")
        print(f"updated {BENCHMARKS_FILE}")
    return body


if __name__ == "__main__":
    main()
