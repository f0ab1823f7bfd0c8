"""The sync-free decode loop: tokens equal to the slow twins, no host read per token, widths,
native grouped-query attention, cache sizes and the compile options."""

from __future__ import annotations

import pytest
import torch

import mas
from mas import CAUSAL
from mas.generation import (
    GenerationSettings,
    decode_one_token,
    decode_tokens,
    decode_width,
    default_cache_len,
    prefill,
    sample_next_token,
    sample_with_noise,
)
from mas.generation.gqa_attention import NativeGQAMultiHeadAttention, native_gqa_attention
from mas.generation.kv_cache import clear_kv_caches, setup_kv_caches
from mas.generation.layout import layout_prompts
from mas.generation.options import GenerateOptions
from mas.masks import as_causal, dense_mas_mask
from mas.segments import SegmentBuilder
from support.models import varied_tiny_model
from torchtune.modules import MultiHeadAttention

SYSTEM = "Below is an instruction that describes a task."
PROMPTS = [
    {"system": SYSTEM, "user": "Is ice cold?"},
    {"system": SYSTEM, "user": "Which is heavier, a stone or a feather? Answer briefly, please."},
    {"user": "Name a colour."},
    {"system": "You are terse.", "user": "Why is the sea salty?"},
]


@pytest.fixture
def model():
    m = varied_tiny_model()
    assert m.layers[0].attn.num_kv_heads < m.layers[0].attn.num_heads  # grouped queries
    return m


def _sequences(tokenizer, prompts=PROMPTS):
    builder = SegmentBuilder(tokenizer)
    return [builder(mas.generation.prompt_messages(p, i), for_generation=True) for i, p in enumerate(prompts)]


def _recompute_greedy(model, seq, steps, attention):
    """The slowest twin: the whole sequence again for every token, no cache, torchtune's forward."""
    clear_kv_caches(model)
    tokens, segments, out = list(seq.tokens), list(seq.segment_ids), []
    with torch.no_grad():
        for _ in range(steps):
            layout = torch.tensor([segments])
            mask = dense_mas_mask(layout if attention == "mas" else as_causal(layout))
            out.append(int(model(torch.tensor([tokens]), mask=mask)[0, -1].argmax()))
            tokens.append(out[-1])
            segments.append(CAUSAL)
    return out


@pytest.mark.parametrize("attention", ["mas", "causal"])
def test_fast_loop_equals_full_recompute_and_torchtunes_forward(model, llama3_tokenizer, attention):
    """Batched with padding, with and without the system cache, native GQA on and off: the
    greedy tokens of every row equal a full recompute of that row alone."""
    seqs = _sequences(llama3_tokenizer)
    expected = [_recompute_greedy(model, s, 12, attention) for s in seqs]
    for reuse in (False, True):
        for native_gqa in (True, False):
            out = mas.generate(
                model, seqs, attention=attention, max_new_tokens=12, batch_size=4, stop_tokens=[],
                reuse_system_cache=reuse, native_gqa=native_gqa, stop_check_every=5,
            )
            assert out.tokens == expected, (reuse, native_gqa)
            if reuse:
                assert out.system_cache_hits == 3  # every prompt with a system message


def test_fast_loop_equals_per_token_loop_with_stops(model, llama3_tokenizer):
    """Rows stop at different tokens; checking for 'all done' every 8 tokens trims to the same
    output as the per-token loop (decode_one_token + sample_next_token, a check every token)."""
    seqs = _sequences(llama3_tokenizer)
    free = mas.generate(model, seqs, max_new_tokens=20, batch_size=4, stop_tokens=[])
    # A stop token each row meets at a different step (its 3rd, 5th, ... token).
    stops = sorted({row[min(2 + 2 * i, len(row) - 1)] for i, row in enumerate(free.tokens)})
    batch = layout_prompts(seqs, pad_id=0)
    setup_kv_caches(model, len(seqs), 64, torch.float32)
    with torch.inference_mode():
        logits = prefill(model, batch)[:, -1]
        state = mas.generation.DecodeState.after_prefill(batch, 64)
        rows, done = [[] for _ in seqs], torch.zeros(len(seqs), dtype=torch.bool)
        for step in range(20):
            token = sample_next_token(logits)
            done |= torch.isin(token, torch.tensor(stops))
            for i in range(len(seqs)):
                if not done[i]:
                    rows[i].append(int(token[i]))
            if bool(done.all()):
                break
            logits = decode_one_token(model, token, state)
    for every in (1, 8, 100):
        out = mas.generate(model, seqs, max_new_tokens=20, batch_size=4, stop_tokens=stops, stop_check_every=every)
        assert out.tokens == rows, every
    assert any(len(r) < 20 for r in rows) and len({len(r) for r in rows}) > 1


def test_no_host_read_on_non_check_tokens(model, llama3_tokenizer, monkeypatch):
    """Inside the loop the device is read from the host only on check tokens (every 8th)."""
    seqs = _sequences(llama3_tokenizer)[:2]
    batch = layout_prompts(seqs, pad_id=0)
    cache_len, new_tokens = 128, 30
    setup_kv_caches(model, len(seqs), cache_len, torch.float32)
    reads = []

    def counting(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            reads.append(name)
            return original(self, *args, **kwargs)

        return read

    with torch.inference_mode(), native_gqa_attention(model):
        logits = prefill(model, batch)[:, -1]
        for name in ("item", "__bool__", "__int__", "__float__", "__index__", "tolist", "numpy", "cpu"):
            monkeypatch.setattr(torch.Tensor, name, counting(name))
        out = decode_tokens(model, logits, batch, cache_len=cache_len, max_new_tokens=new_tokens, stop_tokens=[7], stop_check_every=8, temperature=0.8, top_k=20, generator=torch.Generator().manual_seed(0))
        monkeypatch.undo()
    assert out.steps == new_tokens - 1
    assert reads == ["__bool__"] * ((new_tokens - 1) // 8)  # steps 8, 16, 24


def test_torchtunes_cache_write_reads_the_host_every_layer(model, llama3_tokenizer, monkeypatch):
    """The counter above can see a read: torchtune's own forward asserts on a device tensor."""
    seqs = _sequences(llama3_tokenizer)[:1]
    batch = layout_prompts(seqs, pad_id=0)
    setup_kv_caches(model, 1, 64, torch.float32)
    reads = []
    with torch.inference_mode():
        logits = prefill(model, batch)[:, -1]
        original = torch.Tensor.__bool__
        monkeypatch.setattr(torch.Tensor, "__bool__", lambda self: reads.append(1) or original(self))
        decode_tokens(model, logits, batch, cache_len=64, max_new_tokens=3, stop_check_every=100)
        monkeypatch.undo()
    assert len(reads) == 2 * len(model.layers)


def test_native_gqa_forward_equals_torchtunes(model):
    """Full-sequence, prefill and decode outputs of the switched layers equal torchtune's."""
    tokens = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        reference = model(tokens)
        with native_gqa_attention(model) as switched:
            assert switched == len(model.layers)
            assert type(model.layers[0].attn) is NativeGQAMultiHeadAttention
            with native_gqa_attention(model) as nested:
                assert nested == 0
            got = model(tokens)
        assert type(model.layers[0].attn) is MultiHeadAttention
        torch.testing.assert_close(got, reference, atol=1e-5, rtol=1e-5)


def test_native_gqa_hands_the_attention_kv_heads_not_copies(model, llama3_tokenizer, monkeypatch):
    """With native GQA every attention call of a generation (prefill and decode) gets the keys and
    values at ``n_kv`` heads; torchtune's forward (the twin, ``native_gqa=False``) expands them to
    ``n_h``, which shows the recorder can see a copy."""
    from mas.attention import MASAttention

    attn = model.layers[0].attn
    seen = []
    original = MASAttention.__call__

    def recording(self, q, k, v, *args, **kwargs):
        seen.append((q.shape[1], k.shape[1], v.shape[1]))
        return original(self, q, k, v, *args, **kwargs)

    monkeypatch.setattr(MASAttention, "__call__", recording)
    heads = {}
    for native in (True, False):
        seen.clear()
        mas.generate(model, llama3_tokenizer, PROMPTS[:2], max_new_tokens=4, stop_tokens=[], native_gqa=native)
        assert len(seen) >= 4 * len(model.layers), native  # the prefill and 3 decode steps, every layer
        heads[native] = set(seen)
    assert heads[True] == {(attn.num_heads, attn.num_kv_heads, attn.num_kv_heads)}
    assert heads[False] == {(attn.num_heads, attn.num_heads, attn.num_heads)}


def test_sample_with_noise_draws_from_the_filtered_distribution():
    torch.manual_seed(0)
    logits = torch.randn(1, 12)
    probs = mas.generation.sampling.filtered_probs(logits, temperature=0.9, top_k=6)
    noise = torch.empty(20000, 12).exponential_(generator=torch.Generator().manual_seed(1))
    draws = sample_with_noise(logits.expand(20000, -1), noise, temperature=0.9, top_k=6)
    frequency = torch.bincount(draws, minlength=12).float() / 20000
    torch.testing.assert_close(frequency, probs[0], atol=0.015, rtol=0)
    assert torch.equal(sample_with_noise(logits, None), logits.argmax(-1))


def test_sampled_generation_is_seeded(model, llama3_tokenizer):
    a = mas.generate(model, llama3_tokenizer, PROMPTS, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    b = mas.generate(model, llama3_tokenizer, PROMPTS, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    c = mas.generate(model, llama3_tokenizer, PROMPTS, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=4)
    assert a.tokens == b.tokens != c.tokens


def test_widths_and_default_cache_len():
    assert [decode_width(n, 4096) for n in (1, 64, 65, 300, 513, 4000)] == [64, 64, 128, 512, 1024, 4096]
    assert decode_width(300, 320) == 320
    assert default_cache_len([30, 200], 64, 131072) == 512  # not the model's 131,072 slots
    assert default_cache_len([30], 64, 2048) == 256
    assert default_cache_len([4000], 500, 4096) == 4096  # capped: generate then names the overflow


def test_decode_attends_over_the_written_slots_rounded_up_not_the_whole_cache(model, llama3_tokenizer, monkeypatch):
    """Each decode forward gets a mask as wide as decode_width(written slots), not the cache: a
    512-slot cache with short prompts is read 64, then 128 slots wide."""
    seqs = _sequences(llama3_tokenizer)[:2]
    cache_len, new_tokens = 512, 90
    widths = []

    def record_width(module, args, kwargs):
        if args[0].shape[1] == 1:  # a decode step (one token per row)
            widths.append(kwargs["mask"].shape[-1])

    handle = model.register_forward_pre_hook(record_width, with_kwargs=True)
    try:
        mas.generate(model, seqs, max_new_tokens=new_tokens, batch_size=2, stop_tokens=[], max_cache_len=cache_len)
    finally:
        handle.remove()
    slots = max(len(s) for s in seqs)
    assert widths == [decode_width(slots + i, cache_len) for i in range(1, new_tokens)]
    assert widths[0] == 64 and widths[-1] == 128 < cache_len


def test_generate_sizes_the_cache_from_the_prompts(model, llama3_tokenizer, monkeypatch):
    import mas.generation._decoding as decoding

    sizes = []
    original = decoding.setup_kv_caches
    monkeypatch.setattr(decoding, "setup_kv_caches", lambda m, b, n, d: sizes.append(n) or original(m, b, n, d))
    mas.generate(model, llama3_tokenizer, PROMPTS, max_new_tokens=8, batch_size=2, reuse_system_cache=False)
    assert sizes and set(sizes) == {256}  # one length for every batch; the model's max_seq_len is 2048


def test_compile_options_are_typed():
    with pytest.raises(ValueError, match="compile_mode must be one of"):
        GenerationSettings(compile_mode="fastest")
    with pytest.raises(ValueError, match="stop_check_every"):
        GenerationSettings(stop_check_every=0)
    assert GenerationSettings(compile_decode=True, compile_mode="reduce-overhead").uses_cuda_graphs()
    assert not GenerationSettings(compile_decode=True, compile_mode="max-autotune-no-cudagraphs").uses_cuda_graphs()
    from omegaconf import OmegaConf

    from mas.config import to_options

    parts = {k: {"_component_": "torch.nn.Identity"} for k in ("model", "checkpointer", "tokenizer")}
    cfg = OmegaConf.create({**parts, "compile_mode": "fastest"})
    with pytest.raises(Exception, match="compile_mode") as error:
        to_options(cfg, GenerateOptions, "mas_generate")
    assert "reduce-overhead" in str(error.value)


def test_recipes_pass_the_compile_options():
    import importlib

    generate_recipe = importlib.import_module("mas_generate")
    from mas.evaluation.options import EvalOptions
    from mas.evaluation.run import generation_settings

    options = GenerateOptions(model={}, checkpointer={}, tokenizer={}, compile_decode=True, compile_mode="reduce-overhead", stop_check_every=4)
    settings = generate_recipe.settings_from(options)
    assert (settings.compile_decode, settings.compile_mode, settings.stop_check_every) == (True, "reduce-overhead", 4)
    eval_options = EvalOptions(
        model={}, checkpointer={}, tokenizer={}, output_dir="/tmp/x", compile_decode=True,
        compile_mode="max-autotune-no-cudagraphs", stop_check_every=2,
    )  # fmt: skip
    settings = generation_settings(eval_options)
    assert (settings.compile_decode, settings.compile_mode, settings.stop_check_every) == (True, "max-autotune-no-cudagraphs", 2)
    # Unset, neither recipe fixes a cache length: mas.generate sizes it from the prompts.
    assert generate_recipe.settings_from(GenerateOptions(model={}, checkpointer={}, tokenizer={})).max_cache_len is None


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["mas", "causal"])
def test_compiled_step_equals_eager_step(model, llama3_tokenizer, attention):
    """The compiled decode step (forward, sampling, stops) gives the eager loop's tokens, greedy
    and sampled from the same noise, and compiles once per width bucket."""
    from torch._dynamo.utils import counters

    seqs = _sequences(llama3_tokenizer)
    common = dict(attention=attention, max_new_tokens=40, batch_size=4, max_cache_len=128, reuse_system_cache=True)
    eager = mas.generate(model, seqs, **common, stop_tokens=[])
    torch._dynamo.reset()
    counters.clear()
    compiled = mas.generate(model, seqs, **common, stop_tokens=[], compile_decode=True)
    assert compiled.tokens == eager.tokens
    # widths 64 and 128 for the batch of 2 and for the batch of 2 others: two frames' graphs each
    assert counters["stats"]["unique_graphs"] <= 4
    assert dict(counters["graph_break"]) == {}  # forward, token choice and stops: one graph per shape
    sampled = dict(common, temperature=1.0, top_k=10, seed=1)
    assert mas.generate(model, seqs, **sampled, compile_decode=True).tokens == mas.generate(model, seqs, **sampled).tokens
    assert dict(counters["graph_break"]) == {}
