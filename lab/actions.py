"""Every action a step can take, declared once.

An :class:`Action` says what a step of that kind is: its fields (type,
default, doc), its check against the guest model (`lab.guest`: the same for
a scenario file, the runner, the notebook API and the panel), how the guest
agent carries it out, how the timeline describes it, which pages it faults
in or takes references on, whether it leaves the dev_pagemap's reference
count alone, and which arguments the notebook API takes positionally.

Adding an action is one entry in :data:`REGISTRY` (plus the agent command it
runs and its section in docs/scenarios.md, which a test holds to this
registry). Pure: the ``perform`` functions get the agent client passed in.
"""

from __future__ import annotations

import errno as _errno
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from .guest import (
    MADVISE,
    MAX_HANDLES,
    MAX_PROCS,
    PAGE_SIZE,
    PIN_MAX,
    SPLICE_MAX,
    GuestModel,
    Handle,
    Proc,
    View,
    Where,
    check_keys,
    pages_text,
    parse_pages,
    show,
)
from .model import MapSpec, Step, format_size

__all__ = [
    "REQUIRED",
    "Action",
    "Field",
    "REGISTRY",
    "ACTIONS",
    "Guest",
    "CHECK_ERRNO",
    "check_step",
    "pgmap_neutral_actions",
]

REQUIRED = object()  # the default of a field that must be given


@dataclass(frozen=True)
class Field:
    """One field of an action. ``kind`` drives the panel's widget and the
    API's handle conversion: ``proc``, ``newproc`` (a process created if
    new), ``map``, ``pin``, ``splice`` (handles), ``name`` (a new handle's
    name; the API makes one up with ``auto`` as prefix), ``size``,
    ``pages``, ``bool``, ``advice``, ``prot``, ``text``."""

    name: str
    kind: str
    default: Any = REQUIRED
    doc: str = ""
    auto: str | None = None
    example: Any = None  # what the panel fills in for a required field

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


@dataclass(frozen=True)
class Guest:
    """What ``perform`` needs of a live guest: the agent client, the device
    (``lab.vm.Vm.device``: name, align, start, size) and the guest model."""

    agent: Any
    device: Mapping[str, Any]
    model: GuestModel


@dataclass(frozen=True)
class Action:
    """One kind of step.

    ``check(model, where, index, fields) -> (proc, args)`` validates the
    fields against the model and applies the step to it as if the guest did
    it; ``perform(guest, step) -> result`` runs it through the agent (an
    ``AgentError`` is the guest refusing); ``settle(model, step, result)``
    records what the guest returned (an address, a handle's id);
    ``describe(step, result) -> str`` is the timeline's ``detail``;
    ``touches(step)`` the (map, page) pairs it faults in or takes references
    on; ``creates`` the handle kind the API returns (``map``, ``pin``,
    ``splice``); ``positional`` the fields the API takes by position;
    ``kernel_decides``: the guest refusing it is a result the notebook API
    returns rather than raises (what device-dax allows is the kernel's call).
    """

    name: str
    doc: str
    fields: tuple[Field, ...]
    check: Callable[[GuestModel, Where, int, dict[str, Any]], tuple[str | None, dict]]
    perform: Callable[[Guest, Step], Any]
    describe: Callable[[Step, Any], str]
    pgmap_neutral: bool
    settle: Callable[[GuestModel, Step, Any], None] | None = None
    touches: Callable[[Step], tuple[tuple[str, int], ...]] | None = None
    creates: str | None = None
    positional: tuple[str, ...] = ()
    kernel_decides: bool = False  # a refusal is the experiment's result, not a mistake

    def field(self, name: str) -> Field:
        return next(f for f in self.fields if f.name == name)

    def defaults(self) -> dict[str, Any]:
        return {f.name: f.default for f in self.fields}


# -- shared pieces -----------------------------------------------------------

_SPLIT_WHY = " (a device-dax mapping can only be split at its device's alignment)"


def _split_why(st: GuestModel) -> str:
    return _SPLIT_WHY if st.device > PAGE_SIZE else ""


def _range_pages(step: Step) -> tuple[tuple[str, int], ...]:
    a = step.args
    first = a["offset"] // PAGE_SIZE
    return tuple((a["map"], p) for p in range(first, first + a["length"] // PAGE_SIZE))


def _view_of(guest: Guest, step: Step) -> View:
    return guest.model.procs[step.proc].views[step.args["map"]]


def _addr(guest: Guest, step: Step) -> int:
    """The guest address of the step's range (``offset`` into its mapping)."""
    return _view_of(guest, step).addr + step.args.get("offset", 0)


_PROC_OPT = Field("proc", "proc", None, "the process (default: the mapping's owner)")
_OFFSET = Field("offset", "size", 0, "from the start of the mapping")
_LENGTH = Field("length", "size", None, "default: the rest of the mapping")


def _nothing(guest: Guest, step: Step) -> None:
    return None


# -- mmap ----------------------------------------------------------------------


def _check_mmap(st: GuestModel, where: Where, index: int, f: dict[str, Any]):
    proc_name = where.name("proc", f["proc"])
    name = where.name("name", f["name"])
    if (taken := st.name_taken(name)) is not None:
        where.fail("name", f'"{name}" already names {taken}; names are used once')
    length = where.size("length", f["length"])
    offset = where.size("offset", f["offset"])
    write = where.boolean("write", f["write"])
    shared = where.boolean("shared", f["shared"])
    align, size = st.device, st.device_size
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
        if sum(p.exited_at is None for p in st.procs.values()) >= MAX_PROCS:
            where.fail("proc", f"more than {MAX_PROCS} live processes")
        proc = st.procs[proc_name] = Proc(proc_name, index)
    elif proc.exited_at is not None:
        where.fail("proc", f'process "{proc_name}" exited at step {proc.exited_at}; '
                   "a new process needs a new name")
    spec = MapSpec(name, proc_name, offset, length, index)
    st.maps[name] = spec
    proc.views[name] = View(spec, length)
    return proc_name, {"name": name, "length": length, "offset": offset, "write": write,
                       "shared": shared}


def _perform_mmap(guest: Guest, step: Step) -> int:
    a, dev = step.args, guest.device
    # 1G devices: map at a 1G-aligned address (the agent over-maps and trims)
    return guest.agent.mmap(step.proc, dev["name"], a["length"], offset=a["offset"],
                            write=a["write"], shared=a["shared"],
                            align=dev["align"] if dev["align"] > 2 << 20 else 0)


def _settle_mmap(st: GuestModel, step: Step, addr: int) -> None:
    st.procs[step.proc].views[step.args["name"]].addr = addr


def _describe_mmap(step: Step, _addr: Any) -> str:
    a = step.args
    return f"{a['name']} = mmap({format_size(a['length'])} at {format_size(a['offset'])})"


# -- touch -------------------------------------------------------------------


def _check_touch(st: GuestModel, where: Where, index: int, f: dict[str, Any]):
    proc, v = st.view(where, f)
    pages = parse_pages(f["pages"], v.pages, v.spec.name, where)
    for page in pages:
        if (step := v.unmapped_at(page)) is not None:
            where.fail("pages", f'page {page} of "{v.spec.name}" was unmapped at step {step}')
    write = where.boolean("write", f["write"])
    return proc.name, {"map": v.spec.name, "pages": pages, "write": write}


def _perform_touch(guest: Guest, step: Step) -> None:
    base = _view_of(guest, step).addr
    guest.agent.touch(step.proc, [base + p * PAGE_SIZE for p in step.args["pages"]],
                      write=step.args["write"])


def _describe_touch(step: Step, _r: Any) -> str:
    kind = "write" if step.args["write"] else "read"
    return f"{kind} {step.args['map']} pages {_pages_list(step.args['pages'])}"


def _pages_list(pages) -> str:
    pages = list(pages)
    if len(pages) > 6:
        return f"{pages[0]}..{pages[-1]} ({len(pages)} pages)"
    return ", ".join(map(str, pages))


# -- fork / exit -------------------------------------------------------------


def _check_fork(st: GuestModel, where: Where, index: int, f: dict[str, Any]):
    parent = st.live_proc(where, "proc", where.name("proc", f["proc"]))
    child = where.name("child", f["child"])
    if child in st.procs:
        p = st.procs[child]
        when = f"created at step {p.created_at}" + (
            f", exited at step {p.exited_at}" if p.exited_at is not None else "")
        where.fail("child", f'process "{child}" already exists ({when}); use a new name')
    if sum(p.exited_at is None for p in st.procs.values()) >= MAX_PROCS:
        where.fail("child", f"more than {MAX_PROCS} live processes")
    # The child inherits every mapping as it stands now, at the same address;
    # pins and pipes are not inherited (the agent closes the child's copies
    # of the ring and pipe fds).
    st.procs[child] = Proc(child, index, views={
        name: View(v.spec, v.length, list(v.unmapped), addr=v.addr)
        for name, v in parent.views.items() if v.gone_at is None
    })
    return parent.name, {"child": child}


def _check_exit(st: GuestModel, where: Where, index: int, f: dict[str, Any]):
    proc = st.live_proc(where, "proc", where.name("proc", f["proc"]))
    st.end_process(proc.name, index)
    return proc.name, {}


# -- munmap / mremap -----------------------------------------------------------


def _check_munmap(st: GuestModel, where: Where, index: int, f: dict[str, Any]):
    proc, v = st.view(where, f)
    # A device-dax VMA can only be split at a multiple of the device alignment
    # (dev_dax_may_split() refuses the rest with EINVAL), and a partial munmap
    # splits it.
    offset, length = st.span(where, f, v, st.device, _split_why(st))
    first, end = offset // PAGE_SIZE, (offset + length) // PAGE_SIZE
    if v.mapped_count(first, end) == 0:
        verb = "is" if end - first == 1 else "are"
        where.fail("offset", f'{pages_text(first, end - 1)} of "{v.spec.name}" {verb} '
                   f'already unmapped from "{proc.name}"')
    v.unmapped.append((first, end, index))
    whole = v.mapped_count(0, v.pages) == 0
    if whole:
        v.gone_at = index
    return proc.name, {"map": v.spec.name, "offset": offset, "length": length, "whole": whole}


def _check_mremap(st: GuestModel, where: Where, index: int, f: dict[str, Any]):
    proc, v = st.view(where, f)
    new = where.size("length", f["length"])
    maymove = where.boolean("maymove", f["maymove"])
    if new == 0 or new % PAGE_SIZE:
        where.fail("length", f"{format_size(new)} is not a positive multiple of 4K")
    if v.spec.offset + new > st.device_size:
        where.fail("length", f"mapping \"{v.spec.name}\" grown to {format_size(new)} at device "
                   f"offset {format_size(v.spec.offset)} does not fit the device "
                   f"({format_size(st.device_size)})")
    if v.unmapped:
        where.fail("map", f'mapping "{v.spec.name}" was partly unmapped at step '
                   f"{v.unmapped[0][2]}: mremap takes one whole VMA")
    old = v.length
    # What the device allows (splitting at its alignment, growing in place or
    # moving) is the kernel's to decide: the runner records its errno.
    v.length = new
    return proc.name, {"map": v.spec.name, "old_length": old, "length": new,
                       "maymove": maymove}


def _perform_mremap(guest: Guest, step: Step) -> int:
    a = step.args
    return guest.agent.mremap(step.proc, _view_of(guest, step).addr, a["old_length"],
                              a["length"], maymove=a["maymove"])


def _settle_mremap(st: GuestModel, step: Step, addr: int) -> None:
    st.procs[step.proc].views[step.args["map"]].addr = addr


def _describe_mremap(step: Step, addr: Any) -> str:
    a = step.args
    how = " (may move)" if a["maymove"] else ""
    return (f"mremap {a['map']} {format_size(a['old_length'])} -> "
            f"{format_size(a['length'])}{how}")


# -- pin / splice and their release -------------------------------------------


def _take(kind: str, limit: int, limit_name: str):
    def check(st: GuestModel, where: Where, index: int, f: dict[str, Any]):
        proc, v = st.view(where, f)
        name = where.name("name", f["name"])
        if (taken := st.name_taken(name)) is not None:
            where.fail("name", f'"{name}" already names {taken}; names are used once')
        offset, length = st.span(where, f, v, PAGE_SIZE)
        if length > limit:
            where.fail("length", f"{format_size(length)} is more than {limit_name} "
                       f"({format_size(limit)})")
        st.all_mapped(where, f, v, offset, length)
        live = proc.pins if kind == "pin" else proc.pipes
        if len(live) >= MAX_HANDLES:
            where.fail("name", f'process "{proc.name}" already holds {MAX_HANDLES} live '
                       f"{kind}s")
        live.add(name)
        st.handles[name] = Handle(kind, proc.name, v.spec.name, index, offset // PAGE_SIZE,
                                  length // PAGE_SIZE)
        return proc.name, {"map": v.spec.name, "name": name, "offset": offset, "length": length}
    return check


def _perform_pin(guest: Guest, step: Step) -> int:
    return guest.agent.pin(step.proc, _addr(guest, step), step.args["length"])


def _settle_pin(st: GuestModel, step: Step, pin_id: int) -> None:
    st.handles[step.args["name"]].guest_id = pin_id


def _perform_splice(guest: Guest, step: Step) -> dict:
    return guest.agent.splice(step.proc, _addr(guest, step), step.args["length"])


def _settle_splice(st: GuestModel, step: Step, info: dict) -> None:
    h = st.handles[step.args["name"]]
    h.guest_id = info["pipe"]
    h.pages = -(-info["bytes"] // PAGE_SIZE)  # what the pipe really holds


def _release(kind: str):
    def check(st: GuestModel, where: Where, index: int, f: dict[str, Any]):
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
    return check


def _handle_id(guest: Guest, name: str) -> int:
    return guest.model.handles[name].guest_id


# -- range actions: madvise, mprotect, mlock, munlock --------------------------


def _advice(where: Where, v: Any) -> str:
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


def _prot(where: Where, v: Any) -> str:
    where.string("prot", v)
    s = v.strip().lower()
    if s == "none":
        return ""
    if not s or any(c not in "rwx" for c in s) or len(set(s)) != len(s):
        where.fail("prot", f'{show(v)} is not a protection: use letters of "rwx" or "none"')
    return "".join(c for c in "rwx" if c in s)


def _check_madvise(st: GuestModel, where: Where, index: int, f: dict[str, Any]):
    proc, v = st.view(where, f)
    name = _advice(where, f["advice"])
    offset, length = st.span(where, f, v, PAGE_SIZE)
    st.all_mapped(where, f, v, offset, length)
    return proc.name, {"map": v.spec.name, "advice": name, "advice_value": MADVISE[name],
                       "offset": offset, "length": length}


def _check_mprotect(st: GuestModel, where: Where, index: int, f: dict[str, Any]):
    proc, v = st.view(where, f)
    prot = _prot(where, f["prot"])
    # mprotect of part of a VMA splits it: same rule as munmap.
    offset, length = st.span(where, f, v, st.device, _split_why(st))
    st.all_mapped(where, f, v, offset, length)
    return proc.name, {"map": v.spec.name, "prot": prot, "offset": offset, "length": length}


def _check_lock(st: GuestModel, where: Where, index: int, f: dict[str, Any]):
    proc, v = st.view(where, f)
    # mlock_fixup() leaves a device-dax VMA alone (!vma_supports_mlock():
    # vma_is_dax), so no split and any 4K range; do_mlock() still populates
    # it (__mm_populate), with or without MLOCK_ONFAULT, since the VMA never
    # gets VM_LOCKONFAULT.
    offset, length = st.span(where, f, v, PAGE_SIZE)
    st.all_mapped(where, f, v, offset, length)
    args = {"map": v.spec.name, "offset": offset, "length": length}
    if "onfault" in f:
        args["onfault"] = where.boolean("onfault", f["onfault"])
    return proc.name, args


# -- snapshot / kmsg -----------------------------------------------------------


def _check_snapshot(st: GuestModel, where: Where, index: int, f: dict[str, Any]):
    return None, {}


def _check_kmsg(st: GuestModel, where: Where, index: int, f: dict[str, Any]):
    """A line written to the guest's kernel log (/dev/kmsg): marks the log, or
    checks that kernel complaints are recorded against their step."""
    text = f["text"]
    if not isinstance(text, str) or not text or "\n" in text:
        where.fail("text", "one non-empty line of text")
    return None, {"text": text}


# -- the registry ----------------------------------------------------------------

_RANGE_FIELDS = (Field("map", "map", doc="the mapping"), _OFFSET, _LENGTH, _PROC_OPT)

REGISTRY: Mapping[str, Action] = MappingProxyType({a.name: a for a in (
    Action(
        "mmap", "Map part of the device into a process (creating the process if needed).",
        (Field("proc", "newproc", doc="the process", example="a"),
         Field("name", "name", doc="the new mapping's handle", auto="m"),
         Field("length", "size", doc="a multiple of the device alignment", example="64K"),
         Field("offset", "size", 0, "on the device; a multiple of the device alignment"),
         Field("write", "bool", True, "PROT_WRITE as well as PROT_READ"),
         Field("shared", "bool", True, "must stay true: device-dax refuses private mappings")),
        _check_mmap, _perform_mmap, _describe_mmap, pgmap_neutral=True, settle=_settle_mmap,
        creates="map", positional=("length",)),
    Action(
        "touch", "Fault pages in: one byte store each with write, one load otherwise.",
        (Field("map", "map", doc="the mapping"),
         Field("pages", "pages", doc="page list; every page must still be mapped", example="0"),
         Field("write", "bool", False, "write fault instead of read fault"),
         _PROC_OPT),
        _check_touch, _perform_touch, _describe_touch, pgmap_neutral=True,
        touches=lambda s: tuple((s.args["map"], p) for p in s.args["pages"]),
        positional=("map", "pages")),
    Action(
        "fork", "Fork a process; the child inherits its mappings.",
        (Field("proc", "proc", doc="the parent"),
         Field("child", "text", doc="a new process name", example="b")),
        _check_fork, lambda g, s: g.agent.fork(s.proc, s.args["child"]),
        lambda s, _r: f"fork {s.proc} -> {s.args['child']}", pgmap_neutral=True,
        positional=("proc", "child")),
    Action(
        "munmap", "Unmap a mapping, or part of it (at the device alignment).",
        _RANGE_FIELDS,
        _check_munmap,
        lambda g, s: g.agent.munmap(s.proc, _addr(g, s), s.args["length"]),
        lambda s, _r: (f"munmap {s.args['map']} {format_size(s.args['length'])} at "
                       f"{format_size(s.args['offset'])}"),
        pgmap_neutral=True, positional=("map",)),
    Action(
        "mremap", "Resize a whole mapping in place, or move it (MREMAP_MAYMOVE).",
        (Field("map", "map", doc="the mapping"),
         Field("length", "size", doc="the new length", example="128K"),
         Field("maymove", "bool", True, "MREMAP_MAYMOVE: the kernel may move the mapping"),
         _PROC_OPT),
        _check_mremap, _perform_mremap, _describe_mremap, pgmap_neutral=True,
        settle=_settle_mremap, positional=("map", "length"), kernel_decides=True),
    Action(
        "exit", "The process exits: the kernel tears its mappings down and releases its "
        "pins and pipes.",
        (Field("proc", "proc", doc="the process"),),
        _check_exit, lambda g, s: g.agent.exit(s.proc), lambda s, _r: f"exit {s.proc}",
        pgmap_neutral=True, positional=("proc",)),
    Action(
        "pin", "Register a range as an io_uring fixed buffer: a FOLL_LONGTERM pin until unpin.",
        (Field("map", "map", doc="the mapping"),
         Field("name", "name", doc="the pin's handle", auto="pin"),
         _OFFSET, Field("length", "size", None, "default: the rest of the mapping; at most 1G"),
         _PROC_OPT),
        _take("pin", PIN_MAX, "io_uring registers in one buffer"), _perform_pin,
        lambda s, _r: (f"pin {s.args['name']}: {s.args['map']} "
                       f"{format_size(s.args['length'])} (io_uring, long-term)"),
        pgmap_neutral=False, settle=_settle_pin, touches=_range_pages, creates="pin",
        positional=("map",)),
    Action(
        "unpin", "Unregister an io_uring fixed buffer: the pin ends.",
        (Field("pin", "pin", doc="a live pin"),
         Field("proc", "proc", None, "if given, must be the pin's process")),
        _release("pin"), lambda g, s: g.agent.unpin(s.proc, _handle_id(g, s.args["pin"])),
        lambda s, _r: f"unpin {s.args['pin']}", pgmap_neutral=False, positional=("pin",)),
    Action(
        "splice", "vmsplice a range into a new pipe: page references until drain.",
        (Field("map", "map", doc="the mapping"),
         Field("name", "name", doc="the pipe's handle", auto="pipe"),
         _OFFSET, Field("length", "size", None, "default: the rest of the mapping; at most 1M"),
         _PROC_OPT),
        _take("splice", SPLICE_MAX, "a pipe holds"), _perform_splice,
        lambda s, r: (f"splice {s.args['name']}: {r['bytes'] if r else s.args['length']} "
                      f"bytes of {s.args['map']} into a pipe"),
        pgmap_neutral=False, settle=_settle_splice, touches=_range_pages, creates="splice",
        positional=("map",)),
    Action(
        "drain", "Read a pipe empty and close it: its page references go.",
        (Field("splice", "splice", doc="a live pipe"),
         Field("proc", "proc", None, "if given, must be the pipe's process")),
        _release("splice"),
        lambda g, s: g.agent.drain(s.proc, _handle_id(g, s.args["splice"])),
        lambda s, n: f"drain {s.args['splice']}: {n} bytes read", pgmap_neutral=False,
        positional=("splice",)),
    Action(
        "madvise", "madvise a range by advice name; an advice the kernel refuses is recorded.",
        (Field("map", "map", doc="the mapping"),
         Field("advice", "advice", doc="MADV_* name, any case, with or without MADV_, or number",
               example="DONTNEED"),
         _OFFSET, _LENGTH, _PROC_OPT),
        _check_madvise,
        lambda g, s: g.agent.madvise(s.proc, _addr(g, s), s.args["length"],
                                     s.args["advice_value"]),
        lambda s, _r: f"madvise {s.args['map']} MADV_{s.args['advice']}",
        pgmap_neutral=False, positional=("map", "advice"), kernel_decides=True,
        # MADV_POPULATE_READ/WRITE fault the range in (madvise_populate)
        touches=lambda s: _range_pages(s) if s.args["advice"].startswith("POPULATE") else ()),
    Action(
        "mprotect", "Change a range's protection (at the device alignment).",
        (Field("map", "map", doc="the mapping"),
         Field("prot", "prot", doc='letters of "rwx" or "none"', example="r"),
         _OFFSET, _LENGTH, _PROC_OPT),
        _check_mprotect,
        lambda g, s: g.agent.mprotect(s.proc, _addr(g, s), s.args["length"], s.args["prot"]),
        lambda s, _r: f"mprotect {s.args['map']} {s.args['prot'] or 'none'}",
        pgmap_neutral=True, positional=("map", "prot"), kernel_decides=True),
    Action(
        "mlock", "mlock a range: on device-dax the kernel faults it all in (even with "
        "onfault) and never sets VM_LOCKED.",
        (Field("map", "map", doc="the mapping"), _OFFSET, _LENGTH,
         Field("onfault", "bool", False, "MLOCK_ONFAULT (mlock2): lock pages as they fault"),
         _PROC_OPT),
        _check_lock,
        lambda g, s: g.agent.mlock(s.proc, _addr(g, s), s.args["length"],
                                   onfault=s.args["onfault"]),
        lambda s, _r: (f"mlock {s.args['map']} {format_size(s.args['length'])}"
                       + (" (on fault)" if s.args["onfault"] else "")),
        pgmap_neutral=True,
        touches=_range_pages, positional=("map",),
        kernel_decides=True),
    Action(
        "munlock", "munlock a range (a no-op on device-dax VMAs, which are never locked).",
        (Field("map", "map", doc="the mapping"), _OFFSET, _LENGTH, _PROC_OPT),
        _check_lock,
        lambda g, s: g.agent.munlock(s.proc, _addr(g, s), s.args["length"]),
        lambda s, _r: f"munlock {s.args['map']} {format_size(s.args['length'])}",
        pgmap_neutral=True, positional=("map",), kernel_decides=True),
    Action(
        "snapshot", "No action in the guest: an extra snapshot.", (),
        _check_snapshot, _nothing, lambda s, _r: "snapshot", pgmap_neutral=True),
    Action(
        "kmsg", "Write one line to the guest kernel's log through /dev/kmsg.",
        (Field("text", "text", doc="one line; a <N> prefix sets the log level",
               example="devdax-lab: mark"),),
        _check_kmsg, lambda g, s: g.agent.kmsg(s.args["text"]),
        lambda s, _r: f"kmsg: {s.args['text']}", pgmap_neutral=True, positional=("text",)),
)})

ACTIONS: tuple[str, ...] = tuple(REGISTRY)


def pgmap_neutral_actions() -> frozenset[str]:
    """Actions that leave the dev_pagemap's reference count alone (plus the
    ``start`` snapshot)."""
    return frozenset({"start", *(a.name for a in REGISTRY.values() if a.pgmap_neutral)})


def check_step(model: GuestModel, where: Where, index: int, action: str,
               raw: Mapping[str, Any], label: str | None = None) -> Step:
    """Check one step's fields (``raw``: the fields as written, without
    ``action`` and ``label``) against *model*, apply it to the model and
    return the normalised :class:`~lab.model.Step`.

    :raises StepError: (of *where*'s class) naming the field, in one line.
    """
    spec = REGISTRY.get(action) if isinstance(action, str) else None
    if spec is None:
        where.fail("action", f"unknown action {show(action)} (known: {', '.join(ACTIONS)})")
    check_keys(where, raw, [f.name for f in spec.fields], [f.name for f in spec.fields
                                                           if f.required])
    fields = {f.name: raw.get(f.name, None if f.required else f.default) for f in spec.fields}
    proc, args = spec.check(model, where, index, fields)
    step = Step(index, action, proc, MappingProxyType(args), label,
                fields=MappingProxyType(fields))
    touched = spec.touches(step) if spec.touches else ()
    return Step(index, action, proc, step.args, label, fields=step.fields, pages_touched=touched)


# The errno recorded for a scenario step that no longer fits the live guest
# (its mapping's mmap failed earlier, say): what the guest would answer.
CHECK_ERRNO = _errno.ENOENT
