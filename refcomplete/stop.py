"""Stop strings, UTF-8 completion and the streaming holdback of one candidate's text.

Knows: text so far + new characters -> where generation stops and what may be shown
(SEMANTICS 7). Does not know: logits, sampling, response shapes.

The decisions are small pure functions; `RowText` only keeps their state per candidate:

    >>> find_stop("Hello\\nWorld", ("\\n", "World"))
    5
    >>> cut("Hel", "lo END", ("END",))          # (text, stopped)
    ('Hello ', True)
    >>> releasable(text_len=10, emitted=3, hold=4, finished=False)
    6

Rules: only generated text is searched; after each token the text is cut at the start of
the earliest match; while streaming, `max(len(stop)) - 1` characters and the bytes of an
unfinished UTF-8 character are held back until resolved, so a stream never shows
characters the final text does not have, and its concatenation is the final text.
"""

from __future__ import annotations

from typing import Any


def holdback(stops: tuple[str, ...]) -> int:
    """Characters a stream must hold back: the longest stop minus one (0 without stops)."""
    return max((len(s) for s in stops), default=1) - 1


def find_stop(text: str, stops: tuple[str, ...], start: int = 0) -> int | None:
    """Index of the earliest occurrence (at or after `start`) of any stop string, else None."""
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None


def cut(text: str, new: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """Append `new` to `text`; cut at the start of the earliest stop match.

    Only matches ending inside `new` can be new, so the search starts
    `longest stop - 1` characters before the end of `text`.
    """
    full = text + new
    i = find_stop(full, stops, max(0, len(text) - holdback(stops)))
    return (full, False) if i is None else (full[:i], True)


def releasable(text_len: int, emitted: int, hold: int, finished: bool) -> int:
    """How many characters of the text a stream may have shown (never fewer than before)."""
    return text_len if finished else max(emitted, text_len - hold)


class RowText:
    """One candidate's generated text, as shown by a stream.

    push(token) appends the token's completed characters; it returns the newly releasable
    characters, the (text offset, record) pairs whose offsets are final, and whether a
    stop string ended generation. Offsets are code points into prompt text + generated
    text (`base` = length of the prompt text); a token's offset is the number of
    characters completed before it, and offsets past the end of the final text are
    clamped to it (SEMANTICS 5). A record is released only once its offset can no
    longer be clamped, so a stream's logprobs also fold to the non-streamed ones.
    """

    def __init__(self, tokenizer, stops: tuple[str, ...], base: int):
        self._decoder = tokenizer.stream_decoder()
        self._stops, self._hold, self._base = stops, holdback(stops), base
        self.text, self.emitted = "", 0
        self._pending: list[tuple[int, Any]] = []

    def push(self, token: int, record: Any, *, has_text: bool = True, end: bool = False):
        carried = self._decoder.carried(token) if has_text else 0   # U+FFFD of earlier bytes
        self._pending.append((len(self.text) + carried, record))
        new = self._decoder.feed(token) if has_text else ""
        if end:
            new += self._decoder.flush()
        self.text, stopped = cut(self.text, new, self._stops)
        finished = stopped or end
        upto = releasable(len(self.text), self.emitted, self._hold, finished)
        delta, self.emitted = self.text[self.emitted:upto], upto
        ready = [(o, r) for o, r in self._pending if finished or o <= self.emitted]
        self._pending = [] if finished else [(o, r) for o, r in self._pending if o > self.emitted]
        clamp = len(self.text)
        return delta, [(self._base + min(o, clamp), r) for o, r in ready], stopped
