"""Packing: a pack trains each example exactly as if it were alone (the slow twin).

The fast path is one ``[1, pack_length]`` row holding several examples with the document mask
and per-example positions; the slow twin runs every example alone. Same per-example loss, no
attention across documents, no example split, fixed pack lengths.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from mas import CAUSAL, PAD, dense_mas_mask, use_mas_attention
from mas.assets import COMMONSENSE_TRAIN_SAMPLE
from mas.data import collate_segmented, commonsense_dataset
from mas.data.packing import pack_sequences, packing_stats
from mas.errors import ConfigError
from mas.segments import IGNORE_INDEX, SegmentedSequence
from mas.training import prepare_batch


@pytest.fixture(scope="module")
def examples(llama3_tokenizer):
    dataset = commonsense_dataset(llama3_tokenizer, str(COMMONSENSE_TRAIN_SAMPLE), max_seq_len=256, rows="0:12")
    return dataset.examples


def _per_token_loss(model, batch, attention):
    """``[b, s]`` loss of each target (0 where nothing counts), through the training path."""
    prepared = prepare_batch(batch, attention=attention, device=torch.device("cpu"), backend="sdpa")
    logits = model(prepared.tokens, **prepared.model_kwargs())  # [b, s, vocab]
    loss = F.cross_entropy(logits.flatten(0, 1), prepared.targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    return loss.view(prepared.targets.shape), prepared


@pytest.mark.parametrize("attention", ["mas", "causal"])
def test_pack_gives_each_example_its_own_loss(tiny_model, examples, attention):
    use_mas_attention(tiny_model, "sdpa")
    packs = pack_sequences(examples[:5], pack_length=768)
    assert len(packs) == 1  # 5 examples of ~100-135 tokens fit in one pack
    with torch.no_grad():
        packed_loss, prepared = _per_token_loss(tiny_model, collate_segmented(packs), attention)
        documents = torch.tensor(packs[0]["document_ids"])
        total_targets = 0
        for d, example in enumerate(examples[:5]):
            item = {"tokens": example.tokens, "labels": example.labels, "segment_ids": example.segment_ids}
            alone_loss, alone = _per_token_loss(tiny_model, collate_segmented([item]), attention)
            in_pack = packed_loss[0, documents == d]
            torch.testing.assert_close(in_pack, alone_loss[0], rtol=1e-5, atol=1e-5)
            assert alone.num_targets > 0
            total_targets += alone.num_targets
    # No target crosses a boundary: the pack counts exactly the examples' targets.
    assert prepared.num_targets == total_targets
    assert prepared.num_tokens == sum(len(e) for e in examples[:5])


def test_document_boundaries_never_leak(tiny_model, examples):
    """Changing one document's tokens changes no other document's logits (and the mask says so)."""
    use_mas_attention(tiny_model, "sdpa")
    (pack,) = pack_sequences(examples[:4], pack_length=640)
    batch = collate_segmented([pack])
    documents = batch["document_ids"][0]
    with torch.no_grad():
        prepared = prepare_batch(dict(batch), attention="mas", device=torch.device("cpu"), backend="sdpa")
        before = tiny_model(prepared.tokens, **prepared.model_kwargs())
        changed = batch["tokens"].clone()
        first = documents == 1
        changed[0, first] = (changed[0, first] + 7) % 1000
        after = tiny_model(changed, **prepared.model_kwargs())
    others = documents != 1
    torch.testing.assert_close(before[0, others], after[0, others], rtol=0, atol=0)
    assert not torch.equal(before[0, first], after[0, first])
    mask = dense_mas_mask(batch["segment_ids"], batch["document_ids"])[0]
    same_document = documents[:, None] == documents[None, :]
    assert not (mask & ~same_document).any()


def _sequence(n_prompt: int, n_answer: int) -> SegmentedSequence:
    return SegmentedSequence(
        tokens=list(range(1, n_prompt + n_answer + 1)),
        labels=[IGNORE_INDEX] * n_prompt + list(range(n_prompt + 1, n_prompt + n_answer + 1)),
        segment_ids=[0] * (n_prompt // 2) + [1] * (n_prompt - n_prompt // 2) + [CAUSAL] * n_answer,
    )


def test_no_example_is_split_and_packs_have_one_length():
    rng = random.Random(0)
    sequences = [_sequence(rng.randint(2, 120), rng.randint(1, 20)) for _ in range(200)]
    packs = pack_sequences(sequences, pack_length=256)
    assert {len(p["tokens"]) for p in packs} == {256}
    recovered = []
    for pack in packs:
        docs, segments = pack["document_ids"], pack["segment_ids"]
        for d in sorted(set(docs)):
            idx = [i for i, x in enumerate(docs) if x == d]
            assert idx == list(range(idx[0], idx[-1] + 1))  # one contiguous run per document
            if segments[idx[0]] == PAD:
                assert idx[-1] == 255  # only the tail is padding
                continue
            recovered.append(len(idx))
            assert [pack["input_pos"][i] for i in idx] == list(range(len(idx)))
        # Prompt-segment ids never repeat across documents of one pack.
        owners = {}
        for s, d in zip(segments, docs):
            if s >= 0:
                assert owners.setdefault(s, d) == d
    assert recovered == [len(s) for s in sequences]
    stats = packing_stats(packs)
    assert stats.examples == 200 and stats.real_tokens == sum(len(s) for s in sequences)
    assert 0.5 < stats.fill <= 1.0
    with pytest.raises(ValueError, match="example 0 has 300 tokens > pack length 256"):
        pack_sequences([_sequence(280, 20)], pack_length=256)


def test_dataset_pack_length(llama3_tokenizer):
    source = str(COMMONSENSE_TRAIN_SAMPLE)
    plain = commonsense_dataset(llama3_tokenizer, source, max_seq_len=256, rows="0:100")
    packed = commonsense_dataset(llama3_tokenizer, source, max_seq_len=256, rows="0:100", packed=True, pack_length=1024)
    assert {len(p["tokens"]) for p in packed} == {1024}
    assert packed.stats.pack_length == 1024 and packed.stats.packs == len(packed)
    assert "packed into" in packed.stats.summary() and "real tokens" in packed.stats.summary()
    assert packing_stats(list(packed)).examples == len(plain)
    with pytest.raises(ConfigError, match="dataset.pack_length=128 is shorter than max_seq_len=256"):
        commonsense_dataset(llama3_tokenizer, source, max_seq_len=256, rows="0:10", packed=True, pack_length=128)
