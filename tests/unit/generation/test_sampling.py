"""The per-row token choice against its slow twins: a scalar filter per row
(:func:`mas.testing.reference_decoding.reference_filtered_probs`) and ``torch.multinomial``."""

from __future__ import annotations

import torch

from mas.generation import RowSampling, SamplingParams, choose_tokens
from mas.generation.sampling import draw_noise, filtered_probs
from mas.testing.reference_decoding import multinomial_sample, reference_filtered_probs

MIXED = [
    SamplingParams(4),
    SamplingParams(4, temperature=0.7),
    SamplingParams(4, temperature=1.3, top_k=5),
    SamplingParams(4, temperature=0.9, top_p=0.6),
    SamplingParams(4, temperature=1.1, top_k=8, top_p=0.8),
    SamplingParams(4, temperature=1.0, top_k=1000, top_p=1.0),
]


def _rows(params, vocab):
    sampling = RowSampling.empty(len(params), vocab, torch.device("cpu"))
    sampling.set_rows(range(len(params)), params, vocab)
    return sampling.flags_for(params)


def test_each_rows_distribution_equals_the_scalar_twin():
    torch.manual_seed(0)
    logits = torch.randn(len(MIXED), 50)
    probs = filtered_probs(logits, _rows(MIXED, 50))
    for i, p in enumerate(MIXED):
        if p.samples:
            torch.testing.assert_close(probs[i], reference_filtered_probs(logits[i], p.temperature, p.top_k, p.top_p), atol=1e-6, rtol=0)


def test_a_mixed_batch_chooses_what_each_row_chooses_alone():
    """Greedy rows take the argmax; each sampled row's choice from the same noise is the one it
    makes in a batch of its own (other rows' settings never leak into it)."""
    torch.manual_seed(1)
    logits = torch.randn(len(MIXED), 50)
    noise = draw_noise(len(MIXED), 50, torch.device("cpu"), range(len(MIXED)), [torch.Generator().manual_seed(i) for i in range(len(MIXED))])
    batched = choose_tokens(logits, noise, _rows(MIXED, 50))
    for i, p in enumerate(MIXED):
        alone = choose_tokens(logits[i : i + 1], noise[i : i + 1], _rows([p], 50))
        assert int(batched[i]) == int(alone[0]), i
        if not p.samples:
            assert int(batched[i]) == int(logits[i].argmax())


def test_the_noise_draw_follows_the_filtered_distribution():
    torch.manual_seed(0)
    logits = torch.randn(1, 12)
    params = SamplingParams(1, temperature=0.9, top_k=6)
    n = 20000
    sampling = _rows([params] * n, 12)
    noise = torch.empty(n, 12).exponential_(generator=torch.Generator().manual_seed(1))
    draws = choose_tokens(logits.expand(n, -1), noise, sampling)
    frequency = torch.bincount(draws, minlength=12).float() / n
    expected = reference_filtered_probs(logits[0], 0.9, top_k=6)
    torch.testing.assert_close(frequency, expected, atol=0.015, rtol=0)
    # The multinomial twin draws from the same distribution.
    generator = torch.Generator().manual_seed(2)
    twin = torch.bincount(torch.tensor([multinomial_sample(logits[0], params, generator) for _ in range(4000)]), minlength=12).float() / 4000
    torch.testing.assert_close(twin, expected, atol=0.03, rtol=0)


def test_filters_keep_the_top_tokens():
    logits = torch.randn(4, 50)
    greedy = logits.argmax(-1)
    noise = torch.empty(4, 50).exponential_(generator=torch.Generator().manual_seed(0))
    assert torch.equal(choose_tokens(logits, noise, _rows([SamplingParams(1, temperature=0.7, top_k=1)] * 4, 50)), greedy)
    assert torch.equal(choose_tokens(logits, noise, _rows([SamplingParams(1, temperature=0.7, top_p=1e-6)] * 4, 50)), greedy)
    top5 = logits.topk(5, dim=-1).indices
    for seed in range(20):
        noise = torch.empty(4, 50).exponential_(generator=torch.Generator().manual_seed(seed))
        s = choose_tokens(logits, noise, _rows([SamplingParams(1, temperature=2.0, top_k=5)] * 4, 50))
        assert (top5 == s[:, None]).any(-1).all()
