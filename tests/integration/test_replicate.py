"""`tools/replicate.py --ci`: the mechanics of the miniature replication, never its outcome.

The CI-sized study (2 seeds, a few steps, 16 held-out rows) runs in a subprocess that is killed
after its first fine-tune; the same command then continues it (finished runs skipped by their
markers) and writes every file and table; a fine-tune that lost its last checkpoint resumes from
the one before; another study's folder is refused. Accuracies are never asserted.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "replicate.py"


def _lines(text: str) -> list:
    return [line for line in text.splitlines() if line.startswith("[")]


def _kill_after_first_finetune(out: Path) -> list:
    """Start the CI study and kill it (SIGKILL) once its first fine-tune has finished."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(TOOL), "--ci", "--in-process", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    seen = []
    try:
        for line in proc.stdout:
            if line.startswith("["):
                seen.append(line.rstrip())
            if "finetune" in line and "done in" in line:
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    return seen


@pytest.mark.slow
def test_ci_study_writes_every_file_and_resumes_after_a_kill(tmp_path, capsys):
    import replicate

    out = tmp_path / "study"
    before = _kill_after_first_finetune(out)
    assert before and "finetune membership seed 100 mas: done in" in before[-1], before
    finished = len(before)

    assert replicate.main(["--ci", "--in-process", "--out", str(out)]) == 0
    lines = _lines(capsys.readouterr().out)
    total = len(lines)
    assert total == 16  # data, base, base x 2 masks, then 2 seeds x 2 masks x (fine-tune + 2 evals)
    assert all("done before, skipped" in line for line in lines[:finished]), lines
    assert all("done in" in line for line in lines[finished:]), lines
    assert all(line.startswith(f"[{i}/{total}] ") for i, line in enumerate(lines, 1))

    # Every file and table.
    results = out / "results"
    for name in ("per_run.jsonl", "summary.json", "summary.md", "learning_curves.png"):
        assert (results / name).stat().st_size > 0, name
    assert (out / "study.json").exists() and (out / "replication_results.md").exists()
    records = [json.loads(line) for line in (results / "per_run.jsonl").read_text().splitlines()]
    runs = [r for r in records if not r.get("base")]
    assert len(runs) == 2 * 4 * 2  # seeds x crossings x chosen steps
    assert {(r["trained"], r["evaluated"]) for r in runs} == {("mas", "mas"), ("causal", "causal"), ("mas", "causal"), ("causal", "mas")}
    assert {r["step"] for r in runs} == {10, 20} and all(r["total"] == 16 for r in runs)
    assert {(r["task"], r["evaluated"]) for r in records if r.get("base")} == {("membership", "mas"), ("membership", "causal")}
    summary = json.loads((results / "summary.json").read_text())
    assert summary["study"]["complete"] is True
    task = summary["tasks"]["membership"]
    assert set(task["crossings"]) == {"mas->mas", "causal->causal", "mas->causal", "causal->mas"}
    assert set(task["hypotheses"]) == {"H1", "H2", "H2b"}
    for test in task["hypotheses"]["H1"].values():
        assert test["n"] == 2 and test["wins"] + test["losses"] + test["ties"] == 2 and 0 <= test["sign_test_p"] <= 1
    report = (out / "replication_results.md").read_text()
    for heading in ("### Primary tests", "### Task `membership`", "Every per-seed number", "| H1 on membership at step 20 |"):
        assert heading in report, heading
    assert "Partial study" not in report

    # A fine-tune that lost its last checkpoint resumes from the one before; the rest is skipped.
    checkpoints = out / "runs" / "membership" / "s101_causal" / "checkpoints"
    shutil.rmtree(checkpoints / "step_0000020")
    (checkpoints / "latest").write_text("step_0000010")
    kept = (checkpoints / "step_0000010" / "recipe_state.pt").stat().st_mtime_ns
    assert replicate.main(["--ci", "--in-process", "--out", str(out)]) == 0
    again = _lines(capsys.readouterr().out)
    redone = [line for line in again if "done in" in line]
    assert len(redone) == 1 and "finetune membership seed 101 causal" in redone[0], again
    assert (checkpoints / "step_0000020" / "adapter_model.safetensors").exists()
    assert (checkpoints / "step_0000010" / "recipe_state.pt").stat().st_mtime_ns == kept  # resumed, not restarted

    # Another study's folder is refused in one line.
    (out / "study.json").write_text(json.dumps({**json.loads((out / "study.json").read_text()), "seeds": [1]}))
    assert replicate.main(["--ci", "--in-process", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"replicate: {out} holds another study (seeds: [1] there, [100, 101] here)") and "\n" not in err


def test_plan_lists_the_pre_registered_study(capsys):
    import replicate

    assert replicate.main(["--plan", "--out", "/nonexistent/never/written"]) == 0
    lines = capsys.readouterr().out.splitlines()
    study = replicate.FULL
    assert len(lines) == 4 + len(study.tasks) * len(study.seeds) * 2 * 3
    assert lines[0].startswith("[1/") and "finetune majority seed 111 causal" in "\n".join(lines)
    assert not Path("/nonexistent/never/written").exists()
