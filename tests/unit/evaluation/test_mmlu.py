"""MMLU: subjects, both data layouts, row errors, prompt format, extraction, results and table.

Data: ``mas/assets/mmlu_sample`` (16 synthetic questions in the Hendrycks CSV layout, see its
README); the hub-layout files below are written by the tests from the same questions.
"""

from __future__ import annotations

import csv
import json
import shutil

import pytest

from mas.data.rows import DataError
from mas.evaluation.answers import extract_answer
from mas.evaluation.mmlu import EXTRACTION_TASK, MMLUSuite, mmlu_instruction, mmlu_messages
from mas.evaluation.mmlu_data import CATEGORIES, SAMPLE_SOURCE, SUBJECTS, load_mmlu
from mas.evaluation.results import EvalResults, PredictionRecord, load_results, markdown_table
from mas.evaluation.tasks import parse_options
from mas.masks import CAUSAL
from mas.segments import SegmentBuilder

SAMPLE_SUBJECTS = ["astronomy", "high_school_geography", "nutrition", "philosophy"]


def _hub_rows():
    """The sample questions as cais/mmlu rows (answer as an index)."""
    return [
        {"question": e.question, "subject": e.subject, "choices": list(e.choices), "answer": e.answer}
        for rows in load_mmlu().values() for e in rows
    ]  # fmt: skip


def _same_questions(a, b):
    assert list(a) == list(b)
    for subject in a:
        assert [(e.index, e.question, e.choices, e.answer) for e in a[subject]] == [
            (e.index, e.question, e.choices, e.answer) for e in b[subject]
        ]


def test_subjects_and_categories():
    assert len(SUBJECTS) == 57 and len(set(SUBJECTS)) == 57 and list(SUBJECTS) == sorted(SUBJECTS)
    assert {c: len(s) for c, s in CATEGORIES.items()} == {"STEM": 18, "humanities": 13, "social sciences": 12, "other": 14}
    assert MMLUSuite().canonical("High School Geography") == "high_school_geography"
    with pytest.raises(ValueError, match="Did you mean 'astronomy'"):
        MMLUSuite().canonical("astronomi")


def test_bundled_sample_in_the_hendrycks_layout():
    data = load_mmlu()
    assert list(data) == SAMPLE_SUBJECTS and all(len(rows) == 4 for rows in data.values())
    first = data["astronomy"][0]
    assert first.choices == ("Venus", "Mercury", "Earth", "Mars") and first.gold == "answer2"
    assert first.where.endswith("astronomy_test.csv, line 1")
    assert [e.index for e in data["philosophy"]] == [0, 1, 2, 3]
    assert data["philosophy"][2].question == 'Who wrote the dialogue called "The Republic"?'  # CSV quoting
    limited = load_mmlu(str(SAMPLE_SOURCE), subjects=["nutrition"], limit=2)
    assert list(limited) == ["nutrition"] and len(limited["nutrition"]) == 2


@pytest.mark.parametrize("where", ["data/test", "test", ".", "one_file"])
def test_hendrycks_folder_variants(tmp_path, where):
    csvs = SAMPLE_SOURCE / "data" / "test"
    if where == "one_file":
        target = tmp_path / "nutrition_test.csv"
        shutil.copy(csvs / "nutrition_test.csv", target)
        _same_questions(load_mmlu(str(target)), load_mmlu(subjects=["nutrition"]))
        return
    shutil.copytree(csvs, tmp_path / where, dirs_exist_ok=True)
    _same_questions(load_mmlu(str(tmp_path)), load_mmlu())


@pytest.mark.parametrize("layout", ["test.jsonl", "test.json", "test.parquet", "all/test-00000-of-00001.parquet", "per_subject"])
def test_hub_layouts_load_the_same_questions(tmp_path, layout):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _hub_rows()
    if layout == "per_subject":  # cais/mmlu: <subject>/test-*.parquet, rows may lack 'subject'
        for subject in SAMPLE_SUBJECTS:
            mine = [{k: v for k, v in r.items() if k != "subject"} for r in rows if r["subject"] == subject]
            (tmp_path / subject).mkdir()
            pq.write_table(pa.Table.from_pylist(mine), tmp_path / subject / "test-00000-of-00001.parquet")
    else:
        path = tmp_path / layout
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".parquet":
            pq.write_table(pa.Table.from_pylist(rows), path)
        elif path.suffix == ".json":
            path.write_text(json.dumps(rows))
        else:
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        _same_questions(load_mmlu(str(path)), load_mmlu())  # the file itself
    _same_questions(load_mmlu(str(tmp_path)), load_mmlu())  # the folder


def test_letter_answers_are_accepted_in_hub_rows(tmp_path):
    rows = [dict(r, answer="ABCD"[r["answer"]]) for r in _hub_rows()]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _same_questions(load_mmlu(str(tmp_path)), load_mmlu())


def _write_csv(folder, subject, rows):
    path = folder / f"{subject}_test.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


GOOD = ["Which is a colour?", "red", "table", "run", "seven", "A"]


@pytest.mark.parametrize(
    "bad, message",
    [
        (GOOD[:5], "line 2: expected 6 columns .*missing answer"),
        (GOOD[:5] + [""], "line 2: missing answer"),
        (GOOD[:5] + ["E"], "line 2: answer 'E' is out of range"),
        (GOOD[:4] + GOOD[5:], "line 2: expected 6 columns .*wrong number of choices"),
        (GOOD[:5] + ["extra", "A"], "line 2: expected 6 columns"),
    ],
)
def test_csv_row_errors_name_file_and_line(tmp_path, bad, message):
    path = _write_csv(tmp_path, "marketing", [GOOD, bad])
    with pytest.raises(DataError, match=message) as error:
        load_mmlu(str(tmp_path))
    assert str(path) in str(error.value)


def test_unknown_subject_file_is_an_error(tmp_path):
    path = _write_csv(tmp_path, "cooking", [GOOD])
    with pytest.raises(DataError, match="unknown MMLU subject 'cooking'") as error:
        load_mmlu(str(tmp_path))
    assert str(path) in str(error.value)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"answer": None}, "row 1: missing answer"),
        ({"answer": 4}, "row 1: answer 4 is out of range"),
        ({"answer": -1}, "row 1: answer -1 is out of range"),
        ({"answer": True}, "row 1: answer True is out of range"),
        ({"choices": ["a", "b", "c"]}, "row 1: field 'choices' must be a list of 4 strings, got 3"),
        ({"choices": "abcd"}, "row 1: field 'choices' must be a list of 4 strings"),
        ({"subject": "cooking"}, "row 1: unknown MMLU subject 'cooking'"),
        ({"question": ""}, "row 1: field 'question' is empty"),
    ],
)
def test_hub_row_errors_name_file_and_row(tmp_path, change, message):
    rows = _hub_rows()[:3]
    rows[1] = {k: v for k, v in {**rows[1], **change}.items() if v is not None}
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(DataError, match=message) as error:
        load_mmlu(str(path))
    assert str(path) in str(error.value)


def test_missing_subjects_and_sources(tmp_path):
    with pytest.raises(DataError, match=r"no test questions for \['virology'\]"):
        load_mmlu(subjects=["virology"])
    with pytest.raises(DataError, match="no MMLU test data under"):
        load_mmlu(str(tmp_path))
    with pytest.raises(DataError, match="MMLU source not found"):
        load_mmlu(str(tmp_path / "absent.csv"))
    with pytest.raises(ValueError, match="limit must be"):
        load_mmlu(limit=0)


def test_prompt_reads_like_the_commonsense_rows(llama3_tokenizer):
    example = load_mmlu()["astronomy"][0]
    instruction = mmlu_instruction(example.question, example.choices)
    assert instruction.startswith("Please choose the correct answer to the question: Which planet")
    assert instruction.endswith("\n\nAnswer format: answer1/answer2/answer3/answer4")
    # The ARC option parser reads exactly the four choices back.
    assert parse_options("ARC-Challenge", instruction) == {f"answer{k}": c for k, c in enumerate(example.choices, 1)}
    sequence = SegmentBuilder(llama3_tokenizer)(mmlu_messages(example), for_generation=True)
    assert sorted(set(sequence.segment_ids)) == [0, 1] and CAUSAL not in sequence.segment_ids  # system, user


def test_extraction_on_gold_answers_scores_100_percent():
    results = EvalResults(benchmark="mmlu")
    for rows in load_mmlu().values():
        for e in rows:
            for text in (f"the correct answer is {e.gold}", e.gold.capitalize() + ".", f"({e.gold}) because"):
                prediction = extract_answer(EXTRACTION_TASK, text)
                assert prediction == e.gold, text
            results.add(PredictionRecord(e.subject, e.index, e.gold, prediction, prediction == e.gold, "generate", text, benchmark="mmlu"))
    data = results.to_dict(model="gold", attention="mas", mode="generate")
    assert data["average_accuracy"] == data["micro_accuracy"] == 1.0
    assert extract_answer(EXTRACTION_TASK, "answer5") == "answer5"  # a wrong answer, not "no answer"
    assert extract_answer(EXTRACTION_TASK, "answer10") is None


def _records():
    """astronomy 1/1, nutrition 1/3 (one no-answer): macro 66.7, micro 50.0."""
    r = lambda subject, i, gold, pred: PredictionRecord(subject, i, gold, pred, pred == gold, "generate", benchmark="mmlu")  # noqa: E731
    return [r("astronomy", 0, "answer2", "answer2"), r("nutrition", 0, "answer1", "answer1"),
            r("nutrition", 1, "answer3", "answer4"), r("nutrition", 2, "answer2", None)]  # fmt: skip


def test_results_report_macro_micro_and_categories(tmp_path):
    results = EvalResults(benchmark="mmlu")
    results.extend(_records())
    data = results.write_json(tmp_path / "r.json", model="tiny", attention="mas", mode="generate", extra={"benchmark": "mmlu"})
    assert data["format"] == "mas-mmlu-results/1" and data["metric"] == "accuracy"
    assert list(data["tasks"]) == ["astronomy", "nutrition"]
    assert data["average_accuracy"] == pytest.approx((1.0 + 1 / 3) / 2)  # over subjects
    assert data["micro_accuracy"] == pytest.approx(2 / 4)  # over questions
    assert data["categories"]["STEM"] == {"accuracy": 1.0, "correct": 1, "total": 1, "subjects": 1, "of_subjects": 18}
    assert data["categories"]["other"]["accuracy"] == pytest.approx(1 / 3) and "humanities" not in data["categories"]
    assert data["counts"] == {"examples": 4, "correct": 2, "no_answer": 1}
    assert load_results(tmp_path / "r.json") == data
    lines = markdown_table([("tiny", data)]).splitlines()
    assert lines[0] == "| Run | STEM | Humanities | Social sciences | Other | Avg. (subjects) | Avg. (questions) |"
    assert lines[2] == "| tiny | 100.0 | – | – | 33.3 | 66.7 (2/57) | 50.0 |"
    assert lines[4:] == ["| Subject | tiny |", "| --- | ---: |", "| astronomy | 100.0 |", "| nutrition | 33.3 |"]


def test_records_resume_and_do_not_mix_with_commonsense(tmp_path):
    from mas.evaluation.results import append_predictions, load_done

    append_predictions(tmp_path / "p.jsonl", _records())
    done = load_done(tmp_path / "p.jsonl")
    assert set(done) == {("astronomy", 0), ("nutrition", 0), ("nutrition", 1), ("nutrition", 2)}
    assert all(r.benchmark == "mmlu" for r in done.values())
    with pytest.raises(ValueError, match="cannot join commonsense results"):
        EvalResults().add(_records()[0])
    with pytest.raises(ValueError, match="unknown MMLU subject"):
        PredictionRecord("boolq", 0, "true", "true", True, "generate", benchmark="mmlu")
    commonsense = {"benchmark": "commonsense", "tasks": {}}
    with pytest.raises(ValueError, match="different benchmarks"):
        markdown_table([("a", commonsense), ("b", {"benchmark": "mmlu", "tasks": {}})])
