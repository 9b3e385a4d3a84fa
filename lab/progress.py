"""Progress of long steps (downloads of 1 GB packages, extraction of their
tar streams, kernel builds, boots, a scenario's steps) as tqdm bars:
``tqdm.auto`` draws a widget in a notebook and a text bar on a terminal. Off
a terminal (CI logs, a pipe) every update is a line of its own, at most one
every :data:`LOG_INTERVAL` seconds per stage, so a log stays readable.

A progress callback is any ``progress(stage, done, total, unit="B")``:
*stage* names the step, *done* counts *units* so far (bytes unless said
otherwise: "obj" for compiled objects, "step", "boot"), *total* is the
expected count or ``None`` when unknown. Producers call it as often as they
like; the bars throttle. A stage whose total is 1 is a step without a size
(``stage: running``, then ``stage: done`` with its time).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import TextIO

from tqdm import tqdm as text_tqdm
from tqdm.auto import tqdm as auto_tqdm
from tqdm.autonotebook import tqdm as maybe_notebook_tqdm  # imports IPython only inside Jupyter

__all__ = ["LOG_INTERVAL", "Bars", "Progress", "bars", "counter", "for_slot", "set_quiet", "silent"]

Progress = Callable[..., None]  # (stage: str, done: int, total: int | None, unit: str = "B")

LOG_INTERVAL = 10.0  # seconds between two lines of one stage off a terminal

_quiet = False


def set_quiet(quiet: bool) -> None:
    """``devdax-lab -q``: :func:`bars` returns :func:`silent` from now on."""
    global _quiet
    _quiet = quiet


def silent(stage: str, done: int, total: int | None, unit: str = "B") -> None:
    """The progress callback that reports nothing."""


def bars(stream: TextIO | None = None) -> Progress:
    """The progress callback for this process: :class:`Bars`, or :func:`silent`
    after ``set_quiet(True)``."""
    return silent if _quiet else Bars(stream)


def counter(desc: str, total: int, unit: str, stream: TextIO | None = None):
    """A bar of things done out of *total* (a sweep's cells) with tqdm's
    rate and ETA, for the caller to ``update()`` and ``set_postfix()``;
    drawn as :class:`Bars` draws (one line every :data:`LOG_INTERVAL` s off
    a terminal), disabled after ``set_quiet(True)``."""
    stream = stream if stream is not None else sys.stderr
    tty = getattr(stream, "isatty", lambda: False)()
    options: dict = {"desc": desc, "total": total, "unit": unit, "leave": True,
                     "disable": _quiet, "dynamic_ncols": tty}
    if tty:
        options.update(file=stream, mininterval=0.2)
    else:
        options.update(file=_Lines(stream), mininterval=LOG_INTERVAL, maxinterval=LOG_INTERVAL)
    return text_tqdm(**options)


class _Lines:
    """A file for tqdm off a terminal: each refresh (tqdm writes ``\\r`` and
    the bar) becomes one line, so a log gets lines instead of one endless
    line of carriage returns."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").rstrip("\n")
        if text.strip():
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


class Bars:
    """A progress callback that draws one bar per stage: bytes with their
    rate and ETA, counted units (objects, steps) with theirs, a step without
    a size as ``stage: done [elapsed]``. A new stage closes the previous bar;
    repeated end-of-stage reports are ignored."""

    def __init__(self, stream: TextIO | None = None, *, tty: bool | None = None,
                 notebook: bool | None = None, position: int = 0) -> None:
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", lambda: False)
        self.tty = isatty() if tty is None else tty
        # tqdm.auto picks the notebook widget inside a Jupyter kernel
        self.notebook = (maybe_notebook_tqdm is not text_tqdm) if notebook is None else notebook
        self.position = position  # the terminal line of this one's bars (jobs side by side)
        self._bar = None
        self._stage: str | None = None
        self._finished: str | None = None  # last stage that reached its total

    def __call__(self, stage: str, done: int, total: int | None, unit: str = "B") -> None:
        finished = total is not None and done >= total
        if stage == self._finished:
            return  # repeated end-of-stage reports
        if stage != self._stage:
            self.close()
            self._bar = self._open(stage, total, unit)
            self._stage = stage
        bar = self._bar
        if total is not None and total != bar.total:
            bar.total = total
        if finished and bar.total == 1:
            bar.unit = "done"
        if done > bar.n:
            bar.update(done - bar.n)
        if finished:
            self._finished = stage
            self.close()

    def _open(self, stage: str, total: int | None, unit: str):
        kind = auto_tqdm if self.notebook else text_tqdm
        options: dict = {"desc": stage, "total": total, "unit": unit, "leave": True,
                         "dynamic_ncols": self.tty}
        if unit == "B" and total != 1:
            options.update(unit_scale=True, unit_divisor=1000)
        if total == 1:  # a step without a size: its name, then done and how long it took
            options.update(bar_format="{desc}: {unit} [{elapsed}]", unit="running")
        if not self.notebook:
            if self.tty:
                options.update(file=self.stream, mininterval=0.2)
                # a running bar on a line of its own below the others; a
                # finished one is left where tqdm writes finished bars
                options.update(position=self.position)
            else:  # position 0: tqdm would give a second open bar a line of its own,
                # moving the cursor with escape sequences that mean nothing in a log
                options.update(file=_Lines(self.stream), mininterval=LOG_INTERVAL,
                               maxinterval=LOG_INTERVAL, position=0)
        return kind(**options)

    def slot(self, position: int) -> Bars:
        """Bars like these on terminal line *position*, for one of several
        jobs running at once (each job one slot)."""
        return Bars(self.stream, tty=self.tty, notebook=self.notebook, position=position)

    def close(self) -> None:
        """End the current bar (its last state stays on screen)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._stage = None


def for_slot(progress: Progress | None, position: int) -> Progress | None:
    """The progress callback of job *position* of several running at once in
    threads: :class:`Bars` get a terminal line each (a single bar set
    switches stages, so two jobs would close each other's bars); another
    callback is called under a lock."""
    if progress is None or progress is silent:
        return progress
    if isinstance(progress, Bars):
        return progress.slot(position)
    return _serialised(progress)


_callback_lock = threading.Lock()


def _serialised(progress: Progress) -> Progress:
    def report(stage: str, done: int, total: int | None, unit: str = "B") -> None:
        with _callback_lock:
            progress(stage, done, total, unit=unit)

    return report
