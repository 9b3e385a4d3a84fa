"""Scenarios: a guest workload written down as TOML, checked before any VM boots.

A scenario names one device-dax device by its alignment, maps it into named
guest processes and then touches, forks, pins, splices, advises, protects and
unmaps, one ``[[step]]`` at a time; the runner takes a snapshot after every
step. Booting a guest costs seconds and a mistake in step 9 would otherwise
surface only after eight snapshots, so everything that can be known from the
text alone is checked here: field names and types, sizes the device can
serve, which process holds which mapping (a forked child inherits its
parent's), which pages are still mapped after a partial munmap, which pins
and pipes are live. The first mistake is a :class:`ScenarioError` naming the
file, the step, its action and the field, in one line.

What the guest kernel decides is not second-guessed: an madvise advice the
kernel refuses, or a touch that faults on a protected page, is recorded by the
runner as an errno. What is certain to fail (a private device-dax mapping, a
VMA split at an address the device cannot split at, a pin io_uring refuses)
is an error here.

Everything except :func:`load_scenario` is a pure function of the text.
The format is documented in ``docs/scenarios.md``.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, NoReturn

from lab.model import GiB, KiB, MiB, UserError, format_size, parse_size

__all__ = [
    "ACTIONS",
    "DEVICE_SIZES",
    "MADVISE",
    "PAGE_SIZE",
    "MapSpec",
    "Scenario",
    "ScenarioError",
    "Step",
    "WatchSpec",
    "load_scenario",
    "parse_pages",
    "touched_pages",
    "validate_text",
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

ACTIONS = ("mmap", "touch", "fork", "munmap", "exit", "pin", "unpin", "splice", "drain",
           "madvise", "mprotect", "snapshot", "kmsg")

# Limits of the guest side, checked here so that they fail before a boot.
_SPLICE_MAX = 1 * MiB  # /proc/sys/fs/pipe-max-size default: one pipe holds at most this
_PIN_MAX = 1 * GiB  # io_uring refuses a registered buffer larger than 1 GiB (EFAULT)
_MAX_PROCS = 64  # agent.c MAX_PROCS
_MAX_HANDLES = 64  # agent.c MAX_HANDLES: live pins, and live pipes, per process
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,31}")  # agent.c valid_name()
_RANGE_RE = re.compile(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?")
_TOP_KEYS = ("name", "title", "description", "device", "watch", "step")

_REQ = object()  # marks a required field
# Fields of each action beside ``action`` and ``label``, with their defaults.
# ``proc`` defaults to None: the owner of the mapping (or pin, or pipe).
_FIELDS: dict[str, dict[str, Any]] = {
    "mmap": {"proc": _REQ, "name": _REQ, "length": _REQ, "offset": 0, "write": True,
             "shared": True},
    "touch": {"map": _REQ, "pages": _REQ, "write": False, "proc": None},
    "fork": {"proc": _REQ, "child": _REQ},
    "munmap": {"map": _REQ, "offset": 0, "length": None, "proc": None},
    "exit": {"proc": _REQ},
    "pin": {"map": _REQ, "name": _REQ, "offset": 0, "length": None, "proc": None},
    "unpin": {"pin": _REQ, "proc": None},
    "splice": {"map": _REQ, "name": _REQ, "offset": 0, "length": None, "proc": None},
    "drain": {"splice": _REQ, "proc": None},
    "madvise": {"map": _REQ, "advice": _REQ, "offset": 0, "length": None, "proc": None},
    "mprotect": {"map": _REQ, "prot": _REQ, "offset": 0, "length": None, "proc": None},
    "snapshot": {},
    "kmsg": {"text": _REQ},
}


class ScenarioError(UserError):
    """A scenario that cannot run as written. The message is one line:
    ``FILE: step N (ACTION): FIELD: what is wrong``."""


# -- value types -------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One ``[[step]]``, normalised.

    ``index`` counts from 1 as the file reads; ``proc`` is the guest process
    the step runs in (None for ``snapshot``); ``args`` holds the remaining
    fields with defaults filled in (sizes in bytes, pages as sorted 4K page
    indices within the mapping) plus a few derived keys: see
    ``docs/scenarios.md``.
    """

    index: int
    action: str
    proc: str | None
    args: Mapping[str, Any] = field(hash=False)
    label: str | None = None

    @property
    def pages_touched(self) -> tuple[tuple[str, int], ...]:
        """(map, page) pairs this step faults in or takes references on:
        the pages of a ``touch``, every page of a ``pin`` or ``splice`` range."""
        a = self.args
        if self.action == "touch":
            return tuple((a["map"], p) for p in a["pages"])
        if self.action in ("pin", "splice"):
            first = a["offset"] // PAGE_SIZE
            return tuple((a["map"], p) for p in range(first, first + a["length"] // PAGE_SIZE))
        return ()


@dataclass(frozen=True)
class WatchSpec:
    """One page to follow in every snapshot: 4K page *page* of mapping *map*;
    with *events* ("counts" or "stacks"), also every change of its folio's
    counters, through watchpoints (`lab.events`)."""

    map: str
    page: int
    events: str | None = None

EVENT_MODES = ("counts", "stacks")


@dataclass(frozen=True)
class MapSpec:
    """A mapping as its ``mmap`` step created it (offsets on the device)."""

    name: str
    proc: str
    offset: int
    length: int
    step: int

    @property
    def pages(self) -> int:
        return self.length // PAGE_SIZE


@dataclass(frozen=True)
class Scenario:
    """A validated scenario. ``device`` is the alignment in bytes; an empty
    ``watch`` means every page a step touched (:attr:`watch_list`)."""

    name: str
    title: str
    description: str
    device: int
    steps: tuple[Step, ...]
    watch: tuple[WatchSpec, ...]
    text: str
    sha256: str
    path: Path | None = None

    @property
    def device_size(self) -> int:
        return DEVICE_SIZES[self.device]

    @property
    def maps(self) -> dict[str, MapSpec]:
        """Every mapping by name, in the order the steps create them."""
        return {
            s.args["name"]: MapSpec(s.args["name"], s.proc or "", s.args["offset"],
                                    s.args["length"], s.index)
            for s in self.steps if s.action == "mmap"
        }

    def device_page(self, map_name: str, page: int) -> int:
        """Index of the 4K page on the device that page *page* of *map_name* maps."""
        return self.maps[map_name].offset // PAGE_SIZE + page

    @property
    def watch_list(self) -> tuple[WatchSpec, ...]:
        """``watch`` if given, else every (map, page) some step touched."""
        if self.watch:
            return self.watch
        return tuple(WatchSpec(m, p) for m, pages in touched_pages(self).items() for p in pages)


def touched_pages(scenario: Scenario) -> dict[str, tuple[int, ...]]:
    """Map name -> sorted pages touched by any step, mappings in creation order
    (mappings nothing touches are left out)."""
    seen: dict[str, set[int]] = {name: set() for name in scenario.maps}
    for step in scenario.steps:
        for name, page in step.pages_touched:
            seen[name].add(page)
    return {name: tuple(sorted(pages)) for name, pages in seen.items() if pages}


# -- small checkers ----------------------------------------------------------


def _type_name(v: Any) -> str:
    if isinstance(v, bool):
        return "boolean"
    return {int: "integer", float: "float", str: "string", list: "array",
            dict: "table"}.get(type(v), "date/time")


def _show(v: Any) -> str:
    """*v* as TOML spells it."""
    if isinstance(v, bool):
        return "true" if v else "false"
    return f'"{v}"' if isinstance(v, str) else repr(v)


class _Where:
    """Prefix of every message about one place in the file."""

    def __init__(self, file: str, place: str) -> None:
        self.prefix = f"{file}: {place}" if place else file

    def fail(self, fld: str, message: str) -> NoReturn:
        raise ScenarioError(f"{self.prefix}: {fld}: {message}")

    def string(self, fld: str, v: Any) -> str:
        if not isinstance(v, str):
            self.fail(fld, f"must be a string, not {_type_name(v)} {_show(v)}")
        return v

    def name(self, fld: str, v: Any) -> str:
        self.string(fld, v)
        if not _NAME_RE.fullmatch(v) or v in (".", ".."):
            self.fail(fld, f"{_show(v)} is not a name: use 1 to 31 of A-Z a-z 0-9 _ . -")
        return v

    def boolean(self, fld: str, v: Any) -> bool:
        if not isinstance(v, bool):
            self.fail(fld, f"must be true or false, not {_type_name(v)} {_show(v)}")
        return v

    def size(self, fld: str, v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, (int, str)):
            self.fail(fld, f'must be a size (bytes, or a string such as "2M"), '
                      f"not {_type_name(v)} {_show(v)}")
        try:
            n = parse_size(v)
        except UserError:
            self.fail(fld, f'{_show(v)} is not a size (use bytes or a suffix: "4K", "2M", "1G")')
        if n < 0:
            self.fail(fld, f"{_show(v)} is negative")
        return n


def _table(where: _Where, fld: str, v: Any) -> dict[str, Any]:
    if not isinstance(v, dict):
        where.fail(fld, f"must be a table, not {_type_name(v)} {_show(v)}")
    return v


def _check_keys(where: _Where, table: Mapping[str, Any], allowed: Iterable[str],
                required: Iterable[str]) -> None:
    allowed = tuple(allowed)
    for key in table:
        if key not in allowed:
            where.fail(key, f"unknown field (allowed: {', '.join(allowed)})")
    for key in required:
        if key not in table:
            where.fail(key, "missing")


def parse_pages(value: Any, npages: int, map_name: str, where: _Where | None = None,
                fld: str = "pages") -> tuple[int, ...]:
    """Expand a ``pages`` list (ints and ``"A-B"`` inclusive ranges of 4K page
    indices) into a sorted tuple of distinct pages below *npages*.

    :raises ScenarioError: for anything else.
    """
    where = where or _Where("<pages>", "")
    if not isinstance(value, list):
        where.fail(fld, f'must be an array of page numbers and "A-B" ranges, '
                   f"not {_type_name(value)} {_show(value)}")
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
            where.fail(fld, f'{_show(item)} is neither a page number nor an "A-B" range')
        first = int(m.group(1))
        last = int(m.group(2)) if m.group(2) is not None else first
        if last < first:
            where.fail(fld, f'range "{item}" runs backwards')
        if last >= npages:
            where.fail(fld, f'range "{item}" is outside mapping "{map_name}" ({npages} pages)')
        out.update(range(first, last + 1))
    return tuple(sorted(out))


def _pages_text(first: int, last: int) -> str:
    return f"page {first}" if first == last else f"pages {first}-{last}"


# -- the simulation of the guest's processes ---------------------------------


@dataclass
class _View:
    """A mapping as one process sees it: what has been unmapped there."""

    spec: MapSpec
    unmapped: list[tuple[int, int, int]] = field(default_factory=list)  # (first, end, step)
    gone_at: int | None = None  # step of the munmap that removed the last page

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
class _Proc:
    name: str
    created_at: int
    exited_at: int | None = None
    views: dict[str, _View] = field(default_factory=dict)
    pins: set[str] = field(default_factory=set)
    pipes: set[str] = field(default_factory=set)


@dataclass
class _Handle:
    """A pin or a pipe holding a spliced range."""

    kind: str  # "pin" or "splice"
    proc: str
    map: str
    step: int
    released_at: int | None = None


class _State:
    """What exists after each step, to check the next one against."""

    def __init__(self, device: int) -> None:
        self.device = device
        self.procs: dict[str, _Proc] = {}
        self.maps: dict[str, MapSpec] = {}
        self.handles: dict[str, _Handle] = {}

    def live_proc(self, where: _Where, fld: str, name: str, hint: str = "") -> _Proc:
        p = self.procs.get(name)
        if p is None:
            where.fail(fld, f'no process "{name}" (a process is created by mmap or fork)')
        if p.exited_at is not None:
            where.fail(fld, f'process "{name}" exited at step {p.exited_at}{hint}')
        return p

    def name_taken(self, name: str) -> str | None:
        """What *name* already names (mapping, pin or pipe), if anything."""
        if name in self.maps:
            return f'mapping "{name}" (step {self.maps[name].step})'
        if name in self.handles:
            h = self.handles[name]
            return f'{"pin" if h.kind == "pin" else "pipe"} "{name}" (step {h.step})'
        return None

    def view(self, where: _Where, fields: dict[str, Any]) -> tuple[_Proc, _View]:
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

    def span(self, where: _Where, fields: dict[str, Any], v: _View, align: int,
             why: str = "") -> tuple[int, int]:
        """(offset, length) of a range within mapping *v*, checked against *align*."""
        spec = v.spec
        offset = where.size("offset", fields["offset"])
        if offset % align:
            where.fail("offset", f"{format_size(offset)} is not a multiple of "
                       f"{format_size(align)}{why}")
        if offset >= spec.length:
            where.fail("offset", f'{format_size(offset)} is past the end of mapping "{spec.name}"'
                       f" ({format_size(spec.length)})")
        if fields["length"] is None:
            length = spec.length - offset
        else:
            length = where.size("length", fields["length"])
            if length == 0:
                where.fail("length", "must be more than 0")
            if length % align:
                where.fail("length", f"{format_size(length)} is not a multiple of "
                           f"{format_size(align)}{why}")
            if offset + length > spec.length:
                where.fail("length", f"offset {format_size(offset)} + length "
                           f'{format_size(length)} runs past the end of mapping "{spec.name}"'
                           f" ({format_size(spec.length)})")
        return offset, length

    def all_mapped(self, where: _Where, fields: dict[str, Any], v: _View, offset: int,
                   length: int) -> None:
        """Every page of the range is still mapped in this process."""
        page, step = v.first_unmapped(offset // PAGE_SIZE, (offset + length) // PAGE_SIZE)
        if step is not None:
            fld, hint = "length", ""
            if fields["length"] is None:
                hint = " (length defaults to the rest of the mapping: give offset and length)"
            where.fail(fld, f'page {page} of "{v.spec.name}" was unmapped at step {step}{hint}')


# -- parsing -----------------------------------------------------------------


def _advice(where: _Where, v: Any) -> str:
    """The advice's name in :data:`MADVISE` (``DONTNEED``), from a name with
    or without ``MADV_`` in any case, or from its number."""
    if isinstance(v, int) and not isinstance(v, bool):
        for name, number in MADVISE.items():
            if number == v:
                return name
        where.fail("advice", f"{v} is not a known MADV_* value")
    where.string("advice", v)
    key = v.strip().upper().removeprefix("MADV_")
    if key not in MADVISE:
        where.fail("advice", f'unknown advice "{v}" (known: {", ".join(MADVISE)})')
    return key


def _prot(where: _Where, v: Any) -> str:
    where.string("prot", v)
    s = v.strip().lower()
    if s == "none":
        return ""
    if not s or any(c not in "rwx" for c in s) or len(set(s)) != len(s):
        where.fail("prot", f'{_show(v)} is not a protection: use letters of "rwx" or "none"')
    return "".join(c for c in "rwx" if c in s)


def _step(state: _State, file: str, index: int, raw: Any) -> Step:
    where = _Where(file, f"step {index}")
    if not isinstance(raw, dict):
        where.fail("step", f"must be a table ([[step]]), not {_type_name(raw)}")
    if "action" not in raw:
        where.fail("action", f"missing (one of: {', '.join(ACTIONS)})")
    action = raw["action"]
    if not isinstance(action, str) or action not in _FIELDS:
        where.fail("action", f"unknown action {_show(action)} (known: {', '.join(ACTIONS)})")
    where = _Where(file, f"step {index} ({action})")
    spec = _FIELDS[action]
    _check_keys(where, raw, ("action", *spec, "label"),
                [k for k, d in spec.items() if d is _REQ])
    label = None if raw.get("label") is None else where.string("label", raw["label"])
    fields = {k: raw.get(k, d) for k, d in spec.items()}
    proc, args = _ACTION[action](state, where, index, fields)
    return Step(index, action, proc, MappingProxyType(args), label)


def _do_mmap(st: _State, where: _Where, index: int, f: dict[str, Any]):
    proc_name = where.name("proc", f["proc"])
    name = where.name("name", f["name"])
    if (taken := st.name_taken(name)) is not None:
        where.fail("name", f'"{name}" already names {taken}; names are used once per scenario')
    length = where.size("length", f["length"])
    offset = where.size("offset", f["offset"])
    write = where.boolean("write", f["write"])
    shared = where.boolean("shared", f["shared"])
    align, size = st.device, DEVICE_SIZES[st.device]
    dev = f"the {format_size(align)} device"
    if length == 0:
        where.fail("length", "must be more than 0")
    if length % align:
        where.fail("length", f"{format_size(length)} is not a multiple of {dev}'s alignment "
                   f"({format_size(align)})")
    if offset % align:
        where.fail("offset", f"{format_size(offset)} is not a multiple of {dev}'s alignment "
                   f"({format_size(align)})")
    if offset + length > size:
        where.fail("length", f"offset {format_size(offset)} + length {format_size(length)} "
                   f"does not fit {dev} ({format_size(size)})")
    if not shared:
        where.fail("shared", "device-dax refuses private mappings (mmap fails with EINVAL)")
    proc = st.procs.get(proc_name)
    if proc is None:
        if sum(p.exited_at is None for p in st.procs.values()) >= _MAX_PROCS:
            where.fail("proc", f"more than {_MAX_PROCS} live processes")
        proc = st.procs[proc_name] = _Proc(proc_name, index)
    elif proc.exited_at is not None:
        where.fail("proc", f'process "{proc_name}" exited at step {proc.exited_at}; '
                   "a new process needs a new name")
    spec = MapSpec(name, proc_name, offset, length, index)
    st.maps[name] = spec
    proc.views[name] = _View(spec)
    return proc_name, {"name": name, "length": length, "offset": offset, "write": write,
                       "shared": shared}


def _do_touch(st: _State, where: _Where, index: int, f: dict[str, Any]):
    proc, v = st.view(where, f)
    pages = parse_pages(f["pages"], v.spec.pages, v.spec.name, where)
    for page in pages:
        if (step := v.unmapped_at(page)) is not None:
            where.fail("pages", f'page {page} of "{v.spec.name}" was unmapped at step {step}')
    write = where.boolean("write", f["write"])
    return proc.name, {"map": v.spec.name, "pages": pages, "write": write}


def _do_fork(st: _State, where: _Where, index: int, f: dict[str, Any]):
    parent = st.live_proc(where, "proc", where.name("proc", f["proc"]))
    child = where.name("child", f["child"])
    if child in st.procs:
        p = st.procs[child]
        when = f"created at step {p.created_at}" + (
            f", exited at step {p.exited_at}" if p.exited_at is not None else "")
        where.fail("child", f'process "{child}" already exists ({when}); use a new name')
    if sum(p.exited_at is None for p in st.procs.values()) >= _MAX_PROCS:
        where.fail("child", f"more than {_MAX_PROCS} live processes")
    # The child inherits every mapping as it stands now; pins and pipes are not
    # inherited (the agent closes the child's copies of the ring and pipe fds).
    st.procs[child] = _Proc(child, index, views={
        name: _View(v.spec, list(v.unmapped)) for name, v in parent.views.items()
        if v.gone_at is None
    })
    return parent.name, {"child": child}


def _do_munmap(st: _State, where: _Where, index: int, f: dict[str, Any]):
    proc, v = st.view(where, f)
    # A device-dax VMA can only be split at a multiple of the device alignment
    # (dev_dax_may_split() refuses the rest with EINVAL), and a partial munmap
    # splits it.
    why = (" (a device-dax mapping can only be split at its device's alignment)"
           if st.device > PAGE_SIZE else "")
    offset, length = st.span(where, f, v, st.device, why)
    first, end = offset // PAGE_SIZE, (offset + length) // PAGE_SIZE
    if v.mapped_count(first, end) == 0:
        verb = "is" if end - first == 1 else "are"
        where.fail("offset", f'{_pages_text(first, end - 1)} of "{v.spec.name}" {verb} '
                   f'already unmapped from "{proc.name}"')
    v.unmapped.append((first, end, index))
    whole = v.mapped_count(0, v.spec.pages) == 0
    if whole:
        v.gone_at = index
    return proc.name, {"map": v.spec.name, "offset": offset, "length": length, "whole": whole}


def _do_exit(st: _State, where: _Where, index: int, f: dict[str, Any]):
    proc = st.live_proc(where, "proc", where.name("proc", f["proc"]))
    proc.exited_at = index
    for name in proc.pins | proc.pipes:
        st.handles[name].released_at = index
    return proc.name, {}


def _take(kind: str, limit_name: str):
    def do(st: _State, where: _Where, index: int, f: dict[str, Any]):
        proc, v = st.view(where, f)
        name = where.name("name", f["name"])
        if (taken := st.name_taken(name)) is not None:
            where.fail("name", f'"{name}" already names {taken}; names are used once per scenario')
        offset, length = st.span(where, f, v, PAGE_SIZE)
        limit = _PIN_MAX if kind == "pin" else _SPLICE_MAX
        if length > limit:
            where.fail("length", f"{format_size(length)} is more than {limit_name} "
                       f"({format_size(limit)})")
        st.all_mapped(where, f, v, offset, length)
        live = proc.pins if kind == "pin" else proc.pipes
        if len(live) >= _MAX_HANDLES:
            where.fail("name", f'process "{proc.name}" already holds {_MAX_HANDLES} live '
                       f"{kind}s")
        live.add(name)
        st.handles[name] = _Handle(kind, proc.name, v.spec.name, index)
        return proc.name, {"map": v.spec.name, "name": name, "offset": offset, "length": length}
    return do


def _release(kind: str):
    def do(st: _State, where: _Where, index: int, f: dict[str, Any]):
        name = where.name(kind, f[kind])
        h = st.handles.get(name)
        noun = "pin" if kind == "pin" else "pipe"
        if h is None or h.kind != kind:
            known = ", ".join(f'"{n}"' for n, x in st.handles.items() if x.kind == kind)
            where.fail(kind, f'no {noun} "{name}" ({noun}s so far: {known or "none"})')
        if f["proc"] is not None and where.name("proc", f["proc"]) != h.proc:
            where.fail("proc", f'{noun} "{name}" belongs to process "{h.proc}", '
                       f'not "{f["proc"]}"')
        proc = st.live_proc(where, "proc", h.proc)
        if h.released_at is not None:
            verb = "unpinned" if kind == "pin" else "drained"
            where.fail(kind, f'{noun} "{name}" was already {verb} at step {h.released_at}')
        h.released_at = index
        (proc.pins if kind == "pin" else proc.pipes).discard(name)
        return proc.name, {kind: name, "map": h.map}
    return do


def _do_madvise(st: _State, where: _Where, index: int, f: dict[str, Any]):
    proc, v = st.view(where, f)
    name = _advice(where, f["advice"])
    offset, length = st.span(where, f, v, PAGE_SIZE)
    st.all_mapped(where, f, v, offset, length)
    return proc.name, {"map": v.spec.name, "advice": name, "advice_value": MADVISE[name],
                       "offset": offset, "length": length}


def _do_mprotect(st: _State, where: _Where, index: int, f: dict[str, Any]):
    proc, v = st.view(where, f)
    prot = _prot(where, f["prot"])
    # mprotect of part of a VMA splits it: same rule as munmap.
    why = (" (a device-dax mapping can only be split at its device's alignment)"
           if st.device > PAGE_SIZE else "")
    offset, length = st.span(where, f, v, st.device, why)
    st.all_mapped(where, f, v, offset, length)
    return proc.name, {"map": v.spec.name, "prot": prot, "offset": offset, "length": length}


def _do_snapshot(st: _State, where: _Where, index: int, f: dict[str, Any]):
    return None, {}


def _do_kmsg(st: _State, where: _Where, index: int, f: dict[str, Any]):
    """A line written to the guest's kernel log (/dev/kmsg): marks the log, or
    checks that kernel complaints are recorded against their step."""
    text = f["text"]
    if not isinstance(text, str) or not text or "\n" in text:
        where.fail("text", "one non-empty line of text")
    return None, {"text": text}


_ACTION = {
    "mmap": _do_mmap,
    "touch": _do_touch,
    "fork": _do_fork,
    "munmap": _do_munmap,
    "exit": _do_exit,
    "pin": _take("pin", "io_uring registers in one buffer"),
    "unpin": _release("pin"),
    "splice": _take("splice", "a pipe holds"),
    "drain": _release("splice"),
    "madvise": _do_madvise,
    "mprotect": _do_mprotect,
    "snapshot": _do_snapshot,
    "kmsg": _do_kmsg,
}
assert tuple(_ACTION) == ACTIONS == tuple(_FIELDS)


def _device(file: str, data: dict[str, Any]) -> int:
    where = _Where(file, "")
    if "device" not in data:
        where.fail("device", 'missing (add [device] with align = "4K", "2M" or "1G")')
    table = _table(where, "device", data["device"])
    where = _Where(file, "device")
    _check_keys(where, table, ("align",), ("align",))
    v = table["align"]
    known = ", ".join(f'"{format_size(a)}"' for a in DEVICE_SIZES)
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        where.fail("align", f"must be one of {known}, not {_type_name(v)} {_show(v)}")
    try:
        align = parse_size(v)
    except UserError:
        align = -1
    if align not in DEVICE_SIZES:
        where.fail("align", f"no device with alignment {_show(v)} (known: {known})")
    return align


def _watch(file: str, raw: Any, maps: Mapping[str, MapSpec]) -> tuple[WatchSpec, ...]:
    where = _Where(file, "")
    if not isinstance(raw, list):
        where.fail("watch", f"must be an array of {{map = ..., page = ...}} tables, "
                   f"not {_type_name(raw)}")
    out = []
    for i, entry in enumerate(raw, 1):
        w = _Where(file, f"watch {i}")
        if not isinstance(entry, dict):
            w.fail("watch", f"must be a table {{map = ..., page = ...}}, not {_type_name(entry)}")
        _check_keys(w, entry, ("map", "page", "events"), ("map", "page"))
        name = w.name("map", entry["map"])
        if name not in maps:
            known = ", ".join(f'"{m}"' for m in maps) or "none"
            w.fail("map", f'no mapping "{name}" (mappings: {known})')
        page = entry["page"]
        if isinstance(page, bool) or not isinstance(page, int):
            w.fail("page", f"must be an integer, not {_type_name(page)} {_show(page)}")
        if not 0 <= page < maps[name].pages:
            w.fail("page", f'page {page} is outside mapping "{name}" ({maps[name].pages} pages)')
        events = entry.get("events", False)
        if events is True:
            events = "counts"
        if events is not False and events not in EVENT_MODES:
            w.fail("events", f'must be true, false, "counts" or "stacks", not {_show(events)}')
        out.append(WatchSpec(name, page, events or None))
    return tuple(dict.fromkeys(out))


def validate_text(text: str, name: str = "<string>", *, path: Path | None = None) -> Scenario:
    """Parse and check a scenario. *name* is the file name used in messages
    (its stem is the scenario's name unless the text sets ``name``).

    :raises ScenarioError: at the first thing that cannot run as written.
    """
    top = _Where(name, "")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ScenarioError(f"{name}: TOML syntax error: {e}") from e
    _check_keys(top, data, _TOP_KEYS, ())
    scen_name = Path(name).stem if "name" not in data else top.name("name", data["name"])
    title = scen_name if "title" not in data else top.string("title", data["title"])
    description = "" if "description" not in data else top.string(
        "description", data["description"])
    device = _device(name, data)
    raw_steps = data.get("step")
    if raw_steps is None:
        top.fail("step", "no steps (add [[step]] tables)")
    if not isinstance(raw_steps, list):
        top.fail("step", f"must be an array of tables ([[step]]), not {_type_name(raw_steps)}")
    if not raw_steps:
        top.fail("step", "no steps (add [[step]] tables)")
    state = _State(device)
    steps = tuple(_step(state, name, i, raw) for i, raw in enumerate(raw_steps, 1))
    watch = _watch(name, data["watch"], state.maps) if "watch" in data else ()
    return Scenario(
        name=scen_name,
        title=title,
        description=description.strip(),
        device=device,
        steps=steps,
        watch=watch,
        text=text,
        sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
        path=path,
    )


def load_scenario(path: str | Path) -> Scenario:
    """:func:`validate_text` of the file at *path*.

    :raises ScenarioError: if it cannot be read, or does not validate.
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ScenarioError(f"{path}: cannot read the scenario: {e.strerror}") from e
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ScenarioError(f"{path}: not UTF-8 text (byte {e.start})") from e
    return validate_text(text, str(path), path=p)
