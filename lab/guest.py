"""The guest as the lab models it: processes, the device-dax mappings each
one sees, and the pins and pipes they hold.

One model serves both sides of a step. The scenario validator checks a
whole file against it before anything boots (every step as if the guest did
what it was asked); the runner, the notebook API and the panel check each
step against the same model of the live guest and apply it once the guest
agreed (a step the guest refused leaves the model as it was). So a notebook
refuses exactly what a scenario file refuses, with the same one-line error.

Pure: no I/O. The actions themselves (fields, checks, how each runs through
the agent) are declared in `lab.actions`.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NoReturn

from .model import GiB, KiB, MiB, MapSpec, UserError, format_size, parse_size

__all__ = [
    "DEVICE_SIZES",
    "MADVISE",
    "PAGE_SIZE",
    "GuestModel",
    "Handle",
    "Proc",
    "StepError",
    "View",
    "Where",
    "check_keys",
    "pages_text",
    "parse_pages",
    "show",
    "type_name",
]

PAGE_SIZE = 4 * KiB  # pages are always counted in 4K units, on every device

# Usable size of each device of the lab's default layout, by alignment
# (lab/model.py DEFAULT_DAX and PUD_DAX; docs/ARCHITECTURE.md "Default
# devices"): dax0.0 4K-aligned 1070 MiB, dax1.0 2M-aligned 502 MiB, and the
# 1G-aligned device added on request, of which about 3 GiB is usable once the
# namespace's struct-page metadata is carved out at 1G alignment.
DEVICE_SIZES: Mapping[int, int] = MappingProxyType({
    4 * KiB: 1070 * MiB,
    2 * MiB: 502 * MiB,
    1 * GiB: 3 * GiB,
})

# Linux uapi advice values (include/uapi/asm-generic/mman-common.h).
MADVISE: Mapping[str, int] = MappingProxyType({
    "NORMAL": 0, "RANDOM": 1, "SEQUENTIAL": 2, "WILLNEED": 3, "DONTNEED": 4,
    "FREE": 8, "REMOVE": 9, "DONTFORK": 10, "DOFORK": 11, "MERGEABLE": 12,
    "UNMERGEABLE": 13, "HUGEPAGE": 14, "NOHUGEPAGE": 15, "DONTDUMP": 16, "DODUMP": 17,
    "WIPEONFORK": 18, "KEEPONFORK": 19, "COLD": 20, "PAGEOUT": 21, "POPULATE_READ": 22,
    "POPULATE_WRITE": 23, "DONTNEED_LOCKED": 24, "COLLAPSE": 25,
    "HWPOISON": 100, "SOFT_OFFLINE": 101, "GUARD_INSTALL": 102, "GUARD_REMOVE": 103,
})

# Limits of the guest side, checked here so that they fail before a boot.
SPLICE_MAX = 1 * MiB  # /proc/sys/fs/pipe-max-size default: one pipe holds at most this
PIN_MAX = 1 * GiB  # io_uring refuses a registered buffer larger than 1 GiB (EFAULT)
MAX_PROCS = 64  # agent.c MAX_PROCS
MAX_HANDLES = 64  # agent.c MAX_HANDLES: live pins, and live pipes, per process
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,31}")  # agent.c valid_name()
_RANGE_RE = re.compile(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?")


class StepError(UserError):
    """A step that cannot run as written. The message is one line:
    ``WHERE: FIELD: what is wrong`` (WHERE names the file and step, or the
    notebook call)."""


# -- small checkers ----------------------------------------------------------


def type_name(v: Any) -> str:
    if isinstance(v, bool):
        return "boolean"
    if v is None:
        return "nothing (missing)"
    return {int: "integer", float: "float", str: "string", list: "array",
            dict: "table"}.get(type(v), "date/time")


def show(v: Any) -> str:
    """*v* as TOML spells it."""
    if isinstance(v, bool):
        return "true" if v else "false"
    return f'"{v}"' if isinstance(v, str) else repr(v)


class Where:
    """Prefix of every message about one place (a file and step, or a
    notebook call), and the checks of a field's type that fail there."""

    def __init__(self, file: str, place: str, error: type[StepError] = StepError) -> None:
        self.prefix = f"{file}: {place}" if place else file
        self.error = error

    def fail(self, fld: str, message: str) -> NoReturn:
        raise self.error(f"{self.prefix}: {fld}: {message}")

    def string(self, fld: str, v: Any) -> str:
        if not isinstance(v, str):
            self.fail(fld, f"must be a string, not {type_name(v)} {show(v)}")
        return v

    def name(self, fld: str, v: Any) -> str:
        self.string(fld, v)
        if not _NAME_RE.fullmatch(v) or v in (".", ".."):
            self.fail(fld, f"{show(v)} is not a name: use 1 to 31 of A-Z a-z 0-9 _ . -")
        return v

    def boolean(self, fld: str, v: Any) -> bool:
        if not isinstance(v, bool):
            self.fail(fld, f"must be true or false, not {type_name(v)} {show(v)}")
        return v

    def size(self, fld: str, v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, (int, str)):
            self.fail(fld, f'must be a size (bytes, or a string such as "2M"), '
                      f"not {type_name(v)} {show(v)}")
        try:
            n = parse_size(v)
        except UserError:
            self.fail(fld, f'{show(v)} is not a size (use bytes or a suffix: "4K", "2M", "1G")')
        if n < 0:
            self.fail(fld, f"{show(v)} is negative")
        return n


def table(where: Where, fld: str, v: Any) -> dict[str, Any]:
    if not isinstance(v, dict):
        where.fail(fld, f"must be a table, not {type_name(v)} {show(v)}")
    return v


def check_keys(where: Where, table: Mapping[str, Any], allowed: Iterable[str],
                required: Iterable[str]) -> None:
    allowed = tuple(allowed)
    for key in table:
        if key not in allowed:
            where.fail(key, f"unknown field (allowed: {', '.join(allowed)})")
    for key in required:
        if key not in table:
            where.fail(key, "missing")


def parse_pages(value: Any, npages: int, map_name: str, where: Where | None = None,
                fld: str = "pages") -> tuple[int, ...]:
    """Expand a ``pages`` list (ints and ``"A-B"`` inclusive ranges of 4K page
    indices) into a sorted tuple of distinct pages below *npages*.

    :raises StepError: for anything else.
    """
    where = where or Where("<pages>", "")
    if not isinstance(value, (list, tuple)):
        where.fail(fld, f'must be an array of page numbers and "A-B" ranges, '
                   f"not {type_name(value)} {show(value)}")
    if not value:
        where.fail(fld, "is empty")
    out: set[int] = set()
    for item in value:
        if isinstance(item, int) and not isinstance(item, bool):
            if item < 0:
                where.fail(fld, f"page {item} is negative")
            if item >= npages:
                where.fail(fld, f'page {item} is outside mapping "{map_name}" ({npages} pages)')
            out.add(item)
            continue
        m = _RANGE_RE.fullmatch(item) if isinstance(item, str) else None
        if m is None:
            where.fail(fld, f'{show(item)} is neither a page number nor an "A-B" range')
        first = int(m.group(1))
        last = int(m.group(2)) if m.group(2) is not None else first
        if last < first:
            where.fail(fld, f'range "{item}" runs backwards')
        if last >= npages:
            where.fail(fld, f'range "{item}" is outside mapping "{map_name}" ({npages} pages)')
        out.update(range(first, last + 1))
    return tuple(sorted(out))


def pages_text(first: int, last: int) -> str:
    return f"page {first}" if first == last else f"pages {first}-{last}"


# -- the model of the guest's processes --------------------------------------


@dataclass
class View:
    """A mapping as one process sees it: its length there (mremap changes
    it), what has been unmapped there and, once the guest ran the mmap, its
    address in that process."""

    spec: MapSpec
    length: int
    unmapped: list[tuple[int, int, int]] = field(default_factory=list)  # (first, end, step)
    gone_at: int | None = None  # step that removed the last page
    addr: int | None = None  # user address in the guest (None until the guest mapped it)

    @property
    def pages(self) -> int:
        return self.length // PAGE_SIZE

    def mapped(self, page: int) -> bool:
        return self.gone_at is None and page < self.pages and self.unmapped_at(page) is None

    def unmapped_at(self, page: int) -> int | None:
        """The step that unmapped *page* from this process, or None."""
        return self.first_unmapped(page, page + 1)[1]

    def first_unmapped(self, first: int, end: int) -> tuple[int, int | None]:
        """The lowest unmapped page in [first, end) and the step that unmapped
        it, or (end, None) when all are mapped."""
        best: tuple[int, int | None] = (end, None)
        for lo, hi, step in self.unmapped:
            if lo < end and hi > first and max(lo, first) < best[0]:
                best = (max(lo, first), step)
        return best

    def mapped_count(self, first: int, end: int) -> int:
        """How many pages of [first, end) are still mapped in this process."""
        cut = sorted((max(lo, first), min(hi, end)) for lo, hi, _ in self.unmapped
                     if lo < end and hi > first)
        gone, reach = 0, first
        for lo, hi in cut:
            lo = max(lo, reach)
            if hi > lo:
                gone += hi - lo
                reach = hi
        return end - first - gone


@dataclass
class Proc:
    name: str
    created_at: int
    exited_at: int | None = None
    exit_reason: str | None = None  # ended without an exit step ("killed by SIGKILL")
    views: dict[str, View] = field(default_factory=dict)
    pins: set[str] = field(default_factory=set)
    pipes: set[str] = field(default_factory=set)


@dataclass
class Handle:
    """A pin or a pipe holding a spliced range: pages [first, first + pages)
    of mapping *map*; ``guest_id`` is the agent's id once the guest made it."""

    kind: str  # "pin" or "splice"
    proc: str
    map: str
    step: int
    first: int = 0
    pages: int = 0
    released_at: int | None = None
    guest_id: int | None = None


class GuestModel:
    """What exists after each step, to check the next one against.

    *device* is the alignment of the one device-dax device mapped (its
    usable size from :data:`DEVICE_SIZES` unless *device_size* is given).
    """

    def __init__(self, device: int, device_size: int | None = None) -> None:
        self.device = device
        self.device_size = device_size if device_size is not None else DEVICE_SIZES[device]
        self.procs: dict[str, Proc] = {}
        self.maps: dict[str, MapSpec] = {}
        self.handles: dict[str, Handle] = {}

    def copy(self) -> GuestModel:
        """An independent copy (the runner keeps one to undo a step the guest refused)."""
        return copy.deepcopy(self)

    def end_process(self, name: str, step: int, reason: str | None = None) -> None:
        """Process *name* is gone at *step* (an exit step, or the kernel
        killed it): its pins and pipes are released with it."""
        proc = self.procs[name]
        proc.exited_at, proc.exit_reason = step, reason
        for handle in proc.pins | proc.pipes:
            self.handles[handle].released_at = step
        proc.pins.clear()
        proc.pipes.clear()

    def live_views(self) -> Iterable[tuple[str, View]]:
        """(process, view) of every mapping still (partly) mapped in a live process."""
        for p in self.procs.values():
            if p.exited_at is None:
                for v in p.views.values():
                    if v.gone_at is None:
                        yield p.name, v

    def holds(self, kind: str, map_name: str, page: int) -> bool:
        """Whether a live pin (*kind* "pin") or pipe ("splice") covers *page* of *map_name*."""
        return any(h.kind == kind and h.map == map_name and h.released_at is None
                   and h.first <= page < h.first + h.pages for h in self.handles.values())

    def live_proc(self, where: Where, fld: str, name: str, hint: str = "") -> Proc:
        p = self.procs.get(name)
        if p is None:
            where.fail(fld, f'no process "{name}" (a process is created by mmap or fork)')
        if p.exited_at is not None:
            why = f" ({p.exit_reason})" if p.exit_reason else ""
            where.fail(fld, f'process "{name}" exited at step {p.exited_at}{why}{hint}')
        return p

    def name_taken(self, name: str) -> str | None:
        """What *name* already names (mapping, pin or pipe), if anything."""
        if name in self.maps:
            return f'mapping "{name}" (step {self.maps[name].step})'
        if name in self.handles:
            h = self.handles[name]
            return f'{"pin" if h.kind == "pin" else "pipe"} "{name}" (step {h.step})'
        return None

    def view(self, where: Where, fields: dict[str, Any]) -> tuple[Proc, View]:
        """The process a map step runs in and its view of ``map``."""
        name = where.name("map", fields["map"])
        spec = self.maps.get(name)
        if spec is None:
            known = ", ".join(f'"{m}"' for m in self.maps) or "none yet"
            where.fail("map", f'no mapping "{name}" (mappings so far: {known})')
        if fields.get("proc") is None:
            hint = ' (proc defaults to the mapping\'s owner: name the process with proc = "...")'
            proc = self.live_proc(where, "proc", spec.proc, hint)
        else:
            proc = self.live_proc(where, "proc", where.name("proc", fields["proc"]))
        v = proc.views.get(name)
        if v is None:
            where.fail("map", f'process "{proc.name}" has no mapping "{name}" (mapped by '
                       f'"{spec.proc}" at step {spec.step}, not inherited by "{proc.name}")')
        if v.gone_at is not None:
            where.fail("map", f'mapping "{name}" was unmapped from "{proc.name}" '
                       f"at step {v.gone_at}")
        return proc, v

    def span(self, where: Where, fields: dict[str, Any], v: View, align: int,
             why: str = "") -> tuple[int, int]:
        """(offset, length) of a range within mapping *v*, checked against *align*."""
        spec, length_now = v.spec, v.length
        offset = where.size("offset", fields["offset"])
        if offset % align:
            where.fail("offset", f"{format_size(offset)} is not a multiple of "
                       f"{format_size(align)}{why}")
        if offset >= length_now:
            where.fail("offset", f'{format_size(offset)} is past the end of mapping "{spec.name}"'
                       f" ({format_size(length_now)})")
        if fields["length"] is None:
            length = length_now - offset
        else:
            length = where.size("length", fields["length"])
            if length == 0:
                where.fail("length", "must be more than 0")
            if length % align:
                where.fail("length", f"{format_size(length)} is not a multiple of "
                           f"{format_size(align)}{why}")
            if offset + length > length_now:
                where.fail("length", f"offset {format_size(offset)} + length "
                           f'{format_size(length)} runs past the end of mapping "{spec.name}"'
                           f" ({format_size(length_now)})")
        return offset, length

    def all_mapped(self, where: Where, fields: dict[str, Any], v: View, offset: int,
                   length: int) -> None:
        """Every page of the range is still mapped in this process."""
        page, step = v.first_unmapped(offset // PAGE_SIZE, (offset + length) // PAGE_SIZE)
        if step is not None:
            fld, hint = "length", ""
            if fields["length"] is None:
                hint = " (length defaults to the rest of the mapping: give offset and length)"
            where.fail(fld, f'page {page} of "{v.spec.name}" was unmapped at step {step}{hint}')


