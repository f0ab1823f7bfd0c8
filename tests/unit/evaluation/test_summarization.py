"""Summarization: ROUGE sanity and offline use, field-name variants, loading, document fitting,
results and table, and the loglik-mode error.

Data: ``mas/assets/summarization_sample`` (8 synthetic documents in XSum, CNN/DailyMail and
BillSum field layouts; see its README) and rows written by the tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mas.config import ConfigError
from mas.data.rows import DataError
from mas.evaluation.benchmarks import benchmark_modes
from mas.evaluation.loop import evaluate_benchmark
from mas.evaluation.results import EvalResults, PredictionRecord, load_results, markdown_table
from mas.evaluation.summarization import (
    INSTRUCTION,
    SAMPLE_SOURCE,
    SUMMARIZATION,
    fit_document,
    load_summarization,
    rouge_scores,
    summary_messages,
)
from mas.evaluation.spec import BenchmarkContext, BenchmarkData
from mas.generation import GenerationSettings
from mas.segments import SegmentBuilder


def test_rouge_identical_is_one_and_disjoint_is_zero():
    text = "The council voted to turn the old station into a library."
    assert rouge_scores(text, text) == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0, "rougeLsum": 1.0}
    assert rouge_scores("purple elephants dance quietly", text) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0, "rougeLsum": 0.0}
    assert rouge_scores("", text)["rougeL"] == 0.0
    assert rouge_scores("Cats running!", "the cat runs")["rouge1"] == pytest.approx(0.8)  # stemmed, case and punctuation free
    partial = rouge_scores("the council voted", text)
    assert 0.0 < partial["rougeL"] < 1.0 and partial["rougeL"] == pytest.approx(2 * 1.0 * (3 / 11) / (1.0 + 3 / 11))


def test_rouge_needs_no_downloaded_data(monkeypatch):
    import nltk

    def no_download(*args, **kwargs):
        raise AssertionError("ROUGE tried to download nltk data")

    monkeypatch.setattr(nltk, "download", no_download)
    monkeypatch.setattr(nltk.data, "path", [])  # no corpus can be found
    assert rouge_scores("rivers flooded the towns", "the river floods a town")["rouge1"] > 0.0


def test_bundled_sample_and_field_name_variants():
    data = load_summarization()
    assert {k: len(v) for k, v in data.items()} == {"billsum_style": 2, "cnn_dailymail_style": 3, "xsum_style": 3}
    assert data["cnn_dailymail_style"][0].summary.count("\n") == 2  # highlights kept as lines
    assert data["xsum_style"][0].where.endswith("xsum_style.jsonl, line 1")
    assert data["billsum_style"][1].document.startswith("Section 1. Short title.")


@pytest.mark.parametrize("document_field, summary_field", [("document", "summary"), ("article", "highlights"), ("text", "summary")])
def test_each_naming_scheme_reads_the_same(tmp_path, document_field, summary_field):
    path = tmp_path / "set.jsonl"
    path.write_text(json.dumps({document_field: "A long document.", summary_field: "Short.", "id": "7"}) + "\n")
    (example,) = load_summarization(str(path))["set"]
    assert (example.document, example.summary, example.index) == ("A long document.", "Short.", 0)


@pytest.mark.parametrize(
    "row, message",
    [
        ({"summary": "s"}, r"line 2: no document field \(expected one of document, article, text; row has \['summary'\]\)"),
        ({"document": "d"}, r"line 2: no summary field \(expected one of summary, highlights"),
        ({"document": "", "summary": "s"}, "line 2: field 'document' is empty"),
        ({"article": 3, "highlights": "s"}, "line 2: field 'article' must be a string"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, row, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"document": "ok", "summary": "ok"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=message) as error:
        load_summarization(str(path))
    assert str(path) in str(error.value)


def test_sources_tasks_and_limits(tmp_path):
    for name in ("xsum", "cnndm"):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"document": f"d{i}", "summary": f"s{i}"}) + "\n" for i in range(3)))
    (tmp_path / "billsum").mkdir()
    (tmp_path / "billsum" / "test.json").write_text(json.dumps([{"text": "t", "summary": "s"}]))
    assert list(load_summarization(str(tmp_path))) == ["cnndm", "xsum"]  # every file of the folder
    picked = load_summarization(str(tmp_path), tasks=["xsum", "billsum"], limit=2)
    assert {k: len(v) for k, v in picked.items()} == {"xsum": 2, "billsum": 1}
    assert list(load_summarization(str(tmp_path / "xsum.jsonl"), tasks=["XSum"])) == ["XSum"]
    with pytest.raises(DataError, match="no file for data set 'gigaword'"):
        load_summarization(str(tmp_path), tasks=["gigaword"])
    with pytest.raises(DataError, match="summarization source not found"):
        load_summarization(str(tmp_path / "absent.jsonl"))


def test_prompt_is_the_training_template_with_an_input(llama3_tokenizer):
    messages = summary_messages("The river rose.")
    assert [m.role for m in messages] == ["system", "user"]
    user = messages[1].content[0]["content"]
    assert user == f"### Instruction:\n{INSTRUCTION}\n\n### Input:\nThe river rose.\n\n### Response:\n"
    assert sorted(set(SegmentBuilder(llama3_tokenizer)(messages, for_generation=True).segment_ids)) == [0, 1]


def _texts(messages):
    return [(m.role, m.content[0]["content"]) for m in messages]


def test_fit_document_cuts_the_end_to_the_budget(llama3_tokenizer):
    builder = SegmentBuilder(llama3_tokenizer)
    document = load_summarization()["billsum_style"][0].document
    full = len(builder(summary_messages(document), for_generation=True))
    messages, cut = fit_document(builder, document, full)
    assert cut == 0 and _texts(messages) == _texts(summary_messages(document))
    messages, cut = fit_document(builder, document, full - 100)
    assert cut >= 100 and len(builder(messages, for_generation=True)) <= full - 100
    kept = messages[1].content[0]["content"].split("### Input:\n")[1].split("\n\n### Response:")[0]
    assert document.startswith(kept) and messages[1].content[0]["content"].endswith("### Response:\n")
    with pytest.raises(DataError, match="does not fit 10 tokens"):
        fit_document(builder, document, 10)


def _record(task, index, generation, gold, cut=0):
    return PredictionRecord(task, index, gold, generation or None, None, "generate", generation,
                            scores=rouge_scores(generation, gold), info={"truncated_tokens": cut} if cut else None,
                            benchmark="summarization")  # fmt: skip


def test_results_average_rouge_l_over_data_sets(tmp_path):
    results = EvalResults(benchmark="summarization")
    results.extend([_record("xsum", 0, "a b c", "a b c"), _record("xsum", 1, "", "x y", cut=40), _record("cnndm", 0, "a b", "a b c d")])
    data = results.write_json(tmp_path / "r.json", model="tiny", attention="mas", mode="generate")
    assert list(data["tasks"]) == ["cnndm", "xsum"]
    assert data["tasks"]["xsum"] == {"rouge1": 0.5, "rouge2": 0.5, "rougeL": 0.5, "rougeLsum": 0.5, "total": 2, "no_answer": 1, "truncated": 1}
    cnndm_l = 2 * 1.0 * 0.5 / 1.5
    assert data["average"] == pytest.approx((0.5 + cnndm_l) / 2) and data["metric"] == "rougeL"
    assert data["average_accuracy"] is None
    assert data["counts"] == {"examples": 3, "no_answer": 1, "truncated": 1}
    assert load_results(tmp_path / "r.json") == data
    lines = markdown_table([("tiny", data)]).splitlines()
    assert lines[0] == "| Run | Data set | ROUGE-1 | ROUGE-2 | ROUGE-L | ROUGE-Lsum | Examples | Truncated |"
    assert lines[3] == "| tiny | xsum | 50.0 | 50.0 | 50.0 | 50.0 | 2 | 1 |"


@pytest.mark.parametrize("mode, cfg_mode", [("loglik", "loglik"), ("generate", "both")])
def test_loglik_mode_is_a_config_error(mode, cfg_mode, tmp_path):
    context = BenchmarkContext(
        model=None, tokenizer=None, builder=None, settings=GenerationSettings(), mode=mode,
        data=BenchmarkData(), predictions_path=Path(tmp_path / "p.jsonl"),
    )  # fmt: skip
    with pytest.raises(ConfigError, match="set mode=generate"):
        benchmark_modes(SUMMARIZATION, cfg_mode)
    if mode == "loglik":  # the loop refuses the mode too, before writing anything
        with pytest.raises(ConfigError, match="set mode=generate"):
            evaluate_benchmark(SUMMARIZATION, context)
    assert not (tmp_path / "p.jsonl").exists()


def test_sample_source_is_packaged():
    assert SAMPLE_SOURCE.is_dir() and (SAMPLE_SOURCE / "README.md").read_text().startswith("# Synthetic")
