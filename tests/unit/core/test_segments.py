"""The shared prompt/segment builder: segments from roles, labels, the leakage guard, truncation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchtune.data import Message

from mas import CAUSAL, PAD, dense_mas_mask
from mas.data import instruction_messages
from mas.errors import ConfigError
from mas.segments import (
    IGNORE_INDEX,
    SegmentBuilder,
    SegmentedSequence,
    SegmentSettings,
    TooLongError,
    counts_as_target,
    ignore_leaking_labels,
)


def _runs(segment_ids):
    """[(segment id, run length)] of consecutive equal ids."""
    runs = []
    for s in segment_ids:
        if runs and runs[-1][0] == s:
            runs[-1][1] += 1
        else:
            runs.append([s, 1])
    return [tuple(r) for r in runs]


def test_commonsense_template_segments_system_user_answer(any_tokenizer):
    builder = SegmentBuilder(any_tokenizer)
    seq = builder(instruction_messages("Is the sky blue?\n\nAnswer format: true/false", "", "the correct answer is true"))
    runs = _runs(seq.segment_ids)
    assert [r[0] for r in runs] == [0, 1, CAUSAL]
    # Each piece decodes back to its message text (BOS joins the system segment).
    system_len, user_len, answer_len = (r[1] for r in runs)
    tokens = seq.tokens
    has_bos = any_tokenizer.bos_id is not None
    system_ids = tokens[int(has_bos) : system_len]
    user_ids = tokens[system_len : system_len + user_len]
    answer_ids = tokens[system_len + user_len :]
    assert any_tokenizer.decode(system_ids).startswith("Below is an instruction")
    assert "Is the sky blue?" in any_tokenizer.decode(user_ids)
    assert any_tokenizer.decode(user_ids).rstrip().endswith("### Response:")
    assert answer_ids[-1] == any_tokenizer.eos_id
    assert "the correct answer is true" in any_tokenizer.decode(answer_ids[:-1])
    # Only the answer (and EOS) count in the loss.
    counted = [i for i, label in enumerate(seq.labels) if label != IGNORE_INDEX]
    assert counted == list(range(system_len + user_len, len(tokens)))
    assert [seq.labels[i] for i in counted] == answer_ids


def test_merge_system_and_user_gives_one_prompt_segment(llama3_tokenizer):
    messages = instruction_messages("question", "", "answer")
    merged = SegmentBuilder(llama3_tokenizer, merge_system_and_user=True)(messages)
    split = SegmentBuilder(llama3_tokenizer)(messages)
    assert merged.tokens == split.tokens
    assert [r[0] for r in _runs(merged.segment_ids)] == [0, CAUSAL]


def test_multi_turn_chat_keeps_earlier_answers_causal(llama3_tokenizer):
    messages = [
        Message("system", "You are terse.", masked=True),
        Message("user", "Hi there", masked=True),
        Message("assistant", "Hello"),
        Message("user", "Is water wet?", masked=True),
        Message("assistant", "Yes"),
    ]
    for fmt in ("text", "chat"):
        seq = SegmentBuilder(llama3_tokenizer, prompt_format=fmt)(messages)
        assert [r[0] for r in _runs(seq.segment_ids)] == [0, 1, CAUSAL, 2, CAUSAL]


def test_chat_format_llama3_matches_torchtune_tokenize_messages(llama3_tokenizer):
    messages = [
        Message("system", "Be brief.", masked=True),
        Message("user", "Name a colour.", masked=True),
        Message("assistant", "Blue."),
    ]
    seq = SegmentBuilder(llama3_tokenizer, prompt_format="chat")(messages)
    reference, _ = llama3_tokenizer.tokenize_messages(messages, add_end_tokens=True)
    assert seq.tokens == reference


def test_chat_format_qwen2_has_headers_inside_segments(qwen2_tokenizer):
    messages = [Message("user", "Name a colour.", masked=True), Message("assistant", "Blue.")]
    seq = SegmentBuilder(qwen2_tokenizer, prompt_format="chat")(messages)
    assert seq.tokens[0] == qwen2_tokenizer.im_start_id  # Qwen has no BOS
    assert seq.segment_ids[0] == 0
    answer_start = seq.segment_ids.index(CAUSAL)
    assert seq.tokens[answer_start] == qwen2_tokenizer.im_start_id


def test_generation_prompt_has_no_eos_and_opens_the_answer(llama3_tokenizer):
    messages = [Message("system", "S", masked=True), Message("user", "U", masked=True)]
    text = SegmentBuilder(llama3_tokenizer)(messages, for_generation=True)
    assert text.tokens[-1] != llama3_tokenizer.eos_id
    assert CAUSAL not in text.segment_ids
    chat = SegmentBuilder(llama3_tokenizer, prompt_format="chat")(messages, for_generation=True)
    assert chat.tokens[-1] == llama3_tokenizer.encode("\n\n", add_bos=False, add_eos=False)[-1]
    assert chat.segment_ids[-1] == CAUSAL  # the assistant header is answer-side, causal
    assert llama3_tokenizer.eot_id in chat.tokens  # the user turn is closed


def test_training_prefix_equals_generation_prompt(any_tokenizer):
    """Generation prompts are exactly the prompt part of training sequences."""
    for fmt in ("text", "chat") if not hasattr(any_tokenizer, "_spm_model") else ("text",):
        builder = SegmentBuilder(any_tokenizer, prompt_format=fmt)
        train = builder(instruction_messages("q?", "ctx", "the answer"))
        prompt = builder(instruction_messages("q?", "ctx"), for_generation=True)
        assert train.tokens[: len(prompt)] == prompt.tokens
        assert train.segment_ids[: len(prompt)] == prompt.segment_ids


def test_unknown_role_and_empty_messages_raise(llama3_tokenizer):
    builder = SegmentBuilder(llama3_tokenizer)
    with pytest.raises(ValueError, match="empty list"):
        builder([])

    class Odd:
        role = "narrator"
        masked = True
        content = [{"type": "text", "content": "x"}]

    with pytest.raises(ValueError, match="unknown role 'narrator'"):
        builder([Odd()])


def test_truncation_keeps_answer_and_system_and_every_segment(llama3_tokenizer):
    long_instruction = "word " * 300
    messages = instruction_messages(long_instruction, "", "the correct answer is true")
    full = SegmentBuilder(llama3_tokenizer)(messages)
    fitted = SegmentBuilder(llama3_tokenizer, max_seq_len=64)(messages)
    assert len(fitted) == 64
    assert fitted.num_truncated == len(full) - 64
    full_runs, fitted_runs = _runs(full.segment_ids), _runs(fitted.segment_ids)
    assert [r[0] for r in fitted_runs] == [0, 1, CAUSAL]
    assert fitted_runs[0] == full_runs[0]  # system intact
    assert fitted_runs[2] == full_runs[2]  # answer intact
    answer_len = full_runs[2][1]
    assert fitted.tokens[-answer_len:] == full.tokens[-answer_len:]
    assert fitted.labels[-answer_len:] == full.labels[-answer_len:]
    # The user segment keeps its end (the "### Response:" cue right before the answer).
    user_len = fitted_runs[1][1]
    assert fitted.tokens[-answer_len - user_len + 1 : -answer_len] == full.tokens[-answer_len - user_len + 1 : -answer_len]


def test_truncation_drop_mode_and_impossible_fit(llama3_tokenizer):
    messages = instruction_messages("word " * 300, "", "the correct answer is true")
    with pytest.raises(TooLongError):
        SegmentBuilder(llama3_tokenizer, max_seq_len=64, truncation="drop")(messages)
    with pytest.raises(TooLongError, match="answer and system prompt alone"):
        SegmentBuilder(llama3_tokenizer, max_seq_len=8)(messages)


def _assert_no_label_visible_to_its_predictor(labels: torch.Tensor, segment_ids: torch.Tensor):
    """Position i predicts labels[i + 1]; it must not attend to token i + 1 or later."""
    mask = dense_mas_mask(segment_ids)  # [b, s, s]
    b, s = labels.shape
    future = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)  # key j > query i
    sees_future = (mask & future).any(-1)  # [b, s]
    counted = torch.zeros_like(sees_future)
    counted[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    assert not (counted & sees_future).any()


def test_no_counted_label_is_visible_to_its_predictor_on_real_rows(llama3_tokenizer):
    from mas.data import collate_segmented, commonsense_dataset
    from mas.assets import COMMONSENSE_TRAIN_SAMPLE as TRAIN_SAMPLE

    dataset = commonsense_dataset(llama3_tokenizer, str(TRAIN_SAMPLE), max_seq_len=256)
    batch = collate_segmented([dataset[i] for i in range(0, 600, 37)])
    _assert_no_label_visible_to_its_predictor(batch["labels"], batch["segment_ids"])
    # The guard leaves clean labels unchanged...
    assert torch.equal(ignore_leaking_labels(batch["labels"], batch["segment_ids"]), batch["labels"])
    # ...and the first answer token is still learned from the last prompt token.
    first_answer = (batch["segment_ids"] == CAUSAL).long().argmax(-1)
    assert (batch["labels"].gather(1, first_answer[:, None]) != IGNORE_INDEX).all()


@settings(max_examples=60, deadline=None)
@given(
    layout=st.lists(st.tuples(st.sampled_from(["prompt", "answer"]), st.integers(1, 6)), min_size=1, max_size=6),
    pad=st.integers(0, 4),
)
def test_leakage_guard_on_arbitrary_labels(layout, pad):
    """Whatever labels a user supplies, the guard removes every visible target."""
    segs, next_id = [], 0
    for kind, n in layout:
        if kind == "prompt":
            segs += [next_id] * n
            next_id += 1
        else:
            segs += [CAUSAL] * n
    segs += [PAD] * pad
    segment_ids = torch.tensor([segs])
    labels = torch.arange(len(segs))[None]  # every position has a target
    guarded = ignore_leaking_labels(labels, segment_ids)
    _assert_no_label_visible_to_its_predictor(guarded, segment_ids)
    # Answer targets stay counted unless they are padding.
    answer = segment_ids == CAUSAL
    assert torch.equal(guarded[answer], labels[answer])



# ---------------------------------------------------------------------------------------------
# What the builder records: settings, spans and roles; the one "which tokens count".
# ---------------------------------------------------------------------------------------------

CONVERSATIONS = {
    "instruction": instruction_messages("Is the sky blue?\n\nAnswer format: true/false", "", "the correct answer is true"),
    "multi_turn": [
        Message("system", "You are terse.", masked=True),
        Message("user", "Hi there", masked=True),
        Message("assistant", "Hello"),
        Message("user", "Is water wet?", masked=True),
        Message("assistant", "Yes"),
    ],
    "no_system": [Message("user", "Name a colour.", masked=True), Message("assistant", "Blue.")],
    "tool_result": [
        Message("system", "Use tools.", masked=True),
        Message("user", "What is 2+2?", masked=True),
        Message("ipython", "4", masked=True),
        Message("assistant", "Four."),
    ],
}


def _assert_spans_describe(seq, messages):
    """The spans tile the sequence, carry its segment ids, and follow the message roles."""
    spans = seq.spans
    assert spans[0].start == 0 and spans[-1].end == len(seq)
    for before, after in zip(spans, spans[1:]):
        assert before.end == after.start
    for span in spans:
        assert len(span) > 0
        assert set(seq.segment_ids[span.start : span.end]) == {span.segment_id}
    # Every message has one span in order (truncation never empties one here); the chat
    # format's generation header is one more "assistant" span.
    roles = [span.role for span in spans]
    assert roles[: len(messages)] == [m.role for m in messages]
    assert all(role == "assistant" for role in roles[len(messages) :])
    # Prompt roles have prompt segments, answers are causal.
    for span in spans:
        assert (span.segment_id >= 0) == (span.role in ("system", "user", "ipython"))


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("merge", [False, True], ids=["split", "merged"])
@pytest.mark.parametrize("prompt_format", ["text", "chat"])
@pytest.mark.parametrize("for_generation", [False, True], ids=["train", "generate"])
def test_spans_match_segment_ids_and_roles(llama3_tokenizer, name, merge, prompt_format, for_generation):
    messages = CONVERSATIONS[name]
    if for_generation:
        messages = messages[:-1]
    builder = SegmentBuilder(llama3_tokenizer, prompt_format=prompt_format, merge_system_and_user=merge)
    seq = builder(messages, for_generation=for_generation)
    _assert_spans_describe(seq, messages)
    prompt_spans = [s for s in seq.spans if s.segment_id >= 0]
    if merge:
        # A run of consecutive prompt messages shares one segment id.
        for before, after in zip(seq.spans, seq.spans[1:]):
            if before.segment_id >= 0 and after.segment_id >= 0:
                assert before.segment_id == after.segment_id
    else:
        assert [s.segment_id for s in prompt_spans] == list(range(len(prompt_spans)))


def test_spans_after_truncation(llama3_tokenizer):
    messages = instruction_messages("word " * 300, "", "the correct answer is true")
    full = SegmentBuilder(llama3_tokenizer)(messages)
    fitted = SegmentBuilder(llama3_tokenizer, max_seq_len=64)(messages)
    _assert_spans_describe(fitted, messages)
    system, user, answer = fitted.spans
    assert len(system) == len(full.spans[0]) and len(answer) == len(full.spans[2])
    assert len(user) == len(full.spans[1]) - fitted.num_truncated


def test_spans_after_truncation_of_a_merged_segment(llama3_tokenizer):
    """Merged into one segment, the system message is the segment's start: it is cut first,
    down to the BOS token (which always stays); emptied spans would be dropped."""
    messages = instruction_messages("word " * 300, "", "yes")
    full = SegmentBuilder(llama3_tokenizer, merge_system_and_user=True)(messages)
    fitted = SegmentBuilder(llama3_tokenizer, max_seq_len=24, merge_system_and_user=True)(messages)
    _assert_spans_describe(fitted, messages)
    system, user, answer = fitted.spans
    assert (system.segment_id, user.segment_id) == (0, 0)
    assert len(system) == 1 and fitted.tokens[0] == llama3_tokenizer.bos_id
    assert len(answer) == len(full.spans[2])
    assert fitted.tokens[user.start : user.end] == full.tokens[full.spans[1].end - len(user) : full.spans[1].end]


def test_hand_built_sequence_has_runs_as_spans_and_head_cuts_them():
    seq = SegmentedSequence([5, 6, 7, 8, 9], [IGNORE_INDEX] * 3 + [8, 9], [0, 0, 1, CAUSAL, CAUSAL])
    assert [(s.segment_id, s.role, s.start, s.end) for s in seq.spans] == [(0, None, 0, 2), (1, None, 2, 3), (CAUSAL, None, 3, 5)]
    head = seq.head(4)
    assert head.tokens == [5, 6, 7, 8] and head.segment_ids == [0, 0, 1, CAUSAL]
    assert [(s.start, s.end) for s in head.spans] == [(0, 2), (2, 3), (3, 4)]
    assert seq.prompt_len == 3


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("prompt_format", ["text", "chat"])
def test_counted_targets_agree_with_builder_labels(llama3_tokenizer, name, prompt_format):
    """A label is written exactly where counts_as_target allows it and the message is learned."""
    messages = CONVERSATIONS[name]
    seq = SegmentBuilder(llama3_tokenizer, prompt_format=prompt_format)(messages)
    assert len(seq.spans) == len(messages)  # one span per message (EOS joins the last)
    for span, message in zip(seq.spans, messages):
        for i in range(span.start, span.end):
            expected = not message.masked and counts_as_target(seq.segment_ids[i])
            assert (seq.labels[i] != IGNORE_INDEX) == expected, (span, i)
            assert seq.labels[i] in (IGNORE_INDEX, seq.tokens[i])
    # The tensor form is the same predicate, and the guard keeps exactly those labels.
    segment_ids, labels = torch.tensor([seq.segment_ids]), torch.tensor([seq.labels])
    assert torch.equal(counts_as_target(segment_ids)[0], torch.tensor([counts_as_target(s) for s in seq.segment_ids]))
    assert torch.equal(ignore_leaking_labels(labels, segment_ids), labels)
    everything = torch.tensor([seq.tokens])
    assert torch.equal(ignore_leaking_labels(everything, segment_ids) != IGNORE_INDEX, counts_as_target(segment_ids))


def test_builder_settings_are_one_record(llama3_tokenizer):
    builder = SegmentBuilder(llama3_tokenizer, prompt_format="chat", merge_system_and_user=True, max_seq_len=99, truncation="drop")
    assert builder.settings == SegmentSettings("chat", True, 99, "drop")
    assert (builder.prompt_format, builder.merge_system_and_user, builder.max_seq_len, builder.truncation) == ("chat", True, 99, "drop")
    assert SegmentBuilder(llama3_tokenizer).settings == SegmentSettings()
    again = SegmentBuilder.from_settings(llama3_tokenizer, builder.settings)
    messages = CONVERSATIONS["multi_turn"]
    assert again(messages) == builder(messages)
    with pytest.raises(ConfigError, match=r"^prompt_format must be 'text' or 'chat', got 'html'$"):
        SegmentSettings(prompt_format="html")
    with pytest.raises(ConfigError, match=r"^truncation must be 'prompt' or 'drop', got 'left'$"):
        SegmentBuilder(llama3_tokenizer, truncation="left")


def test_checkpoint_metadata_is_written_from_the_builders_settings(llama3_tokenizer, tmp_path):
    """mas_settings records the dataset's builder settings as built, not config defaults."""
    import json

    from mas.data import chat_dataset
    from mas.training import mas_settings

    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}]
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(rows))
    dataset = chat_dataset(llama3_tokenizer, str(path), prompt_format="chat", merge_system_and_user=True, max_seq_len=128)
    assert dataset.segment_settings == dataset.builder.settings == SegmentSettings("chat", True, 128, "prompt")
    recorded = mas_settings("causal", dataset.segment_settings)
    assert recorded["attention"] == "causal"
    assert {k: recorded[k] for k in ("prompt_format", "merge_system_and_user", "max_seq_len", "truncation")} == {
        "prompt_format": "chat",
        "merge_system_and_user": True,
        "max_seq_len": 128,
        "truncation": "prompt",
    }
    json.dumps(recorded)  # it goes into adapter_config.json
    with pytest.raises(ConfigError, match="attention must be"):
        mas_settings("bidirectional", dataset.segment_settings)
