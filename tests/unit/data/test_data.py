"""Data sources, row formats, bad input, packing and collation."""

from __future__ import annotations

import json

import pytest

from mas import CAUSAL, PAD, dense_mas_mask
from mas.data import (
    DataError,
    alpaca_dataset,
    chat_dataset,
    collate_segmented,
    commonsense_dataset,
    load_rows,
    pack_sequences,
)
from mas.segments import IGNORE_INDEX, SegmentBuilder
from mas.data.formats import instruction_messages

GOOD = {"instruction": "Is ice cold?\n\nAnswer format: true/false", "input": "", "output": "the correct answer is true", "answer": "true"}


def _write(tmp_path, rows, name="rows.json"):
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    else:
        path.write_text(json.dumps(rows))
    return path


def test_bundled_commonsense_sample_loads(llama3_tokenizer):
    from mas.assets import COMMONSENSE_TRAIN_SAMPLE as TRAIN_SAMPLE

    dataset = commonsense_dataset(llama3_tokenizer, str(TRAIN_SAMPLE), max_seq_len=256)
    assert dataset.stats.rows == 600
    assert dataset.stats.examples + dataset.stats.dropped_too_long == 600
    assert all(len(item["tokens"]) <= 256 for item in dataset)


def test_json_and_jsonl_and_folder_sources_agree(tmp_path, llama3_tokenizer):
    rows = [GOOD, {**GOOD, "input": "some context"}]
    a = commonsense_dataset(llama3_tokenizer, str(_write(tmp_path, rows, "a.json")))
    b = commonsense_dataset(llama3_tokenizer, str(_write(tmp_path, rows, "b.jsonl")))
    folder = tmp_path / "task"
    folder.mkdir()
    _write(folder, rows, "train.json")
    c = commonsense_dataset(llama3_tokenizer, str(folder))
    assert [x["tokens"] for x in a] == [x["tokens"] for x in b] == [x["tokens"] for x in c]
    # The input, when present, lands in the user segment and switches the preamble.
    assert len(a[1]["tokens"]) > len(a[0]["tokens"])


@pytest.mark.parametrize(
    "row, field",
    [
        ({k: v for k, v in GOOD.items() if k != "instruction"}, "instruction"),
        ({**GOOD, "instruction": "   "}, "instruction"),
        ({**GOOD, "output": 3}, "output"),
        ({**GOOD, "input": ["x"]}, "input"),
        ({k: v for k, v in GOOD.items() if k != "answer"}, "answer"),
    ],
)
def test_bad_commonsense_row_names_file_row_and_field(tmp_path, llama3_tokenizer, row, field):
    path = _write(tmp_path, [GOOD, GOOD, row])
    with pytest.raises(DataError, match=rf"rows\.json, row 2: .*'{field}'"):
        commonsense_dataset(llama3_tokenizer, str(path))


def test_bad_rows_skipped_and_counted_when_asked(tmp_path, llama3_tokenizer, caplog):
    path = _write(tmp_path, [GOOD, {"instruction": "x"}, GOOD, {**GOOD, "output": ""}])
    dataset = commonsense_dataset(llama3_tokenizer, str(path), on_bad_row="skip")
    assert len(dataset) == 2
    assert dataset.stats.skipped_bad == 2
    assert "2 malformed rows skipped" in dataset.stats.summary()
    assert "row 1" in dataset.stats.first_problems[0]


def test_invalid_json_and_missing_file(tmp_path, llama3_tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(GOOD) + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2: not valid JSON"):
        load_rows(str(bad))
    with pytest.raises(DataError, match="data file not found"):
        load_rows(str(tmp_path / "missing.json"))
    with pytest.raises(DataError, match="expected a JSON object"):
        load_rows(str(_write(tmp_path, [GOOD, [1, 2]])))


def test_hub_id_failure_is_a_clear_error():
    with pytest.raises(DataError, match="not a local file, and loading it from the hub failed"):
        load_rows("some-org/definitely-not-a-dataset-here")


def test_too_long_rows_are_counted_when_dropped(tmp_path, llama3_tokenizer):
    long_row = {**GOOD, "instruction": "word " * 400}
    path = _write(tmp_path, [GOOD, long_row])
    truncated = commonsense_dataset(llama3_tokenizer, str(path), max_seq_len=96)
    assert truncated.stats.truncated == 1 and len(truncated) == 2
    dropped = commonsense_dataset(llama3_tokenizer, str(path), max_seq_len=96, truncation="drop")
    assert dropped.stats.dropped_too_long == 1 and len(dropped) == 1


def test_alpaca_and_chat_formats(tmp_path, llama3_tokenizer):
    alpaca = alpaca_dataset(llama3_tokenizer, str(_write(tmp_path, [{"instruction": "Say hi", "output": "hi"}])))
    assert [s for s in alpaca[0]["segment_ids"] if s >= 0][-1] == 1
    chat_rows = [
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]},
        {"conversations": [{"from": "human", "value": "U"}, {"from": "gpt", "value": "A"}]},
    ]
    chat = chat_dataset(llama3_tokenizer, str(_write(tmp_path, chat_rows, "chat.json")), prompt_format="chat")
    assert sorted({s for s in chat[0]["segment_ids"]}) == [CAUSAL, 0, 1]
    assert sorted({s for s in chat[1]["segment_ids"]}) == [CAUSAL, 0]


@pytest.mark.parametrize(
    "messages, match",
    [
        ([{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "A"}], "unknown role 'narrator'"),
        ([{"role": "user", "content": ""}, {"role": "assistant", "content": "A"}], "'content' is empty"),
        ([{"role": "user", "content": 5}, {"role": "assistant", "content": "A"}], "'content' must be a string"),
        ([{"role": "user", "content": "U"}], "last message must be the assistant"),
        ([{"role": "assistant", "content": "A"}], "no system or user message"),
    ],
)
def test_bad_chat_rows(tmp_path, llama3_tokenizer, messages, match):
    path = _write(tmp_path, [{"messages": messages}], "chat.json")
    with pytest.raises(DataError, match=match):
        chat_dataset(llama3_tokenizer, str(path))


def test_collate_pads_right_with_pad_values(llama3_tokenizer):
    builder = SegmentBuilder(llama3_tokenizer)
    a = builder(instruction_messages("short?", "", "yes"))
    b = builder(instruction_messages("a much longer question with many words?", "", "no"))
    items = [{"tokens": s.tokens, "labels": s.labels, "segment_ids": s.segment_ids} for s in (a, b)]
    batch = collate_segmented(items, pad_id=llama3_tokenizer.pad_id, pad_to_multiple_of=16)
    assert batch["tokens"].shape[1] % 16 == 0 and batch["tokens"].shape[1] >= len(b)
    tail = slice(len(a), None)
    assert (batch["tokens"][0, tail] == llama3_tokenizer.pad_id).all()
    assert (batch["labels"][0, tail] == IGNORE_INDEX).all()
    assert (batch["segment_ids"][0, tail] == PAD).all()
    with pytest.raises(ValueError, match="different lengths"):
        collate_segmented([{"tokens": [1, 2], "labels": [1], "segment_ids": [0, 0]}])


def test_packing_never_splits_and_isolates_documents(llama3_tokenizer):
    from mas.assets import COMMONSENSE_TRAIN_SAMPLE as TRAIN_SAMPLE

    plain = commonsense_dataset(llama3_tokenizer, str(TRAIN_SAMPLE), max_seq_len=256)
    packed = commonsense_dataset(llama3_tokenizer, str(TRAIN_SAMPLE), max_seq_len=256, packed=True)
    assert len(packed) < len(plain)
    # Unpacking the packs gives back every example, in order and whole.
    recovered = []
    for pack in packed:
        assert len(pack["tokens"]) == 256
        docs = pack["document_ids"]
        for d in sorted(set(docs)):
            idx = [i for i, x in enumerate(docs) if x == d]
            assert idx == list(range(idx[0], idx[-1] + 1))  # contiguous
            if pack["segment_ids"][idx[0]] == PAD:
                continue
            recovered.append([pack["tokens"][i] for i in idx])
            assert [pack["input_pos"][i] for i in idx] == list(range(len(idx)))
    assert recovered == [item["tokens"] for item in plain]


def test_packed_mask_blocks_cross_document_attention():
    builder_like = [
        type("S", (), {"tokens": [1, 2, 3, 4], "labels": [-100, -100, 3, 4], "segment_ids": [0, 0, CAUSAL, CAUSAL], "__len__": lambda s: 4})(),
        type("S", (), {"tokens": [5, 6, 7], "labels": [-100, 6, 7], "segment_ids": [0, CAUSAL, CAUSAL], "__len__": lambda s: 3})(),
    ]
    (pack,) = pack_sequences(builder_like, pack_length=9)
    assert pack["segment_ids"] == [0, 0, CAUSAL, CAUSAL, 1, CAUSAL, CAUSAL, PAD, PAD]
    batch = collate_segmented([pack])
    mask = dense_mas_mask(batch["segment_ids"], batch["document_ids"])[0]
    assert not mask[4:7, :4].any()  # second document never sees the first
    assert mask[4, 4] and not mask[4, 5]
    assert mask[1, 0] and mask[0, 1]  # first document's prompt is bidirectional
    assert not mask[:, 7:].any()  # padding is never attended
