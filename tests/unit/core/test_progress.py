"""Long waits show progress off a terminal too: plain lines, never carriage-return bars."""

from __future__ import annotations

import io

import torch

from mas.models import tiny_llama3_2
from mas.models.pretrain_base import pretrain_causal_lm
from mas.progress import Progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_progress_is_plain_lines_every_interval_and_at_the_end():
    stream = io.StringIO()
    bar = Progress(4, "waiting", unit="steps", stream=stream, first_after=0.0, every=0.0)
    for _ in range(4):
        bar.update()
    bar.set_postfix(loss="1.250")
    bar.close()
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[0].startswith("waiting: 1/4 steps (25%), ") and "s left" in lines[0]
    assert lines[-1].startswith("waiting: 4/4 steps (100%), ") and lines[-1].endswith("loss 1.250")
    assert len(lines) == 5  # one per update (interval 0), then the end


def test_a_short_wait_prints_nothing_and_lines_are_spaced_by_the_interval():
    short = io.StringIO()
    with Progress(1000, "waiting", stream=short) as bar:  # well under FIRST_LINE_SECONDS
        bar.update(1000)
    assert short.getvalue() == ""
    spaced = io.StringIO()
    with Progress(1000, "waiting", stream=spaced, first_after=0.0, every=3600.0) as bar:
        for _ in range(1000):
            bar.update()
    assert len(spaced.getvalue().splitlines()) == 2  # the first update's line and the end


def test_disabled_progress_writes_nothing_and_a_terminal_gets_a_bar():
    quiet = io.StringIO()
    with Progress(3, "waiting", stream=quiet, enabled=False) as bar:
        bar.update(3)
    assert quiet.getvalue() == ""
    terminal = _Terminal()
    with Progress(3, "waiting", stream=terminal) as bar:
        assert not bar.plain
        bar.update(3)
    assert "\r" in terminal.getvalue()  # tqdm's bar, redrawn in place


def test_pretraining_off_a_terminal_prints_progress_lines(monkeypatch):
    """The first use of the tiny base (and tools/pretrain_tiny_base.py) pre-trains for a minute
    or more: under a pipe it says so, with plain lines on stderr."""
    monkeypatch.setattr("mas.progress.FIRST_LINE_SECONDS", 0.0)
    monkeypatch.setattr("mas.progress.PLAIN_PROGRESS_SECONDS", 0.0)
    model = tiny_llama3_2(num_layers=1, embed_dim=16, num_heads=2, num_kv_heads=1, intermediate_dim=32, vocab_size=64)
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    sequences = [[1, 5, 7, 9, 11], [1, 4, 4, 8]]
    losses = pretrain_causal_lm(model, sequences, steps=3, seed=0, pad_id=0, batch_size=2, progress="pre-training the probe")
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("pre-training the probe: 1/3 steps (33%), ") and "loss " in lines[0]
    assert lines[-1].startswith("pre-training the probe: 3/3 steps (100%)") and "loss " in lines[-1]
    assert "\r" not in stream.getvalue()
