"""Progress reports for long steps (downloads of 1 GB packages, extraction of
their tar streams), printed so that a terminal shows one updating line and a
log file gets a line every tenth of the way instead of thousands.

A progress callback is any ``progress(stage, done, total)``: *stage* names
the step, *done* counts units (bytes) so far, *total* is the expected count
or ``None`` when unknown. Producers call it often; printers throttle.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

__all__ = ["Progress", "TextProgress", "format_bytes", "silent"]

Progress = Callable[[str, int, "int | None"], None]


def silent(stage: str, done: int, total: int | None) -> None:
    """The progress callback that reports nothing."""


def format_bytes(n: int) -> str:
    """``1.2 GB``, ``340 MB``, ``12 kB``: short decimal units for humans."""
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


class TextProgress:
    """A progress printer: one line rewritten in place on a tty, else one line
    per stage per 10 % (and one at the end of each stage). A stage whose total
    is 1 is a step without a size: it prints ``stage...`` and ``stage: done``."""

    def __init__(
        self, stream: TextIO | None = None, *, tty: bool | None = None, interval: float = 0.2
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval = interval
        self._stage: str | None = None
        self._finished: str | None = None  # last stage that reached its total
        self._last_print = 0.0
        self._last_decile = -1
        self._started = 0.0
        self._width = 0

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        now = time.monotonic()
        finished = total is not None and done >= total
        if stage == self._finished and (finished or stage != self._stage):
            return  # repeated end-of-stage reports
        if stage != self._stage:
            self._finish_line()
            self._stage, self._started, self._last_decile, self._last_print = stage, now, -1, 0.0
            self._finished = None
        text = self._text(stage, done, total, now)
        if finished:
            self._finished = stage
        if self.tty:
            if finished or now - self._last_print >= self.interval:
                pad = max(0, self._width - len(text))
                self.stream.write("\r" + text + " " * pad)
                self._width = len(text)
                self._last_print = now
                if finished:
                    self.stream.write("\n")
                    self._width = 0
                self.stream.flush()
            return
        if total:
            decile = min(10, done * 10 // total)
            if decile > self._last_decile:
                self._last_decile = decile
                self.stream.write(text + "\n")
                self.stream.flush()
        elif now - self._last_print >= 10.0:  # unknown total: every 10 s
            self._last_print = now
            self.stream.write(text + "\n")
            self.stream.flush()

    def _text(self, stage: str, done: int, total: int | None, now: float) -> str:
        if total == 1:
            return f"{stage}: done" if done >= 1 else f"{stage}..."
        elapsed = now - self._started
        rate = f" ({format_bytes(int(done / elapsed))}/s)" if elapsed >= 0.5 else ""
        if total:
            pct = min(100, done * 100 // total)
            return f"{stage}: {pct:3d}% {format_bytes(done)} of {format_bytes(total)}{rate}"
        return f"{stage}: {format_bytes(done)}{rate}"

    def _finish_line(self) -> None:
        if self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0
