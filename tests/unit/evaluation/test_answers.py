"""Commonsense tasks: loading, option parsing and answer extraction on the real sample rows.

Real rows: ``mas/assets/commonsense/test_sample`` (25 LLM-Adapters test rows per task, ODC-By; see
its README). HellaSwag has no bundled rows; :data:`HELLASWAG_ROWS` are made-up rows written for this test in
the LLM-Adapters HellaSwag format (instruction "Please choose the correct ending to complete the
given sentence: ...", options "Ending1: ... Ending4: ...", "Answer format: ending1/.../ending4").
"""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mas.data.rows import DataError
from mas.evaluation import tasks as tasks_module
from mas.evaluation.answers import extract_answer, is_correct
from mas.evaluation.tasks import SAMPLE_SOURCE, TASK_NAMES, TASKS, get_task, load_task, parse_options

SAMPLE_TASKS = [name for name in TASK_NAMES if name != "hellaswag"]


def _hellaswag_row(context, endings, answer):
    options = " ".join(f"Ending{k}: {text}" for k, text in enumerate(endings, start=1))
    return {
        "instruction": "Please choose the correct ending to complete the given sentence: "
        f"{context}\n\n{options}\n\nAnswer format: ending1/ending2/ending3/ending4",
        "input": "",
        "output": f"the correct answer is {answer}",
        "answer": answer,
    }


HELLASWAG_ROWS = [
    _hellaswag_row(
        "Fixing a bike tire: A man lifts the bicycle onto a stand and spins the wheel. He",
        ["eats the tire.", "sings to the stand.", "folds the bicycle like paper.",
         "finds the hole in the tube and patches it."],
        "ending4",
    ),
    _hellaswag_row(
        "Baking cookies: A woman pours flour into a bowl. She",
        ["stirs in sugar and butter.", "throws the bowl at the oven.", "paints the bowl blue.",
         "reads a book about trains."],
        "ending1",
    ),
]


@pytest.fixture(scope="module")
def hellaswag_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hellaswag_flat")
    (folder / "hellaswag.json").write_text(json.dumps(HELLASWAG_ROWS), encoding="utf-8")
    return folder


def _all_examples(hellaswag_dir):
    data = [load_task(name, check_options=True) for name in SAMPLE_TASKS]
    data.append(load_task("hellaswag", hellaswag_dir, check_options=True))
    return data


# ---- extraction on real rows --------------------------------------------------------------


@pytest.mark.parametrize("name", SAMPLE_TASKS)
def test_gold_output_extracts_gold_answer_on_every_sample_row(name):
    data = load_task(name)
    assert len(data) == 25
    predictions = [extract_answer(name, e.output) for e in data.examples]
    assert predictions == [e.answer for e in data.examples]
    assert all(is_correct(name, p, e.answer) for p, e in zip(predictions, data.examples))


def test_hellaswag_synthetic_rows_load_extract_and_parse(hellaswag_dir):
    data = load_task("hellaswag", hellaswag_dir, check_options=True)
    assert [e.answer for e in data.examples] == ["ending4", "ending1"]
    assert [extract_answer("hellaswag", e.output) for e in data.examples] == ["ending4", "ending1"]
    options = parse_options("hellaswag", data.examples[1].instruction)
    assert options == {"ending1": "stirs in sugar and butter.", "ending2": "throws the bowl at the oven.",
                       "ending3": "paints the bowl blue.", "ending4": "reads a book about trains."}


@pytest.mark.parametrize(
    "name, text, expected",
    [
        ("boolq", "", None),
        ("boolq", "I cannot say.", None),
        ("boolq", "untrue", None),
        ("boolq", "That is TRUE.", "true"),
        ("boolq", "False!", "false"),
        ("boolq", "true, not false", "true"),
        ("boolq", "(false)", "false"),
        ("boolq", "trueish falsehood", None),
        ("piqa", "The correct answer is Solution2.", "solution2"),
        ("piqa", "solution3", None),
        ("social_i_qa", "the correct answer is answer7", None),
        ("social_i_qa", "answer4 then answer2", "answer4"),
        ("ARC-Easy", "answer10", None),
        ("ARC-Easy", "answer10 or answer1", "answer1"),
        ("ARC-Challenge", "ANSWER3:", "answer3"),
        ("ARC-Challenge", "answer 3", None),
        ("openbookqa", "the correct answer is answer5", "answer5"),
        ("winogrande", "Option1.", "option1"),
        ("winogrande", "option12", None),
        ("hellaswag", "ending2\n", "ending2"),
        ("hellaswag", "ending 2", None),
        ("boolq", "这是 true。", "true"),
        ("boolq", "ätrue", None),
        ("boolq", "true_", "true"),
    ],
)
def test_malformed_and_edge_outputs(name, text, expected):
    assert extract_answer(name, text) == expected


def test_no_answer_counts_wrong_and_other_inputs_do_not_crash():
    assert extract_answer("boolq", None) is None
    assert is_correct("boolq", None, "true") is False
    assert is_correct("piqa", "solution1", "Solution1") is True
    assert is_correct("piqa", "solution2", "solution1") is False
    with pytest.raises(ValueError, match="not one of the piqa answers"):
        is_correct("piqa", "solution1", "answer1")
    with pytest.raises(ValueError, match="unknown commonsense task"):
        extract_answer("bool", "true")


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(TASK_NAMES), text=st.text())
def test_extraction_never_crashes(name, text):
    prediction = extract_answer(name, text)
    assert prediction is None or prediction in TASKS[name].answer_labels
    assert isinstance(is_correct(name, prediction, TASKS[name].answer_labels[0]), bool)


@settings(max_examples=200, deadline=None)
@given(
    name=st.sampled_from(TASK_NAMES),
    data=st.data(),
    prefix=st.text(alphabet=st.characters(blacklist_categories=("L", "N")), max_size=20),
    suffix=st.text(max_size=20),
)
def test_label_after_text_without_letters_or_digits_is_found(name, data, prefix, suffix):
    label = data.draw(st.sampled_from(TASKS[name].answer_labels))
    # The prefix holds no letter or digit, so it can neither contain a label nor glue onto one.
    assert extract_answer(name, prefix + label.upper() + " " + suffix) == label


# ---- options for log-likelihood scoring ---------------------------------------------------


def test_every_row_of_every_task_parses_into_its_listed_options(hellaswag_dir):
    for data in _all_examples(hellaswag_dir):
        for example in data.examples:
            options = parse_options(data.task, example.instruction, example.where)
            listed = re.search(r"Answer format: (.*)$", example.instruction).group(1).split("/")
            assert list(options) == listed, example.where
            assert all(text.strip() == text and text for text in options.values()), example.where
            assert example.answer in options


def test_option_texts_of_known_rows():
    piqa = load_task("piqa", limit=1).examples[0]
    expected = {"solution1": "can decorate tree", "solution2": "can decorate desk"}
    assert parse_options("piqa", piqa.instruction) == expected
    wino = load_task("winogrande", limit=1).examples[0]
    assert parse_options("winogrande", wino.instruction) == {"option1": "clipper", "option2": "razor"}
    arc = load_task("ARC-Challenge", limit=1).examples[0]
    arc_options = parse_options("ARC-Challenge", arc.instruction)
    assert arc_options["answer3"] == "to provide ideas about how the bus will be built"
    assert parse_options("boolq", "anything") == {"true": "true", "false": "false"}


def test_option_parse_errors_name_the_row():
    with pytest.raises(DataError, match="row 7: no 'Solution1:'"):
        parse_options("piqa", "Which is right?\n\nAnswer format: solution1/solution2", "f.json, row 7")
    with pytest.raises(DataError, match="answer format lists"):
        parse_options("piqa", "Q\n\nSolution1: a\n\nAnswer format: solution1/solution2", "f.json, row 1")
    with pytest.raises(DataError, match="'option2' has no text"):
        parse_options("winogrande", "Q Option1: a Option2:  Answer format: option1/option2")


# ---- loading and its errors ---------------------------------------------------------------


def test_task_names_resolve_by_alias_and_unknown_names_suggest():
    assert get_task("SIQA").name == "social_i_qa"
    assert get_task("arc-e").name == "ARC-Easy"
    assert get_task("OBQA").name == "openbookqa"
    with pytest.raises(ValueError) as error:
        get_task("boolqq")
    assert "Did you mean 'boolq'" in str(error.value) and "winogrande" in str(error.value)


def test_llm_adapters_layout_flat_layout_and_limit(tmp_path):
    rows = json.loads((SAMPLE_SOURCE / "boolq.json").read_text())
    (tmp_path / "boolq").mkdir()
    (tmp_path / "boolq" / "test.json").write_text(json.dumps(rows))
    nested = load_task("boolq", tmp_path, limit=3)
    assert [e.index for e in nested.examples] == [0, 1, 2]
    assert nested.source.endswith("boolq/test.json")
    flat = load_task("boolq", SAMPLE_SOURCE, limit=3)
    assert [e.answer for e in flat.examples] == [e.answer for e in nested.examples]
    assert len(load_task("boolq", SAMPLE_SOURCE / "boolq.json", limit=100)) == 25
    with pytest.raises(ValueError, match="limit"):
        load_task("boolq", limit=0)


def test_hub_id_is_read_in_the_llm_adapters_layout(monkeypatch):
    calls = []

    def fake_load_rows(source, split="train", **kwargs):
        calls.append((source, split, kwargs))
        raise DataError(f"{source}: offline")

    monkeypatch.setattr(tasks_module, "load_rows", fake_load_rows)
    with pytest.raises(DataError, match="offline"):
        load_task("piqa", "someone/commonsense-eval")
    assert calls == [("someone/commonsense-eval", "test", {"data_files": {"test": "piqa/test.json"}})]


def test_missing_task_file_names_the_paths(tmp_path):
    with pytest.raises(DataError, match=r"no test file for task 'hellaswag'.*hellaswag/test\.json"):
        load_task("hellaswag", SAMPLE_SOURCE)
    with pytest.raises(DataError, match="task source not found: ./nowhere/at_all"):
        load_task("boolq", "./nowhere/at_all")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda row: row.pop("answer"), r"boolq\.json, row 1: missing field 'answer'"),
        (lambda row: row.update(answer="  "), r"boolq\.json, row 1: field 'answer' is empty"),
        (lambda row: row.update(answer="yes"), r"boolq\.json, row 1: field 'answer' is 'yes', not one of"),
        (lambda row: row.update(instruction=None), r"boolq\.json, row 1: missing field 'instruction'"),
    ],
)
def test_bad_rows_are_named(tmp_path, change, message):
    rows = json.loads((SAMPLE_SOURCE / "boolq.json").read_text())[:3]
    change(rows[1])
    (tmp_path / "boolq.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match=message):
        load_task("boolq", tmp_path)


def test_gold_outside_the_rows_options_is_caught_when_checking_options(tmp_path):
    rows = json.loads((SAMPLE_SOURCE / "social_i_qa.json").read_text())[:2]
    rows[0]["answer"] = "answer5"  # in the shared answer vocabulary, but SIQA rows offer three
    (tmp_path / "social_i_qa.json").write_text(json.dumps(rows))
    assert load_task("social_i_qa", tmp_path).examples[0].answer == "answer5"
    with pytest.raises(DataError, match=r"row 0: answer 'answer5' is not among the row's options"):
        load_task("social_i_qa", tmp_path, check_options=True)
