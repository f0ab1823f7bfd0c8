"""The benchmark scripts' own logic, and their GPU code paths exercised on a CPU.

The scripts (``tools/bench_training.py``, ``tools/bench_generation.py``) are what a lent GPU runs
in its few minutes (``tools/run_gpu_checks.sh``), so every path they take there runs here first
at a shrunk size, with ``--no-write``: BENCHMARKS.md is never touched (``update_section`` is
patched to fail). No assertion is on a timing; they check counts, shapes and what is reported.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import torch

import bench_generation
import bench_inference_ab
import bench_scoring
import bench_serve
import bench_training
from mas.masks import CAUSAL, PAD
from mas.segments import IGNORE_INDEX, SegmentedSequence
from mas.testing import segment_row
from mas.testing.profiling import ProfileSummary, busy_microseconds, device_activity, profile_calls

REPO = Path(__file__).resolve().parents[2]


def _examples(n: int = 12) -> list:
    """Hand-made rows of varied layouts: system, user, answer (labels on the answer)."""
    rows = []
    for i in range(n):
        layout = segment_row(3 + i % 4, 5 + 2 * i, 2 + i % 3)
        tokens = list(range(100, 100 + len(layout)))
        labels = [t if s == CAUSAL else IGNORE_INDEX for t, s in zip(tokens, layout)]
        rows.append(SegmentedSequence(tokens, labels, layout))
    return rows


def _no_write(monkeypatch, module) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a --no-write run tried to write BENCHMARKS.md")

    monkeypatch.setattr(module, "update_section", refuse)


# ----------------------------------------------------------------------------- bench_training
@pytest.mark.parametrize("attention", ["mas", "causal"])
def test_keys_per_real_token_equals_its_loop_twin(attention):
    """The vectorised count of visible keys equals the per-token loop: padded rows and packs."""
    rows = bench_training.synthetic_rows(_examples(), 6, vocab_size=500, seed=1)
    longest = max(len(r["tokens"]) for r in rows)
    segments = torch.full((len(rows), longest + 5), PAD)
    for b, r in enumerate(rows):
        segments[b, : len(r["segment_ids"])] = torch.tensor(r["segment_ids"])
    padded = {"segment_ids": segments}
    packs = bench_training.synthetic_rows(_examples(), 20, vocab_size=500, seed=2, pack_length=96)
    packed = {k: torch.tensor([p[k] for p in packs]) for k in ("segment_ids", "document_ids")}
    for batch in (padded, packed):
        fast = bench_training.keys_per_real_token(batch, attention)
        slow = bench_training.keys_per_real_token_loop(batch, attention)
        assert fast == pytest.approx(slow, rel=1e-12)
    # MAS sees more keys than causal on the same layout (the prompt segments are bidirectional).
    if attention == "mas":
        assert bench_training.keys_per_real_token(padded, "mas") > bench_training.keys_per_real_token(padded, "causal")


def test_synthetic_rows_copy_real_layouts_with_random_ids():
    examples = _examples()
    rows = bench_training.synthetic_rows(examples, 30, vocab_size=50_000, seed=0)
    layouts = {tuple(e.segment_ids) for e in examples}
    assert len(rows) == 30
    assert all(tuple(r["segment_ids"]) in layouts for r in rows)
    for r in rows:
        assert max(r["tokens"]) < 50_000
        assert [label != IGNORE_INDEX for label in r["labels"]] == [s == CAUSAL for s in r["segment_ids"]]
        assert all(label in (IGNORE_INDEX, token) for label, token in zip(r["labels"], r["tokens"]))
    assert any(max(r["tokens"]) >= 1024 for r in rows)  # ids beyond the tiny tokenizer's
    again = bench_training.synthetic_rows(examples, 30, vocab_size=50_000, seed=0)
    assert again == rows  # the same rows for every variant


def test_useful_flops_counts_the_tied_head_once_and_optionally_at_targets_only():
    from mas.models import lora_tiny_llama3_2

    model = lora_tiny_llama3_2(["q_proj", "v_proj"], lora_rank=4, lora_alpha=8)
    params = bench_training.matmul_params(model)
    assert params["head"] == model.tok_embeddings.weight.numel()
    everywhere = bench_training.useful_flops(model, 100, 10.0)
    targets_only = bench_training.useful_flops(model, 100, 10.0, head_tokens=7)
    assert everywhere - targets_only == pytest.approx(4 * params["head"] * (100 - 7))


@pytest.mark.parametrize("family", ["llama3_2", "llama3"], ids=["tied", "untied"])
def test_matmul_params_count_every_projection_and_the_head_once(family):
    """The slow twin of the count: every 2-D weight by hand (q/k/v/output_proj, the MLP, LoRA A
    and B), the embedding lookup left out, the LM head in once (the embedding again when tied)."""
    import importlib

    from mas.testing import TINY_FAMILIES

    spec = TINY_FAMILIES[family]
    module, _, name = spec.lora_builder.rpartition(".")
    model = getattr(importlib.import_module(module), name)(["q_proj", "v_proj"], lora_rank=4, lora_alpha=8, **spec.dims)
    weights = {n: p.numel() for n, p in model.named_parameters() if p.dim() == 2}
    embedding = model.tok_embeddings.weight.numel()
    projections = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.output_proj", "mlp.w1", "mlp.w2", "mlp.w3")
    layer = sum(weights[f"layers.0.{n}.weight"] for n in projections)
    tied = "output.weight" not in weights
    assert tied == (family == "llama3_2")
    params = bench_training.matmul_params(model)
    assert params["head"] == embedding  # [vocab, dim] either way
    assert params["frozen"] == len(model.layers) * layer + embedding
    assert params["lora"] == sum(n for key, n in weights.items() if "lora_" in key) > 0


@pytest.mark.slow
def test_1b_shape_training_benchmark_runs_shrunk_on_cpu(tmp_path, monkeypatch, capsys):
    """The whole --model llama3_2_1b path (recipe set-up from the paper configs, synthetic rows,
    eager and compiled variants, packing, report, profiler) at 2 layers of 256 dims."""
    _no_write(monkeypatch, bench_training)
    bench_training.main(
        [
            "--model", "llama3_2_1b", "--layers", "2", "--dim", "256", "--vocab", "4096",
            "--rounds", "1", "--steps", "2", "--packs", "512x1", "--compile-backend", "eager",
            "--base-dir", str(tmp_path / "base"), "--profile-dir", str(tmp_path / "profiles"),
            "--profile-steps", "1", "--no-write",
        ]
    )
    out = capsys.readouterr().out
    table = {m.group(1): m.group(0) for m in re.finditer(r"^\| ((?:MAS|causal), [^|]+?) \|.*$", out, re.M)}
    assert set(table) == {"MAS, eager", "causal, eager", "MAS, compiled", "causal, compiled", "MAS, compiled, packed 512x1"}

    def real_share(name: str) -> int:
        return int(re.search(r"\| (\d+)% \|", table[name]).group(1))

    # Packing removes most of the padding of rows padded to a multiple of 128.
    assert real_share("MAS, compiled, packed 512x1") > real_share("MAS, compiled") + 15
    assert "MAS / causal step time" in out and "compiled / eager real tokens/s" in out and "dynamo:" in out
    profile = (tmp_path / "profiles" / "bench_training_llama3_2_1b_profile.md").read_text()
    assert "top CPU ops" in profile and "aten::mm" in profile
    assert (tmp_path / "profiles" / "bench_training_llama3_2_1b_MAS_compiled_packed_512x1.trace.json.gz").stat().st_size > 0


@pytest.mark.slow
def test_tiny_training_benchmark_runs_torchtunes_recipe_beside_ours(tmp_path, monkeypatch, capsys):
    """The CPU benchmark at CI size (1 round of 2 steps): torchtune's own
    lora_finetune_single_device beside this project's causal and MAS steps on the same tiny model,
    rows and batch, rows padded to 16 and 128, and packs; every variant is timed and reported."""
    _no_write(monkeypatch, bench_training)
    bench_training.main(
        ["--rounds", "1", "--steps", "2", "--packs", "1024x1", "--base-dir", str(tmp_path / "base"), "--no-write"]
    )
    out = capsys.readouterr().out
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| torchtune |") or line.startswith("| mas_lora_finetune |"):
            rows[tuple(cells[:3])] = dict(zip(("real", "padded", "share", "examples", "ms"), cells[3:8]))
    assert set(rows) == {
        ("torchtune", "causal", "8 rows, padded to the longest"),
        ("mas_lora_finetune", "causal", "8 rows, padded to 16"),
        ("mas_lora_finetune", "mas", "8 rows, padded to 16"),
        ("mas_lora_finetune", "mas", "8 rows, padded to 128"),
        ("mas_lora_finetune", "causal", "1 pack of 1024"),
        ("mas_lora_finetune", "mas", "1 pack of 1024"),
        ("mas_lora_finetune", "mas", "1 pack of 1024, one SDPA call over the whole mask"),
    }
    for key, row in rows.items():
        assert float(row["real"].replace(",", "")) > 0 and float(row["ms"]) > 0, key
        if "rows" in key[2]:
            assert row["examples"] == "8.0", key  # every recipe steps on batches of 8 rows
    share = {key[2]: int(row["share"].rstrip("%")) for key, row in rows.items() if key[1] == "mas"}
    assert share["1 pack of 1024"] > share["8 rows, padded to 128"] + 30  # packing removes the padding
    for note in ("torchtune's recipe (real tokens/s)", "(target >= 1)", "(target <= 1.03)", "(target >= 1.8)"):
        assert note in out


# ----------------------------------------------------------------------------- bench_generation
@pytest.mark.slow
def test_generation_benchmark_profiles_compiled_decode_on_cpu(tmp_path, monkeypatch, capsys):
    _no_write(monkeypatch, bench_generation)
    bench_generation.main(
        [
            "--prompt-lens", "48", "--batch-sizes", "1", "--new-tokens", "16", "--rounds", "1",
            "--profile-steps", "6", "--profile-dir", str(tmp_path), "--no-write",
        ]
    )
    out = capsys.readouterr().out
    assert "| MAS compiled (default) |" in out
    assert "reduce-overhead" not in out.split("**Decode throughput**")[1]  # CUDA graphs need CUDA
    assert "Profile of batch-1 decode steps compiled with mode default" in out
    assert "(6 tokens, `torch.profiler`)" in out
    assert (tmp_path / "bench_generation_decode_profile.md").exists()


# ----------------------------------------------------------------------------- bench_scoring
def test_scoring_benchmark_compares_answer_rows_with_full_logits_on_cpu(monkeypatch, capsys):
    _no_write(monkeypatch, bench_scoring)
    # A 8192-token head: the 1B shape's 128,256 made this the suite's slowest test (46 s), and the
    # mechanics are the same (the candidates' ids stay below the vocabulary).
    bench_scoring.main(["--layers", "1", "--vocab", "8192", "--candidates", "4", "--batch-size", "2", "--rounds", "1", "--no-write"])
    out = capsys.readouterr().out
    assert re.search(r"\| LM head on answer rows \(default\) \| \d+ \|", out) and re.search(r"\| full logits \| \d+ \|", out)
    difference = float(re.search(r"largest relative score difference ([0-9.e+-]+)", out).group(1))
    assert difference < 1e-3  # the same scores on both paths
    assert "tied LM head of 8,192 tokens" in out and "BENCHMARKS.md is left as it is" in out


def test_scoring_benchmark_candidates_keep_the_bundled_layouts():
    cands = bench_scoring.candidates(5, 128_256)
    assert all(len(c) > 50 and 3 <= sum(s == CAUSAL for s in c.segment_ids) <= 12 for c in cands)
    assert max(t for c in cands for t in c.tokens) > 1024  # ids of the large vocabulary, not the tiny one


# ----------------------------------------------------------------------------- bench_serve
_SMALL_SERVE = ["--clients", "1", "2", "--requests", "4", "--prompt-len", "16", "--new-tokens", "4", "--no-write"]


def test_serving_benchmark_runs_its_tables_on_cpu(monkeypatch, capsys):
    _no_write(monkeypatch, bench_serve)
    bench_serve.main([*_SMALL_SERVE, "--system-len", "32", "--ttft-repeats", "2", "--stall-segments", "3", "--stall-segment-len", "16", "--stall-chunk", "16"])
    out = capsys.readouterr().out
    assert "| 1 (mas.generate, one at a time) |" in out and "| 2 (engine) |" in out
    warm_over_cold = re.search(r"\| warm / cold \| ([0-9.]+) \|", out)
    assert warm_over_cold and float(warm_over_cold.group(1)) > 0
    assert re.search(r"8 requests .* arrive at once .* median [0-9.]+ ms", out)
    assert re.search(r"\| none \(whole prompt\) \| \d+ \| \d+ \|", out) and re.search(r"\| 16 tokens \| \d+ \| \d+ \|", out)


@pytest.mark.slow
def test_serving_benchmark_over_http_refuses_large_bodies_and_counts_reuse(monkeypatch, capsys):
    _no_write(monkeypatch, bench_serve)
    bench_serve.main(["--http", "--new-tokens", "6", "--no-write"])
    out = capsys.readouterr().out
    assert re.search(r"\| a 10 MB body arrives .* \| 413 \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \|", out), out
    assert re.search(r"\| a 3.5 MB prompt arrives .* \| 400 \|", out) and "| 200,200,200,200 |" in out
    assert "| on | 400 | 0 |" in out and "| off | 1600 | 1600 |" in out  # whole-prompt reuse: prefilled once


@pytest.mark.slow
def test_serving_benchmark_compares_eager_and_compiled_decode_on_cpu(monkeypatch, capsys):
    _no_write(monkeypatch, bench_serve)
    bench_serve.main([*_SMALL_SERVE, "--compile-decode", "--rounds", "1"])
    out = capsys.readouterr().out
    for clients in (1, 2):
        assert re.search(rf"\| {clients} \| eager \| \d+ \|.*\| 1.00 \|", out), out
        assert re.search(rf"\| {clients} \| compiled \| \d+ \|", out), out


def test_profile_decode_steps_needs_enough_tokens():
    from mas.generation import GenerationSettings

    settings = GenerationSettings(attention="mas", max_new_tokens=8, max_cache_len=64, stop_tokens=[], compile_decode=True)
    with pytest.raises(ValueError, match="--new-tokens"):
        bench_generation.profile_decode_steps(torch.nn.Linear(1, 1), None, settings, steps=6)


# ----------------------------------------------------------------------------- profiling
def test_device_activity_counts_overlaps_once_and_ranks_by_total():
    events = [
        {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 0.0, "dur": 10.0},
        {"ph": "X", "cat": "kernel", "name": "softmax", "ts": 5.0, "dur": 10.0},  # overlaps gemm (two streams)
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD", "ts": 30.0, "dur": 2.0},
        {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 40.0, "dur": 20.0},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0.0, "dur": 100.0},  # host work: not device time
        {"ph": "i", "cat": "kernel", "name": "marker", "ts": 1.0},
    ]
    top, count, busy_us = device_activity(events, top=2)
    assert top == [("gemm", 0.03, 2), ("softmax", 0.01, 1)]
    assert count == 4
    assert busy_us == 15.0 + 2.0 + 20.0
    assert busy_microseconds([(0, 1), (1, 2), (5, 6)]) == 3


def test_profile_summary_reports_busy_fraction_and_kernels_per_call():
    summary = ProfileSummary(calls=4, wall_ms=10.0, kind="CUDA kernels", top=[("gemm|x", 3.0, 8)], device_events=40, busy_ms=6.0)
    text = summary.markdown("a decode", per="token", measured_ms=2.0)
    assert summary.busy_fraction == pytest.approx(0.6)
    assert "GPU busy 6.0 ms of 10.0 ms profiled wall time (60%)" in text
    assert "1.500 ms of kernels per token = 75% of the 2.000 ms measured" in text
    assert "10.0 device kernels and copies per token" in text
    assert "`gemm\\|x`" in text  # a pipe in a kernel name does not break the table


def test_profile_calls_on_cpu_lists_operators(tmp_path):
    x = torch.randn(128, 128)
    summary = profile_calls(lambda: x @ x, 3, torch.device("cpu"), top=3, trace_path=tmp_path / "t.json.gz")
    assert summary.kind == "CPU ops (self time)" and summary.busy_ms is None
    assert summary.top[0][0] == "aten::mm" and summary.top[0][2] == 3
    assert (tmp_path / "t.json.gz").stat().st_size > 0


# ----------------------------------------------------------------------------- run_gpu_checks.sh
def test_gpu_check_script_parses_and_fits_its_slot():
    script = REPO / "tools" / "run_gpu_checks.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    dry = subprocess.run(
        ["bash", str(script), "/tmp/mas_gpu_checks_dry_run"], env={"GPU_CHECKS_DRY_RUN": "1", "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, check=True,
    )
    steps = re.findall(r"^=== (\w+) \(limit (\d+) s\)", dry.stdout, re.M)
    # The open targets first, then the regression checks; the limits fit a 9-minute slot.
    assert [name for name, _ in steps] == [
        "bench_training_1b", "bench_generation", "gpu_tests", "bench_training_tiny", "bench_distributed", "bench_masks",
    ]
    assert sum(int(s) for _, s in steps) <= 9 * 60
    assert "--model llama3_2_1b" in dry.stdout and "--profile-dir" in dry.stdout
    assert "=== bench_vllm not run: no vLLM with mas-vllm" in dry.stdout  # no vLLM here: said, not run
    # With a Python that has vLLM and the plugin (here one that says yes), its step comes last,
    # with its own limit added to the deadline.
    with_vllm = subprocess.run(
        ["bash", str(script), "/tmp/mas_gpu_checks_dry_run"], env={"GPU_CHECKS_DRY_RUN": "1", "PATH": "/usr/bin:/bin", "VLLM_PYTHON": "true"},
        capture_output=True, text=True, check=True,
    )
    assert re.findall(r"^=== (\w+) \(limit", with_vllm.stdout, re.M)[-1] == "bench_vllm"
    assert "tools/bench_vllm.py --device cuda" in with_vllm.stdout


def test_gpu_check_script_collects_every_gpu_test():
    """The script runs ``-m gpu`` over named folders only (the rest imports stacks a bare device
    image lacks): a GPU test outside them would never run."""
    script = (REPO / "tools" / "run_gpu_checks.sh").read_text()
    folders = re.search(r"GPU_TEST_PATHS:-([^}]*)\}", script).group(1).split()
    marked = {
        path.relative_to(REPO).as_posix()
        for path in (REPO / "tests").rglob("test_*.py")
        if re.search(r"(mark\.gpu|pytestmark\s*=.*\bgpu\b)", path.read_text())
    }
    assert marked, "no GPU test found: the pattern is stale"
    outside = [m for m in marked if not any(m.startswith(folder.rstrip("/") + "/") for folder in folders)]
    assert not outside, f"GPU tests outside the script's folders {folders}: {outside}"


def test_paired_step_ratio_pairs_the_same_steps():
    """Two variants timed on the same batches: the ratio is taken step by step, so a slow batch
    (or a load spike that hits both) cancels, where a ratio of medians would not."""
    from bench_training import Variant, paired_step_ratio

    def variant(name, times):
        v = Variant(name, "mas_lora_finetune", "mas", "", None, lambda: None, lambda: None)
        v.step_times = list(times)
        return v

    causal = variant("causal", [1.0, 4.0, 1.0, 4.0, 9.0])
    mas = variant("mas", [1.02, 4.08, 1.02, 4.08, 9.18])
    assert paired_step_ratio(mas, causal) == pytest.approx(1.02)
    with pytest.raises(ValueError, match="different numbers of steps"):
        paired_step_ratio(mas, variant("short", [1.0]))


# ----------------------------------------------------------------------------- bench_inference_ab
def test_inference_ab_reads_both_tools_tables_and_reports_ratios():
    table = "| batch 1, greedy | tokens/s | vs MAS |\n|---|---|---|\n| MAS | 1,200.5 | 1.000 |\n| MAS compiled (default) | 2,400.0 | 2.0 |"
    assert bench_inference_ab._cell(table, "MAS", 1) == 1200.5
    assert bench_inference_ab._cell(table, "MAS compiled (default)", 1) == 2400.0
    with pytest.raises(ValueError, match="no row 'causal'"):
        bench_inference_ab._cell(table, "causal", 1)
    results = {"before": [{"decode, tokens/s": 100.0, "stall, ms": 40.0}], "after": [{"decode, tokens/s": 110.0, "stall, ms": 10.0}]}
    text = bench_inference_ab.report("abc", "def", 1, results)
    assert "| decode, tokens/s | 100.0 | 110.0 | 1.10 |" in text  # higher is better
    assert "| stall, ms | 40.0 | 10.0 | 4.00 |" in text  # lower is better
