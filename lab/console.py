"""Read the guest's serial console: the kernel's own complaints (panic, Oops,
BUG, WARNING, "Bad page ...") and the lines /init prints for the host.

Pure functions over lines of text, tested on console logs captured from real
boots (tests/golden/console/).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Complaint", "find_complaint", "complaints", "FATAL_KINDS", "strip_console_prefix"]

# Order matters: the first pattern that matches names the line.
_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    ("panic", re.compile(r"Kernel panic - not syncing: (?P<what>.*)")),
    ("oops", re.compile(r"(?P<what>(?:Oops|general protection fault)\b.*)")),
    ("bug", re.compile(r"(?P<what>(?:kernel )?BUG(?::| at) .*)")),
    ("warning", re.compile(r"WARNING: (?P<what>.*)")),
    ("bad", re.compile(r"(?P<what>Bad (?:page|rss-counter|pagetable)\b.*)")),
]

# Kinds after which the guest cannot be trusted to continue.
FATAL_KINDS = frozenset({"panic", "oops"})

_TIMESTAMP = re.compile(r"^\s*\[\s*\d+\.\d+\]\s?")


@dataclass(frozen=True)
class Complaint:
    """One line where the guest kernel reported a problem."""

    kind: str  # panic, oops, bug, warning, bad
    text: str  # the line without its timestamp

    @property
    def fatal(self) -> bool:
        return self.kind in FATAL_KINDS


def strip_console_prefix(line: str) -> str:
    """A console line without its ``[   1.234567]`` printk timestamp or CR."""
    return _TIMESTAMP.sub("", line.rstrip("\r\n"))


def find_complaint(line: str) -> Complaint | None:
    """The kernel complaint on *line*, if it is one."""
    text = strip_console_prefix(line)
    for kind, pattern in _PATTERNS:
        if pattern.search(text):
            return Complaint(kind, text)
    return None


def complaints(lines: Iterable[str]) -> list[Complaint]:
    """Every complaint in *lines*, in order."""
    return [c for c in map(find_complaint, lines) if c is not None]
