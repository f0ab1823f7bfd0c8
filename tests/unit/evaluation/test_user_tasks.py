"""User-defined tasks: declarations, their items in each mode, per-group results, tables, win rate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mas.config import ConfigError
from mas.errors import DataError
from mas.evaluation import BENCHMARKS, benchmark_modes, get_suite
from mas.evaluation.records import exact_match, normalize_answer
from mas.evaluation.results import EvalResults, PredictionRecord, load_results, markdown_table, suite_of, win_rate_row
from mas.evaluation.spec import BenchmarkContext, BenchmarkData
from mas.evaluation.suites import USER_RESULTS_FORMAT
from mas.evaluation.user_tasks import load_task_file, parse_user_tasks, register_user_tasks
from mas.generation import GenerationSettings

REPO = Path(__file__).resolve().parents[3]
ROWS = [
    {"instruction": "Is 3 bigger than 5?\n\nAnswer format: yes/no", "input": "", "output": "the correct answer is no", "answer": "no", "kind": "small"},
    {"instruction": "Is 9 bigger than 2?\n\nAnswer format: yes/no", "input": "", "output": "the correct answer is yes", "answer": "Yes", "kind": "big"},
    {"instruction": "Pick: Option1: red Option2: blue\n\nAnswer format: option1/option2", "input": "", "output": "x", "answer": "option2", "kind": "big"},
]


def _task_file(tmp_path: Path, body: str) -> Path:
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS[:2]) + "\n")
    (tmp_path / "options.jsonl").write_text(json.dumps(ROWS[2]) + "\n")
    path = tmp_path / "tasks.yaml"
    path.write_text(body)
    return path


def _context(tmp_path, mode, **data):
    return BenchmarkContext(None, None, None, GenerationSettings(), BenchmarkData(**data), mode, tmp_path / "p.jsonl")


def test_task_file_declares_tasks_and_their_items(tmp_path):
    path = _task_file(tmp_path, """
benchmark: mine
tasks:
  - name: bigger
    rows: rows.jsonl
    labels: [Yes, No]
    group_by: kind
  - name: pick
    rows: options.jsonl
    option_marker: Option
    modes: [loglik]
    answer_template: "I pick {label}"
""")
    name, tasks = load_task_file(path)
    assert name == "mine" and [t.name for t in tasks] == ["bigger", "pick"]
    assert tasks[0].labels == ("yes", "no") and tasks[0].scoring_modes == ("generate", "loglik", "exact")
    assert tasks[0].rows == str((tmp_path / "rows.jsonl").resolve())  # relative to the task file
    benchmark = register_user_tasks("mine_unit", tasks)
    assert BENCHMARKS["mine_unit"] is benchmark and list(benchmark.modes) == ["generate", "loglik", "exact"]
    loglik = benchmark.items(_context(tmp_path, "loglik"))
    assert [(i.task, i.index, i.gold, i.options) for i in loglik] == [
        ("bigger", 0, "no", ("yes", "no")), ("bigger", 1, "yes", ("yes", "no")), ("pick", 0, "option2", ("option1", "option2")),
    ]  # fmt: skip
    assert loglik[2].answer_template == "I pick {label}" and loglik[0].info == {"group": "small"}
    system, user = loglik[0].messages
    assert system.role == "system" and "### Instruction:\nIs 3 bigger than 5?" in user.text_content
    generate = benchmark.items(_context(tmp_path, "generate", tasks=("bigger",), limit=1))
    assert [(i.task, i.labels, i.options) for i in generate] == [("bigger", ("yes", "no"), ())]
    exact = benchmark.items(_context(tmp_path, "exact"))
    assert [i.gold for i in exact] == ["no", "Yes"]  # the pick task has no exact mode
    assert benchmark_modes(benchmark, "all") == ["generate", "loglik", "exact"]


def test_template_and_chat_formats(tmp_path):
    (tmp_path / "q.jsonl").write_text(json.dumps({"q": "2+2?", "a": "4"}) + "\n")
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                         {"role": "assistant", "content": "Paris"}]}  # fmt: skip
    (tmp_path / "chat.jsonl").write_text(json.dumps(chat) + "\n")
    tasks = parse_user_tasks(
        [{"name": "math", "rows": str(tmp_path / "q.jsonl"), "template": "Question: {q}\nAnswer:", "system": "You add.", "answer_field": "a"},
         {"name": "capital", "rows": str(tmp_path / "chat.jsonl"), "format": "chat"}],
        "user_tasks",
    )  # fmt: skip
    assert tasks[0].format == "template" and tasks[0].scoring_modes == ("exact",)
    items = register_user_tasks("formats_unit", tasks).items(_context(tmp_path, "exact"))
    assert [m.text_content for m in items[0].messages] == ["You add.", "Question: 2+2?\nAnswer:"] and items[0].gold == "4"
    assert [m.role for m in items[1].messages] == ["system", "user"] and items[1].gold == "Paris"


@pytest.mark.parametrize(
    "declared, message",
    [
        ([{"name": "t", "rows": "r.jsonl", "lables": ["a"]}], r"unknown task key 'lables' \(did you mean 'labels'\?\)"),
        ([{"rows": "r.jsonl"}], r"'name' is required"),
        ([{"name": "t", "rows": "r.jsonl", "modes": ["loglik"]}], r"give 'labels' \(the answer vocabulary\) or 'option_marker'"),
        ([{"name": "t", "rows": "r.jsonl", "labels": ["a"], "modes": ["logprob"]}], r"unknown mode 'logprob'"),
        ([{"name": "t", "rows": "r.jsonl", "format": "alpacca"}], r"did you mean 'alpaca'"),
        ([{"name": "t", "rows": "r"}, {"name": "t", "rows": "r"}], r"'t' is declared twice"),
    ],
)
def test_bad_declarations_fail_with_one_line(declared, message):
    with pytest.raises(ConfigError, match=message) as error:
        parse_user_tasks(declared, "tasks.yaml")
    assert "\n" not in str(error.value)


def test_bad_rows_and_names(tmp_path):
    (tmp_path / "rows.jsonl").write_text(json.dumps({**ROWS[0], "answer": "maybe"}) + "\n")
    tasks = parse_user_tasks([{"name": "t", "rows": str(tmp_path / "rows.jsonl"), "labels": ["yes", "no"], "group_by": "level"}], "x")
    benchmark = register_user_tasks("bad_rows_unit", tasks)
    with pytest.raises(DataError, match=r"rows.jsonl, line 1: gold answer 'maybe' is not one of the labels"):
        benchmark.items(_context(tmp_path, "generate"))
    with pytest.raises(ConfigError, match=r"unknown task 'u'"):
        benchmark.items(_context(tmp_path, "generate", tasks=("u",)))
    with pytest.raises(ConfigError, match="not the built-in 'commonsense'"):
        register_user_tasks("commonsense", tasks)


def test_exact_match_normalizes_case_spaces_and_punctuation():
    assert normalize_answer("  The  Answer. ") == "the answer"
    assert exact_match("Paris.\nbecause ...", "paris") == (True, None)
    assert exact_match("Lyon", "Paris") == (False, None)


def _records(benchmark, right):
    return [
        PredictionRecord("bigger", i, "yes", "yes" if ok else "no", ok, "generate", info={"group": "big" if i < 2 else "small"}, benchmark=benchmark)
        for i, ok in enumerate(right)
    ]


def test_results_of_user_tasks_show_their_names_groups_and_only_their_tasks(tmp_path):
    tasks = parse_user_tasks([{"name": "bigger", "rows": "r.jsonl", "labels": ["yes", "no"]}, {"name": "unused", "rows": "r", "labels": ["a"]}], "x")
    register_user_tasks("groups_unit", tasks)
    results = EvalResults(benchmark="groups_unit")
    results.extend(_records("groups_unit", [True, False, True]))
    data = results.write_json(tmp_path / "r.json", model="tiny", attention="mas", mode="generate")
    assert data["format"] == USER_RESULTS_FORMAT and list(data["tasks"]) == ["bigger"]
    assert data["tasks"]["bigger"]["groups"] == {
        "big": {"accuracy": 0.5, "correct": 1, "total": 2}, "small": {"accuracy": 1.0, "correct": 1, "total": 1},
    }  # fmt: skip
    lines = markdown_table([("tiny", data)]).splitlines()
    assert lines[:3] == ["| Run | bigger | Avg. |", "| --- | ---: | ---: |", "| tiny | 66.7 | 66.7 |"]
    assert lines[4:] == ["| bigger: group | tiny |", "| --- | ---: |", "| big | 50.0 (2) |", "| small | 100.0 (1) |"]
    # Another process, where the benchmark is not registered, reads the file by its task list.
    del BENCHMARKS["groups_unit"]
    loaded = load_results(tmp_path / "r.json")
    assert suite_of(loaded).tasks == ("bigger",)
    with pytest.raises(ValueError, match="unknown benchmark"):
        get_suite("groups_unit")
    causal = {**loaded, "tasks": {"bigger": {**loaded["tasks"]["bigger"], "accuracy": 0.5}}}
    assert win_rate_row([(causal, loaded)], label="win") == "| win | 100% (1/1) | 100% (1/1) |"


def test_compare_tool_pairs_user_task_runs(tmp_path):
    register_user_tasks("compare_unit", parse_user_tasks([{"name": "bigger", "rows": "r", "labels": ["yes", "no"]}], "x"))
    paths = []
    for trained, right in (("causal", [True, False, False]), ("mas", [True, True, False])):
        results = EvalResults(benchmark="compare_unit")
        results.extend(_records("compare_unit", right))
        path = tmp_path / f"{trained}.json"
        results.write_json(path, model=f"own_{trained}", attention=trained, mode="generate", extra={
            "experiment": "own", "trained_attention": trained, "step": 10, "run_name": f"own_{trained} step 10 (trained {trained}, eval {trained})",
        })  # fmt: skip
        paths.append(path)
    out = subprocess.run([sys.executable, str(REPO / "tools" / "compare_results.py"), *map(str, paths)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "| Run | bigger | Avg. |"
    assert lines[2] == "| own_causal step 10 (trained causal, eval causal) | 33.3 | 33.3 |"
    assert "| mas > causal (win rate) | 100% (1/1) | 100% (1/1) |" in lines
