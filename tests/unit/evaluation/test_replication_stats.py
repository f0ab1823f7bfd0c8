"""The replication study's statistics and synthetic tasks (tools/replication_report.py,
tools/replication_tasks.py): checked against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
from replication_report import decide, paired_statistics, sign_test_p, summarize
from replication_tasks import make_splits


def test_sign_test_is_the_exact_two_sided_binomial():
    assert sign_test_p(12, 0) == pytest.approx(2 / 4096)
    assert sign_test_p(9, 3) == pytest.approx(2 * (1 + 12 + 66 + 220) / 4096)  # 0.146
    assert sign_test_p(3, 9) == sign_test_p(9, 3)
    assert sign_test_p(2, 2) == 1.0 and sign_test_p(0, 0) == 1.0


def test_paired_statistics_mean_sd_t_interval_and_ties():
    stats = paired_statistics([2.0, 4.0, 0.0, 6.0])  # mean 3, sample sd sqrt(20/3), t(3) = 3.182
    half = 3.182 * math.sqrt(20 / 3) / 2
    assert stats["mean"] == 3.0 and stats["sd"] == pytest.approx(math.sqrt(20 / 3))
    assert stats["ci95"] == pytest.approx([3 - half, 3 + half])
    assert (stats["wins"], stats["losses"], stats["ties"]) == (3, 0, 1)
    assert stats["sign_test_p"] == pytest.approx(0.25)
    assert math.isnan(paired_statistics([1.0])["sd"])


def test_decision_rule_of_the_protocol():
    up = {"n": 12, "ci95": [0.5, 9.0]}
    across = {"n": 12, "ci95": [-1.0, 9.0]}
    down = {"n": 12, "ci95": [-9.0, -0.5]}
    assert decide("H1", up) == "supported" and decide("H1", across) == "not decided" and decide("H1", down) == "contradicted"
    assert decide("H2", down) == "supported" and decide("H2", up) == "contradicted"
    assert decide("H1", {"n": 1, "ci95": [float("nan")] * 2}) == "not decided"


def test_summary_pairs_each_seed_with_itself():
    records = [
        {"task": "t", "seed": s, "trained": tr, "evaluated": ev, "step": 10, "accuracy": acc}
        for s, accs in ((1, (60, 50, 40, 45)), (2, (70, 55, 30, 50)))
        for (tr, ev), acc in zip((("mas", "mas"), ("causal", "causal"), ("mas", "causal"), ("causal", "mas")), accs)
    ]
    summary = summarize(records, [{"task": "t", "evaluated": "mas", "accuracy": 50.0}], [1, 2], {"t": (10,)})["t"]
    assert summary["crossings"]["mas->mas"]["10"]["values"] == [60, 70]
    assert summary["hypotheses"]["H1"]["10"]["differences"] == [10, 15]
    assert summary["hypotheses"]["H2"]["10"]["differences"] == [-20, -40]
    assert summary["hypotheses"]["H2b"]["10"]["differences"] == [-5, -5]
    assert summary["base"] == {"mas": 50.0}


@pytest.mark.parametrize("task", ["membership", "majority"])
def test_splits_are_seeded_disjoint_and_balanced(task):
    first = make_splits(task, seed=0, train_rows=400, pretrain_rows=100, test_rows=60)
    assert first == make_splits(task, seed=0, train_rows=400, pretrain_rows=100, test_rows=60)
    held_out = [r["instruction"] for r in first.test]
    assert len(set(held_out)) == 60 and sum(r["answer"] == "yes" for r in first.test) == 30
    assert not set(held_out) & {r["instruction"] for r in first.train + first.pretrain}
    assert 0.4 < sum(r["answer"] == "yes" for r in first.train) / 400 < 0.6
    for row in first.test:  # the question comes after the list, and the answer is right
        listed, question = row["instruction"].split("\n")[:2]
        items = listed.removeprefix("List: ").split()
        if task == "membership":
            truth = question.split()[3] in items
        else:
            truth = items.count("v") > items.count("j")
        assert row["answer"] == ("yes" if truth else "no") and row["output"] == f"the correct answer is {row['answer']}"
