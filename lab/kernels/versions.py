"""Debian version order (as ``dpkg --compare-versions``) and the newest ABI
among package names (pure)."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

from .errors import KernelError

__all__ = ["compare_versions", "newest_first", "pick_newest"]


def _order(c: str) -> int:
    # dpkg's order(): digits (and the end) sort as 0, '~' before everything,
    # letters before other characters.
    if c == "~":
        return -1
    if c in "0123456789":
        return 0
    if c.isascii() and c.isalpha():
        return ord(c)
    return ord(c) + 256


def _verrevcmp(a: str, b: str) -> int:
    i = j = 0
    digits = "0123456789"
    while i < len(a) or j < len(b):
        while (i < len(a) and a[i] not in digits) or (j < len(b) and b[j] not in digits):
            ac = _order(a[i]) if i < len(a) else 0
            bc = _order(b[j]) if j < len(b) else 0
            if ac != bc:
                return -1 if ac < bc else 1
            i += 1
            j += 1
        while i < len(a) and a[i] == "0":
            i += 1
        while j < len(b) and b[j] == "0":
            j += 1
        first_diff = 0
        while i < len(a) and a[i] in digits and j < len(b) and b[j] in digits:
            if not first_diff:
                first_diff = ord(a[i]) - ord(b[j])
            i += 1
            j += 1
        if i < len(a) and a[i] in digits:
            return 1
        if j < len(b) and b[j] in digits:
            return -1
        if first_diff:
            return -1 if first_diff < 0 else 1
    return 0


def _split_version(v: str) -> tuple[int, str, str]:
    epoch, _, rest = v.rpartition(":") if ":" in v else ("0", "", v)
    upstream, sep, revision = rest.rpartition("-")
    if not sep:
        upstream, revision = rest, ""
    return int(epoch or 0), upstream, revision


def compare_versions(a: str, b: str) -> int:
    """Debian version order (as ``dpkg --compare-versions``): -1, 0 or 1."""
    ea, ua, ra = _split_version(a)
    eb, ub, rb = _split_version(b)
    if ea != eb:
        return -1 if ea < eb else 1
    return _verrevcmp(ua, ub) or _verrevcmp(ra, rb)


def newest_first(names: Iterable[str], regex: str) -> list[str]:
    """The distinct first groups of *regex* over *names*, newest first."""
    rx = re.compile(regex)
    found = {m.group(1) for n in names if (m := rx.fullmatch(n))}
    return sorted(found, key=functools.cmp_to_key(compare_versions), reverse=True)


def pick_newest(names: Iterable[str], regex: str) -> str:
    """The newest ABI (first group of *regex*) among package *names*.

    :raises KernelError: if no name matches.
    """
    found = newest_first(names, regex)
    if not found:
        raise KernelError(f"no package in the apt index matches {regex}")
    return found[0]
