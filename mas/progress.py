"""Progress of a long wait: a tqdm bar on a terminal, plain timed lines anywhere else.

Off a terminal (``make demo 2>&1 | cat``, a CI log, ``nohup``), tqdm either prints nothing
(``disable=None``) or redraws its bar with carriage returns, which a log file keeps as one
ever-growing line. :class:`Progress` prints plain lines there instead, once the wait has lasted
a few seconds: the first after ``first_after`` seconds, then one every ``every`` seconds, and one
when it ends, each saying how far, how long so far, about how long is left, and the caller's
latest figures (loss, accuracy). A wait shorter than ``first_after`` prints nothing, so a quick
step adds no lines between a command and its result (or its one-line error)::

    pre-training the tiny base once (/tmp/mas_runs/tiny_llama3_2): 26/200 steps (13%), 5 s, about 33 s left, loss 5.410
    pre-training the tiny base once (/tmp/mas_runs/tiny_llama3_2): 78/200 steps (39%), 15 s, about 23 s left, loss 3.902
    ...
    pre-training the tiny base once (/tmp/mas_runs/tiny_llama3_2): 200/200 steps (100%), 39 s, loss 2.871

This module imports nothing from ``mas``.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Dict, Optional, TextIO

from tqdm import tqdm

__all__ = ["FIRST_LINE_SECONDS", "PLAIN_PROGRESS_SECONDS", "Progress"]

#: Off a terminal: seconds of waiting before the first plain line, and between two lines after it.
FIRST_LINE_SECONDS = 5.0
PLAIN_PROGRESS_SECONDS = 10.0


def _is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class Progress:
    """A count towards ``total`` shown as a bar (terminal) or periodic lines (anything else).

    Args:
        total (int): the count at which the wait ends.
        desc (str): what is being waited for; starts every line.
        initial (int): the count already done (a resumed run).
        unit (str): what is counted, plural in lines ("steps", "examples").
        enabled (bool): False shows nothing at all.
        stream (Optional[TextIO]): where to write; None: ``sys.stderr`` at creation, as tqdm.
        first_after (Optional[float]): seconds before the first plain line (a shorter wait shows
            none); None: :data:`FIRST_LINE_SECONDS`.
        every (Optional[float]): seconds between two plain lines after the first; None:
            :data:`PLAIN_PROGRESS_SECONDS`.
        leave (bool): keep a terminal bar on screen when it closes.
    """

    def __init__(
        self,
        total: int,
        desc: str,
        *,
        initial: int = 0,
        unit: str = "steps",
        enabled: bool = True,
        stream: Optional[TextIO] = None,
        first_after: Optional[float] = None,
        every: Optional[float] = None,
        leave: bool = True,
    ) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.every = PLAIN_PROGRESS_SECONDS if every is None else every
        first_after = FIRST_LINE_SECONDS if first_after is None else first_after
        self.count = initial
        self._initial = initial
        self._stream = stream if stream is not None else sys.stderr
        self._postfix: Dict[str, str] = {}
        self._closed = not enabled
        self._bar: Optional[tqdm] = None
        if not enabled:
            return
        if _is_terminal(self._stream):
            self._bar = tqdm(
                total=total, initial=initial, desc=desc, unit=unit.rstrip("s") or unit, file=self._stream,
                dynamic_ncols=True, leave=leave,
            )  # fmt: skip
        else:
            self._start = time.monotonic()
            self._next_line = self._start + first_after
            self._lines = 0

    @property
    def plain(self) -> bool:
        """Whether progress is shown as plain lines (enabled, not on a terminal)."""
        return self._bar is None and not self._closed

    def update(self, n: int = 1) -> None:
        """Count ``n`` more; off a terminal, a line when ``every`` seconds have passed."""
        self.count += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.plain and time.monotonic() >= self._next_line:
            self._line(final=False)

    def set_postfix(self, **figures: Any) -> None:
        """Figures shown after the count (the latest loss, an accuracy); kept until replaced."""
        self._postfix = {k: str(v) for k, v in figures.items()}
        if self._bar is not None:
            self._bar.set_postfix(self._postfix)

    def close(self) -> None:
        """End the wait: a terminal bar closes; plain lines, if the wait showed any, end with one."""
        if self._closed:
            return
        if self._bar is not None:
            self._bar.close()
        elif self._lines:
            self._line(final=True)
        self._closed = True

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _line(self, *, final: bool) -> None:
        now = time.monotonic()
        self._next_line = now + self.every
        self._lines += 1
        elapsed = now - self._start
        text = f"{self.desc}: {self.count}/{self.total} {self.unit} ({100 * self.count / max(self.total, 1):.0f}%), {elapsed:.0f} s"
        done = self.count - self._initial
        if not final and 0 < done and self.count < self.total:
            text += f", about {elapsed / done * (self.total - self.count):.0f} s left"
        if self._postfix:
            text += ", " + ", ".join(f"{k} {v}" for k, v in self._postfix.items())
        print(text, file=self._stream, flush=True)
