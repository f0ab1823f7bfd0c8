"""Benchmark the serving engine: continuous batching vs one request at a time, and the prefix cache.

Measured on the engine behind ``tune run mas_serve`` (in process, no HTTP, so the numbers are the
engine's; the HTTP layer adds a constant per request), with random weights (tiny on CPU,
Llama-3.2-1B shape on CUDA) and random-token prompts (a system and a user segment):

- throughput (generated tokens/s) and p50/p99 request latency with 1, 8 and 32 concurrent
  clients, each sending its next request when the previous one ends, against the same requests
  run one at a time through ``mas.generate``;
- time to first token of a request with a ``--system-len``-token (500) system prompt: cold (a
  system prompt never seen) vs warm (its keys and values copied from the prefix cache);
- time to first token when 8 requests arrive at once (one batched prefill);
- the stall of a running stream when a long multi-segment prompt arrives: the longest gap
  between two of its tokens while the arrival is prefilled, with the default prefill chunk and
  a small one (the chunks end at segment boundaries; a segment is never split).

With ``--http`` it measures the HTTP server itself (``create_app`` under uvicorn on 127.0.0.1,
the tiny tokenizer, random weights): the p50/p99/max inter-token gap of a running stream while
nothing else arrives, while long prompts arrive, while a 10 MB body arrives (refused with 413
past ``max_request_bytes``, read no further) and while a 3.5 MB prompt is parsed and tokenized
(off the event loop, then refused for its length); and the prefill tokens that identical-prompt
reuse saves for ``n`` choices and repeated prompts.

With ``--compile-decode`` it measures instead the engine's eager decode against its compiled one
(``mas_serve compile_decode=True``) side by side: two engines on copies of one model, each warmed
up over the lengths the run reaches (so every width bucket is compiled before timing), the client
levels interleaved over ``--rounds`` rounds, medians reported; written to its own subsection.

Usage::

    python tools/bench_serve.py                  # CPU, tiny model
    python tools/bench_serve.py --device cuda    # GPU, Llama-3.2-1B shape, bf16
    python tools/bench_serve.py --no-write       # print only
    python tools/bench_serve.py --compile-decode --clients 1 8 --requests 32   # eager vs compiled decode
    python tools/bench_serve.py --http           # the HTTP server under large bodies and long prompts
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import datetime
import statistics
import threading
import time
from typing import Dict, List, Optional, Tuple

import torch

import mas
from mas.generation import GenerationSettings, PrefixCache
from mas.segments import SegmentedSequence
from mas.serving import Engine, SamplingParams, SequenceHandle
from mas.testing import benchmark_model, random_prompt
from mas.testing.benchlib import BENCHMARKS_FILE, machine_description, markdown_table, update_section

NAME = "bench_serve"
TITLE = "Serving: continuous batching and the segment-prefix cache (`tools/bench_serve.py`)"


class _SilentTokenizer:
    """Random-token prompts have no text: nothing to decode, no stop token."""

    stop_tokens: List[int] = []
    eos_id = -1

    def decode(self, ids: List[int]) -> str:
        return ""


def _engine(model: torch.nn.Module, rows: int, max_len: int, *, max_queue: int = 64, prefix_cache: Optional[PrefixCache] = None, **settings) -> Engine:
    """A started server engine of ``rows`` rows (no stop tokens: random prompts)."""
    config = GenerationSettings(attention="mas", batch_size=rows, max_cache_len=max_len, reuse_system_cache=prefix_cache is not None, **settings)
    return Engine(model, _SilentTokenizer(), config, max_queue=max_queue, prefix_cache=prefix_cache).start()


def _run_one(engine: Engine, prompt: SegmentedSequence, max_tokens: int) -> SequenceHandle:
    done = threading.Event()
    handle = SequenceHandle(prompt, SamplingParams(max_tokens=max_tokens, ignore_stop_tokens=True), lambda e: done.set() if e.kind in ("finish", "error") else None)
    engine.submit([handle])
    done.wait()
    return handle


def _percentile(values: List[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _concurrent(engine: Engine, prompts: List[SegmentedSequence], clients: int, max_tokens: int) -> Dict[str, float]:
    """Clients each send requests back to back; returns tokens/s and latency percentiles (ms)."""
    latencies: List[float] = []
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        handles = list(pool.map(lambda p: _run_one(engine, p, max_tokens), prompts))
    elapsed = time.perf_counter() - start
    latencies = [(h.request.finished_at - h.submitted_at) * 1e3 for h in handles]
    tokens = sum(len(h.tokens) for h in handles)
    return {"tok_s": tokens / elapsed, "p50": _percentile(latencies, 0.5), "p99": _percentile(latencies, 0.99)}


def _sequential_generate(model: torch.nn.Module, prompts: List[SegmentedSequence], max_tokens: int) -> Dict[str, float]:
    """``mas.generate`` one request at a time, each with a KV cache just big enough for it (its
    torchtune cache is read whole every step, so a bigger one only costs)."""
    latencies = []
    start = time.perf_counter()
    for p in prompts:
        t = time.perf_counter()
        mas.generate(model, [p], max_new_tokens=max_tokens, batch_size=1, max_cache_len=len(p) + max_tokens)
        latencies.append((time.perf_counter() - t) * 1e3)
    elapsed = time.perf_counter() - start
    return {"tok_s": len(prompts) * max_tokens / elapsed, "p50": _percentile(latencies, 0.5), "p99": _percentile(latencies, 0.99)}


def _ttft_ms(engine: Engine, prompts: List[SegmentedSequence]) -> List[float]:
    handles = [_run_one(engine, p, 1) for p in prompts]
    return [(h.first_token_at - h.submitted_at) * 1e3 for h in handles]


def _workload(args: argparse.Namespace) -> Tuple[torch.device, torch.dtype, torch.nn.Module, List[SegmentedSequence]]:
    """The device, dtype, benchmark model and throughput prompts (``prompt_len`` to
    ``prompt_len + 24`` tokens, a quarter of them system prompt) of a run."""
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = benchmark_model(args.model, device, dtype)
    vocab = model.tok_embeddings.num_embeddings
    requests = max(args.requests, max(args.clients))
    prompts = [random_prompt(args.prompt_len + (i % 4) * 8, vocab, system=args.prompt_len // 4, seed=i) for i in range(requests)]
    return device, dtype, model, prompts


def _report(title: str, device: torch.device, *paragraphs: str) -> str:
    """A section of the report: its title with the date, the machine, then the paragraphs."""
    when = datetime.date.today().isoformat()
    return "\n\n".join([f"### {title} ({when})", f"Machine: {machine_description(device)}.", *paragraphs])


def bench(args: argparse.Namespace) -> str:
    device, dtype, model, prompts = _workload(args)
    vocab = model.tok_embeddings.num_embeddings
    requests = len(prompts)
    # The longest prompt: a throughput prompt (prompt_len + 24) or a system prompt + its 32-token user turn.
    cache_len = max(args.prompt_len + 24, args.system_len + 32) + args.new_tokens + 8
    _sequential_generate(model, prompts[:2], args.new_tokens)  # warm-up
    reference = _sequential_generate(model, prompts, args.new_tokens)

    rows = []
    engine = _engine(model, max(args.clients), cache_len, max_queue=requests)
    try:
        _concurrent(engine, prompts[:4], 4, 4)  # warm-up
        rows.append({"clients": "1 (mas.generate, one at a time)", "tokens/s": f"{reference['tok_s']:.0f}", "p50 latency ms": f"{reference['p50']:.0f}", "p99 latency ms": f"{reference['p99']:.0f}", "speed-up": "1.00"})
        for clients in args.clients:
            out = _concurrent(engine, prompts, clients, args.new_tokens)
            rows.append(
                {
                    "clients": f"{clients} (engine)",
                    "tokens/s": f"{out['tok_s']:.0f}",
                    "p50 latency ms": f"{out['p50']:.0f}",
                    "p99 latency ms": f"{out['p99']:.0f}",
                    "speed-up": f"{out['tok_s'] / reference['tok_s']:.2f}",
                }
            )
    finally:
        engine.stop()

    # Cold vs warm system prompt: random system prompts of system_len tokens, a short user turn.
    n = args.ttft_repeats
    cached = _engine(model, 1, cache_len, prefix_cache=PrefixCache(max_tokens=1 << 20, max_bytes=1 << 34))
    try:
        def with_system(seed: int, user_seed: int) -> SegmentedSequence:
            system = random_prompt(args.system_len, vocab, system=args.system_len, seed=10_000 + seed)
            user = random_prompt(32, vocab, system=0, seed=20_000 + user_seed)
            return SegmentedSequence(system.tokens + user.tokens, system.labels + user.labels, [0] * args.system_len + [1] * 32)

        _ttft_ms(cached, [with_system(-1, -1), with_system(-1, -2)])  # warm-up
        cold = _ttft_ms(cached, [with_system(i, i) for i in range(n)])  # a new system prompt each
        warm = _ttft_ms(cached, [with_system(i, n + i) for i in range(n)])  # seen system, new user turn
        saved = cached.prefix_cache.stats.saved_tokens
    finally:
        cached.stop()
    cold_ms, warm_ms = statistics.median(cold), statistics.median(warm)
    ttft = [
        {"system prompt": f"cold ({args.system_len} tokens prefilled)", "TTFT ms (median)": f"{cold_ms:.1f}"},
        {"system prompt": "warm (copied from the prefix cache)", "TTFT ms (median)": f"{warm_ms:.1f}"},
        {"system prompt": "warm / cold", "TTFT ms (median)": f"{warm_ms / cold_ms:.2f}"},
    ]
    burst = _burst_ttft_ms(model, prompts[:8], cache_len)
    stalls = [_stall(model, args, vocab, chunk) for chunk in (None, args.stall_chunk)]
    return _report(
        f"{device.type.upper()}: {args.model} model, random weights, {dtype}",
        device,
        f"Throughput and latency: {requests} requests of {args.prompt_len}-{args.prompt_len + 24} prompt tokens and {args.new_tokens} "
        f"generated tokens each (stop tokens ignored), clients sending back to back; the engine has one KV-cache row per client. "
        "Both run the one inference engine; `mas.generate` reads the device every 8 decode steps, the server streams (a read "
        "every step) through its thread and events, which costs it some speed at 1 client; rows that join and leave between "
        "steps pay off as clients are added.",
        markdown_table(rows),
        f"Time to first token with a {args.system_len}-token system prompt and a 32-token user turn, one request at a time, "
        f"median of {n} (warm requests copied {saved} prompt tokens in all instead of prefilling them):",
        markdown_table(ttft),
        f"Time to first token when 8 requests ({args.prompt_len}-{args.prompt_len + 24} prompt tokens) arrive at once on an idle "
        f"8-row engine (one batched prefill): median {statistics.median(burst):.1f} ms, max {max(burst):.1f} ms.",
        f"Stall of a running stream (1 request decoding) when a {args.stall_segments} x {args.stall_segment_len}-token prompt "
        "(a system segment and user segments, as a long chat) arrives; the gap is the longest time between two tokens of the "
        "running stream while the arrival is prefilled, against its median gap. With a chunk the arrival is prefilled a few "
        "segments per step between the running stream's tokens:",
        markdown_table(stalls),
    )


def _burst_ttft_ms(model: torch.nn.Module, prompts: List[SegmentedSequence], cache_len: int) -> List[float]:
    """Time to first token of each of ``len(prompts)`` requests submitted together."""
    engine = _engine(model, len(prompts), cache_len)
    try:
        _concurrent(engine, prompts, len(prompts), 2)  # warm-up
        done = [threading.Event() for _ in prompts]
        handles = [
            SequenceHandle(p, SamplingParams(max_tokens=2, ignore_stop_tokens=True), lambda e, d=d: d.set() if e.kind in ("finish", "error") else None)
            for p, d in zip(prompts, done)
        ]
        engine.submit(handles)
        for d in done:
            d.wait()
    finally:
        engine.stop()
    return [(h.first_token_at - h.submitted_at) * 1e3 for h in handles]


def _stall(model: torch.nn.Module, args: argparse.Namespace, vocab: int, chunk: Optional[int]) -> Dict[str, str]:
    """The running stream's longest inter-token gap while a long prompt arrives (ms)."""
    segments, length = args.stall_segments, args.stall_segment_len
    long_prompt = random_prompt(segments * length, vocab, system=length, seed=99)
    long_prompt = SegmentedSequence(long_prompt.tokens, long_prompt.labels, [i // length for i in range(segments * length)])
    running = random_prompt(args.prompt_len, vocab, system=args.prompt_len // 4, seed=98)
    cache_len = min(segments * length + 4 * args.new_tokens + args.prompt_len, model.max_seq_len)
    engine = _engine(model, 2, cache_len, prefill_chunk_tokens=chunk)
    try:
        _concurrent(engine, [long_prompt, running], 2, 2)  # warm-up
        stamps: List[float] = []
        finished = threading.Event()

        def on_event(event) -> None:
            stamps.append(time.perf_counter())
            if event.kind in ("finish", "error"):
                finished.set()

        stream = SequenceHandle(running, SamplingParams(max_tokens=4 * args.new_tokens, ignore_stop_tokens=True), on_event)
        engine.submit([stream])
        while len(stamps) < 8:
            time.sleep(0.001)
        arrived = time.perf_counter()
        arrival = _run_one(engine, long_prompt, 1)
        prefilled = arrival.first_token_at
        finished.wait()
    finally:
        engine.stop()
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    during = [b - a for a, b in zip(stamps, stamps[1:]) if b >= arrived and a <= prefilled]
    return {
        "prefill chunk": f"{chunk} tokens" if chunk else "none (whole prompt)",
        "arrival's TTFT ms": f"{(prefilled - arrived) * 1e3:.0f}",
        "longest gap of the running stream ms": f"{max(during) * 1e3:.0f}",
        "its median gap ms": f"{statistics.median(gaps) * 1e3:.1f}",
    }


def _http_server(model: torch.nn.Module, rows: int) -> Tuple[str, object, object]:
    """``create_app`` for ``model`` under uvicorn in a thread on a free 127.0.0.1 port (tiny_serve's
    tokenizer and keys); returns its URL, the uvicorn server and the state."""
    import socket

    import uvicorn

    from mas.config import instantiate, load_config, to_options
    from mas.segments import SegmentBuilder
    from mas.serving import ServedModel, ServeOptions, create_app, server_state

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    opts = to_options(load_config("tiny_serve", [f"port={port}", f"max_num_seqs={rows}"]), ServeOptions, "mas_serve")
    tokenizer = instantiate(opts.tokenizer)
    settings = GenerationSettings(attention="mas", batch_size=rows, max_cache_len=model.max_seq_len, reuse_system_cache=True)
    engine = Engine(model, tokenizer, settings, max_queue=opts.max_queue, prefix_cache=PrefixCache(1 << 20, 1 << 32))
    state = server_state(opts, {"bench": ServedModel("bench", engine, SegmentBuilder(tokenizer), "mas")}, [])
    server = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=port, log_level="error", log_config=None))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    return f"http://127.0.0.1:{port}", server, state


def _gaps_while(url: str, disturb, new_tokens: int) -> Dict[str, float]:
    """Stream one chat (``new_tokens``, stop tokens ignored); after its 8th token run ``disturb()``
    in another thread; the stream's inter-token gaps while it ran (ms percentiles), and what
    ``disturb`` returned."""
    import httpx

    body = {"model": "bench", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count slowly."}], "max_tokens": new_tokens, "ignore_eos": True, "temperature": 0, "stream": True}
    stamps: List[float] = []
    window: Dict[str, float] = {}
    result: Dict[str, object] = {}

    def run() -> None:
        window["start"] = time.perf_counter()
        result["value"] = disturb()
        window["end"] = time.perf_counter()

    worker = threading.Thread(target=run)
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                stamps.append(time.perf_counter())
                if len(stamps) == 8:
                    worker.start()
    worker.join()
    during = [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:]) if b >= window["start"] and a <= window["end"]]
    during = during or [0.0]
    return {"p50": _percentile(during, 0.5), "p99": _percentile(during, 0.99), "max": max(during), "seconds": window["end"] - window["start"], "result": result["value"]}  # type: ignore[dict-item]


def bench_http(args: argparse.Namespace) -> str:
    import httpx

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = benchmark_model(args.model, device, dtype)
    url, server, state = _http_server(model, rows=4)
    words = " ".join(f"w{i}" for i in range(40))
    try:
        post = lambda body, **kw: httpx.post(f"{url}/v1/chat/completions", timeout=300, **kw, **({"json": body} if body is not None else {}))  # noqa: E731

        def nothing() -> str:
            time.sleep(0.5)
            return "-"

        def long_prompts() -> str:
            # 4 requests of ~7 segments each (a system prompt and user turns), at once.
            chat = [{"role": "system", "content": words * 2}] + [{"role": "user", "content": words} for _ in range(6)]
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                codes = list(pool.map(lambda i: post({"model": "bench", "messages": chat + [{"role": "user", "content": f"q{i}"}], "max_tokens": 1}).status_code, range(4)))
            return ",".join(map(str, codes))

        def big_body() -> str:
            payload = b'{"model": "bench", "messages": [{"role": "user", "content": "' + b"x" * (10 * 2**20) + b'"}]}'
            return str(post(None, content=payload, headers={"content-type": "application/json"}).status_code)

        def big_prompt() -> str:
            return str(post({"model": "bench", "messages": [{"role": "user", "content": "lorem ipsum " * (3_500_000 // 12)}], "max_tokens": 1}).status_code)

        _gaps_while(url, nothing, 16)  # warm-up
        rows = []
        for label, disturb in (
            ("nothing else", nothing),
            ("4 chats of 7 segments (~700 tokens) arrive", long_prompts),
            ("a 10 MB body arrives (413 at max_request_bytes = 4 MiB)", big_body),
            ("a 3.5 MB prompt arrives (parsed and tokenized off the loop, then 400: too long)", big_prompt),
        ):
            out = _gaps_while(url, disturb, args.new_tokens * 4)
            rows.append(
                {
                    "while": label,
                    "its status": out["result"],
                    "arrival handled in s": f"{out['seconds']:.2f}",
                    "stream gap p50 ms": f"{out['p50']:.1f}",
                    "p99 ms": f"{out['p99']:.1f}",
                    "max ms": f"{out['max']:.1f}",
                }
            )
    finally:
        server.should_exit = True
        state.stop(0.0)
    reuse = _identical_prompt_reuse(model, vocab=model.tok_embeddings.num_embeddings)
    return _report(
        f"{device.type.upper()} over HTTP: {args.model} model, random weights, {dtype}",
        device,
        "`python tools/bench_serve.py --http`: the server's app (`create_app`, uvicorn, 127.0.0.1, 4 rows) streams one chat "
        f"({args.new_tokens * 4} tokens, stop tokens ignored); after its 8th token something else arrives from another client. "
        "The gaps are between the running stream's chunks while that arrival was being handled:",
        markdown_table(rows),
        "Before (issue 20, measured on the server of 2026-12-06): a 10 MB prompt took 7 s to be refused and a running stream "
        "stalled 6.4 s meanwhile (the body was read whole, parsed and tokenized on the event loop).",
        "Identical prompts (`n` choices, repeated prompts) reuse the whole cached prompt: prompt tokens prefilled by the engine "
        "for the same work with the prefix cache on and off:",
        markdown_table(reuse),
    )


def _identical_prompt_reuse(model: torch.nn.Module, vocab: int) -> List[Dict[str, str]]:
    """Prefilled prompt tokens for n=4 choices of one prompt and 4 repeats of another, with and
    without the prefix cache."""
    rows = []
    prompt = random_prompt(400, vocab, system=100, seed=7)
    for label, cache in (("on", PrefixCache(1 << 20, 1 << 32)), ("off", None)):
        engine = _engine(model, 4, 512, prefix_cache=cache)
        try:
            done = [threading.Event() for _ in range(4)]
            handles = [SequenceHandle(prompt, SamplingParams(max_tokens=4, ignore_stop_tokens=True, temperature=1.0, seed=i), lambda e, d=d: d.set() if e.kind in ("finish", "error") else None) for i, d in enumerate(done)]
            engine.submit(handles)  # n = 4: one request's choices arrive together
            for d in done:
                d.wait()
            choices = engine.core.prefilled_tokens
            for _ in range(4):
                _run_one(engine, prompt, 4)  # the same prompt again, one after another
            repeats = engine.core.prefilled_tokens - choices
        finally:
            engine.stop()
        rows.append({"prefix cache": label, "n=4 choices of a 400-token prompt: tokens prefilled": str(choices), "then 4 repeats: tokens prefilled": str(repeats)})
    return rows


def bench_compiled_decode(args: argparse.Namespace) -> str:
    """The engine's eager decode vs its compiled decode, same requests, interleaved rounds."""
    device, dtype, model, prompts = _workload(args)
    requests = len(prompts)
    cache_len = args.prompt_len + 24 + args.new_tokens + 8
    rows = max(args.clients)
    modes = {"eager": False, "compiled": True}
    engines = {
        mode: _engine(copy.deepcopy(model), rows, cache_len, max_queue=requests, compile_decode=compiled, compile_mode=args.compile_mode)
        for mode, compiled in modes.items()
    }
    warm_up_s = {}
    results: Dict[tuple, List[Dict[str, float]]] = {}
    try:
        for mode, engine in engines.items():
            # Every length the run reaches, so each width bucket compiles before timing.
            start = time.perf_counter()
            _concurrent(engine, prompts[:rows], rows, args.new_tokens)
            warm_up_s[mode] = time.perf_counter() - start
        for _ in range(args.rounds):
            for clients in args.clients:
                for mode, engine in engines.items():
                    results.setdefault((clients, mode), []).append(_concurrent(engine, prompts, clients, args.new_tokens))
    finally:
        for engine in engines.values():
            engine.stop()

    def median(clients: int, mode: str, key: str) -> float:
        return statistics.median(r[key] for r in results[(clients, mode)])

    table = []
    for clients in args.clients:
        for mode in modes:
            table.append(
                {
                    "clients": clients,
                    "decode": mode,
                    "tokens/s": f"{median(clients, mode, 'tok_s'):.0f}",
                    "p50 latency ms": f"{median(clients, mode, 'p50'):.0f}",
                    "p99 latency ms": f"{median(clients, mode, 'p99'):.0f}",
                    "compiled / eager tokens/s": f"{median(clients, mode, 'tok_s') / median(clients, 'eager', 'tok_s'):.2f}",
                }
            )
    return _report(
        f"{device.type.upper()}, compiled decode (`compile_decode`): {args.model} model, random weights, {dtype}",
        device,
        f"`python tools/bench_serve.py --compile-decode --clients {' '.join(map(str, args.clients))} --requests {requests} "
        f"--rounds {args.rounds} --prompt-len {args.prompt_len} --new-tokens {args.new_tokens}`: {requests} requests of {args.prompt_len}-{args.prompt_len + 24} prompt tokens and "
        f"{args.new_tokens} generated tokens each (stop tokens ignored), clients sending back to back, on two engines of "
        f"{rows} KV-cache rows each (copies of one model): eager (rows up to the last decoding one, attention "
        f"`max(length) + 1` slots wide) and compiled (compile mode `{args.compile_mode}`; every row, attention width "
        f"rounded up to a power of two; token choice and stops inside the graph). Medians of {args.rounds} interleaved rounds, after a warm-up over the same lengths "
        f"(eager {warm_up_s['eager']:.1f} s, compiled {warm_up_s['compiled']:.1f} s including its compiles, which torch's "
        "on-disk compile cache shortens on a rerun). The compiled engine always runs all its rows, so at 1 client it "
        "computes 8 rows for 1; GPU: not measured.",
        markdown_table(table),
    )


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default=None, help="tiny (CPU default) or llama3_2_1b (CUDA default)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--system-len", type=int, default=500)
    parser.add_argument("--ttft-repeats", type=int, default=8)
    parser.add_argument("--stall-segments", type=int, default=7, help="segments of the long prompt that arrives mid-stream")
    parser.add_argument("--stall-segment-len", type=int, default=128, help="tokens per segment of that prompt")
    parser.add_argument("--stall-chunk", type=int, default=256, help="the small prefill chunk the stall is measured with")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md alone")
    parser.add_argument("--compile-decode", action="store_true", help="measure the eager engine against the compiled decode instead")
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode of the compiled decode (with --compile-decode)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (with --compile-decode)")
    parser.add_argument("--http", action="store_true", help="measure the HTTP server under long prompts and large bodies instead")
    args = parser.parse_args(argv)
    if args.model is None:
        args.model = "llama3_2_1b" if args.device.startswith("cuda") else "tiny"
    if args.threads:
        torch.set_num_threads(args.threads)
    report = bench_compiled_decode(args) if args.compile_decode else bench_http(args) if args.http else bench(args)
    print(report)
    if not args.no_write:
        device_type = torch.device(args.device).type
        # Its own subsection: the eager table above it is not overwritten.
        subsection = f"{device_type}-compiled-decode" if args.compile_decode else f"{device_type}-http" if args.http else device_type
        update_section(BENCHMARKS_FILE, NAME, TITLE, subsection, report)


if __name__ == "__main__":
    main()
