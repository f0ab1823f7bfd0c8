"""Generated ids to text, piece by piece, with OpenAI ``stop`` strings.

A streamed piece must never show text that a stop string will later cut, nor half of a
multi-byte character: the text is decoded from all ids so far, and the tail that could still
be the start of a stop string (or is an unfinished character, U+FFFD) is held back until the
next token settles it.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

__all__ = ["TextStream"]

_REPLACEMENT = "\ufffd"


class TextStream:
    """The text of one choice as tokens arrive.

    Args:
        tokenizer: has ``decode(ids) -> str``.
        stop (Sequence[str]): strings that end the choice (not included in the text).
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: List[int] = []
        self.sent = 0  # characters already handed out
        self.text = ""

    def _held_back(self, text: str) -> int:
        """Characters at the end of ``text`` that may not be shown yet."""
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        if text.endswith(_REPLACEMENT):
            hold = max(hold, len(text) - len(text.rstrip(_REPLACEMENT)))
        return hold

    def add(self, token: int) -> Tuple[str, bool]:
        """Append a token.

        Returns:
            Tuple[str, bool]: the new text to show, and whether a stop string was reached (the
            text then ends just before it).
        """
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        hit: Optional[int] = None
        for s in self.stop:
            # Only look where new text appeared (a stop string may straddle the boundary).
            at = text.find(s, max(self.sent - len(s), 0))
            if at != -1 and (hit is None or at < hit):
                hit = at
        if hit is not None:
            self.text = text[:hit]
            return self._emit(len(self.text)), True
        self.text = text
        return self._emit(len(text) - self._held_back(text)), False

    def finish(self) -> str:
        """The text still held back, at the end of the choice."""
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        piece = self.text[self.sent : upto]
        self.sent = upto
        return piece
