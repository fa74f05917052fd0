"""A progress bar on stderr, with no dependency: `refcomplete batch` uses it.

Knows: drawing "done/total, rate, eta" in place on a terminal, or as a line now and then
in a log. Does not know: what is being counted.

    bar = Progress(total=1000, done=0)
    for _ in work:
        bar.step()
    bar.close()          # batch [########################] 1000/1000 lines 8.12/s
"""

from __future__ import annotations

import sys
import time


class Progress:
    """A progress bar on stderr: redrawn in place on a terminal, a line every 10 s otherwise."""

    def __init__(self, total: int, done: int, enabled: bool = True, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        self.total, self.done, self.start_done = total, done, done
        self.enabled = enabled
        self.tty = enabled and self.stream.isatty()
        self.t0 = self.last = time.monotonic()

    def step(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and now - self.last >= (0.2 if self.tty else 10.0):
            self.last = now
            self._draw(now)

    def close(self) -> None:
        if self.enabled:
            self._draw(time.monotonic(), final=True)

    def _draw(self, now: float, final: bool = False) -> None:
        frac = self.done / self.total if self.total else 1.0
        bar = "#" * int(24 * frac) + "." * (24 - int(24 * frac))
        rate = (self.done - self.start_done) / max(now - self.t0, 1e-9)
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta = "" if final or left == float("inf") else f" eta {int(left // 60)}m{int(left % 60):02d}s"
        text = f"batch [{bar}] {self.done}/{self.total} lines {rate:.2f}/s{eta}"
        end = "\n" if final or not self.tty else ""
        self.stream.write(("\r" + text + "\x1b[K" if self.tty else text) + end)
        self.stream.flush()
