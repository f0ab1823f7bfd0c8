"""Today's inference gives the tokens and scores the two-engine code gave (golden file written by
``tests/support/golden_inference.py`` at commit d850815): ``mas.generate`` greedy (MAS and causal,
batch sizes 1 and 3, with and without the system-prompt cache) and seeded sampling alone, and
``mas_eval`` in generate and loglik modes."""

from __future__ import annotations

import json

import pytest
from support import golden_inference as golden


@pytest.fixture(scope="module")
def pinned():
    return json.loads(golden.GOLDEN_FILE.read_text())


def test_generate_gives_the_pinned_tokens(pinned):
    got = golden.generate_outputs()
    assert set(got) == set(pinned["generate"])
    for case, rows in pinned["generate"].items():
        assert got[case] == rows, case


@pytest.mark.slow
def test_eval_gives_the_pinned_predictions_and_scores(pinned, tmp_path):
    got = golden.eval_outputs(tmp_path)
    assert got["generate"] == pinned["eval"]["generate"]
    assert [task for task, _ in got["loglik"]] == [task for task, _ in pinned["eval"]["loglik"]]
    for (task, scores), (_, expected) in zip(got["loglik"], pinned["eval"]["loglik"]):
        assert scores.keys() == expected.keys(), task
        assert all(abs(scores[k] - expected[k]) <= 2e-4 for k in scores), (task, scores, expected)
