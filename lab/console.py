"""Read the guest's serial console: the kernel's own complaints (panic, Oops,
BUG, WARNING, "Bad page ..."), its memory-management messages (memory
failure, OOM, page dumps, ...) and the lines /init prints for the host.

Pure functions over lines of text, tested on console logs captured from real
boots (tests/golden/console/).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Complaint", "find_complaint", "complaints", "FATAL_KINDS", "strip_console_prefix",
           "MmMessage", "find_mm_message", "mm_messages", "MM_KINDS"]

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


# Memory-management messages: what the kernel did to memory or processes
# (a page declared poisoned, a process sent SIGBUS or killed, a page's state
# dumped). Not complaints: a memory failure handled as designed is data of the
# step that caused it. A line can be both (a "Bad rss-counter state" is a
# complaint and, as kind rss-counter, an mm message). The first pattern that
# matches names the line. Sources: mm/memory-failure.c (pr_fmt "Memory
# failure: ", "Soft offline: ", "Unpoison: "), mm/madvise.c
# (madvise_inject_error), arch/x86/kernel/cpu/mce/core.c, mm/oom_kill.c,
# mm/debug.c (dump_page), kernel/fork.c / mm/debug.c (check_mm), mm/page_alloc.c.
_MM_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    ("memory-failure", re.compile(r"^Memory failure: |Injecting memory failure|"
                                  r"^MCE: Killing |hardware memory corruption")),
    ("hwpoison", re.compile(r"^(?:Soft offline|Unpoison): |[Hh][Ww][Pp]oison")),
    ("oom", re.compile(r"invoked oom-killer|^Out of memory|^oom-kill:|^oom_reaper:|"
                       r"^Memory cgroup out of memory|^Killed process \d+")),
    ("rss-counter", re.compile(r"Bad rss-counter state")),
    ("bad-page", re.compile(r"Bad page (?:state|map)|^BUG: Bad page")),
    ("page-dump", re.compile(r"page dumped because|^page: refcount:|^page_type: |"
                             r"^(?:raw|head): [0-9a-f]{16} |^flags: 0x[0-9a-f]+\(")),
    ("alloc-failure", re.compile(r"page allocation failure")),
]

MM_KINDS = tuple(kind for kind, _ in _MM_PATTERNS)


@dataclass(frozen=True)
class MmMessage:
    """One console line where the kernel reported what it did to memory."""

    kind: str  # one of MM_KINDS
    text: str  # the line without its timestamp


def find_mm_message(line: str) -> MmMessage | None:
    """The memory-management message on *line*, if it is one."""
    text = strip_console_prefix(line)
    for kind, pattern in _MM_PATTERNS:
        if pattern.search(text):
            return MmMessage(kind, text)
    return None


def mm_messages(lines: Iterable[str]) -> list[MmMessage]:
    """Every memory-management message in *lines*, in order."""
    return [m for m in map(find_mm_message, lines) if m is not None]
