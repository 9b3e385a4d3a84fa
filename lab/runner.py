"""Run a scenario against a booted session: each step through the guest
agent, then a snapshot of the watched folios, their page-table entries in
every process that maps them, the device's dev_pagemap and all its struct
pages (bulk path), and any complaint the guest kernel printed meanwhile.

The result is plain data (the records of `lab.model`: RunResult,
StepRecord, PageRecord); `lab.timeline` turns it into DataFrames.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from . import inspect
from .agent import AgentError
from .model import PageRecord, RunResult, StepRecord, UserError, format_size
from .scenario import Scenario, Step
from .session import Session

__all__ = ["Recorder", "run_scenario", "PAGE"]

PAGE = 4096


@dataclass
class _Mapping:
    """A named mapping as the runner tracks it (per process: fork copies it)."""

    name: str
    addr: int
    length: int
    offset: int  # into the device
    unmapped: set[int] = field(default_factory=set)  # 4K page indices no longer mapped

    def pages(self) -> range:
        return range(self.length // PAGE)


class _Guest:
    """The runner's bookkeeping of processes, mappings, pins and pipes."""

    def __init__(self) -> None:
        self.maps: dict[str, dict[str, _Mapping]] = {}  # proc -> name -> mapping
        self.pins: dict[str, tuple[str, int]] = {}  # pin name -> (proc, id)
        self.pipes: dict[str, tuple[str, int]] = {}  # splice name -> (proc, id)
        # name -> (map, first page, page count) of pins and pipes still held
        self.held: dict[str, tuple[str, str, int, int]] = {}

    def holds(self, kind: str, map_name: str, page: int) -> bool:
        return any(k == kind and m == map_name and first <= page < first + n
                   for k, m, first, n in self.held.values())

    def mapping(self, proc: str, name: str) -> _Mapping:
        """The mapping, or an error recorded against the step (e.g. its mmap
        failed earlier, or the process is gone)."""
        try:
            return self.maps[proc][name]
        except KeyError as exc:
            raise AgentError("map", errno.ENOENT,
                             f"process {proc!r} has no mapping {name!r} "
                             f"(its mmap failed, or it was unmapped or exited)") from exc


class Recorder:
    """Takes steps one at a time and snapshots after each: the engine of
    :func:`run_scenario` and of the notebook API (`lab.api.Lab`)."""

    def __init__(self, session: Session, device: dict, scenario: Scenario | None = None,
                 watched: dict[tuple[str, int], int] | None = None):
        self.session = session
        self.device = device
        self.guest = _Guest()
        self.watched = dict(watched or {})
        self.result = RunResult(scenario=scenario, kernel=session.kernel.name,
                                release=session.vm.release, accel=session.vm.spec.accel,
                                device=device)
        self.result.steps.append(self._snapshot(0, "start", None, "start", "", None, None,
                                                time.monotonic(), len(session.vm.complaints)))

    def watch(self, map_name: str, page: int) -> None:
        """Follow page *page* of mapping *map_name* from the next snapshot on."""
        for maps in self.guest.maps.values():
            if map_name in maps:
                m = maps[map_name]
                self.watched.setdefault((map_name, page), (self.device["start"] + m.offset) // PAGE + page)
                return
        raise UserError(f"no mapping named {map_name!r}")

    def arm(self, pfn: int, *, stacks: bool = False, page: tuple[str, int] | None = None) -> None:
        """Watchpoints on the counters of the folio holding *pfn* from now on
        (*page*: the (map, page) it is for, shown with its events)."""
        watcher = self.session.watcher
        if not watcher.connected:  # events from now on belong to the next step
            watcher.step = self.result.steps[-1].step + 1
        counters = watcher.watch(pfn, stacks=stacks)
        pages = self.result.watched_folios.setdefault(counters[0].folio_pfn, [])
        if page is not None and page not in pages:
            pages.append(page)

    def disarm(self, pfn: int | None = None) -> None:
        """Remove the watchpoints of the folio holding *pfn* (all with None)."""
        if self.session.armed_watcher is not None:
            self.session.armed_watcher.unwatch(pfn)
            self._sync_events()

    def _sync_events(self) -> None:
        w = self.session.armed_watcher
        if w is None:
            return
        self.result.events = list(w.events)
        self.result.event_stats = vars(w.stats).copy()

    def mapping(self, proc: str, name: str) -> _Mapping:
        """The live mapping *name* of process *proc* (address, length, offset)."""
        try:
            return self.guest.mapping(proc, name)
        except AgentError as exc:
            raise UserError(exc.message) from exc

    def step(self, step: Step) -> StepRecord:
        """Carry out *step* and record the snapshot after it. An agent error
        (the kernel refused, a fault) is recorded with its errno, not raised."""
        started = time.monotonic()
        complaints_from = len(self.session.vm.complaints)
        if self.session.armed_watcher is not None:
            self.session.armed_watcher.step = step.index  # events during the action
        errno_, error, detail = None, None, ""
        try:
            detail = _do(self.session, self.device, self.guest, step)
        except AgentError as exc:
            errno_, error = exc.errno, exc.message
        self.session.vm.check_alive()
        record = self._snapshot(step.index, step.action, step.proc, step.label or "", detail,
                                errno_, error, started, complaints_from)
        self.result.steps.append(record)
        return record

    def _snapshot(self, index, action, proc, label, detail, errno_, error, started,
                  complaints_from) -> StepRecord:
        record = _snapshot(self.session, self.device, self.guest, self.watched, step=index,
                           action=action, proc=proc, label=label, detail=detail, errno=errno_,
                           error=error, started=started, complaints_from=complaints_from,
                           accounting=self.result.accounting)
        self._sync_events()
        return record


def run_scenario(session: Session, scenario: Scenario, *,
                 progress: Callable[[str, int, int | None], None] | None = None,
                 events: str | None = None) -> RunResult:
    """Run every step of *scenario* in *session*'s guest, snapshot after each.

    An agent error on a step (an advice the kernel refuses, a fault) is
    recorded with its errno and the run goes on. Watched pages whose entry
    asks for ``events`` (or all, with *events* "counts"/"stacks") get
    watchpoints on their folio's counters after the first snapshot.
    """
    device = session.vm.device(scenario.device)
    # The watched pages are known before the run: a mapping's device offset
    # is in the scenario, and device-dax maps device offset X at its start + X.
    first_pfn = device["start"] // PAGE
    watched = {(w.map, w.page): first_pfn + scenario.device_page(w.map, w.page)
               for w in scenario.watch_list}
    recorder = Recorder(session, device, scenario, watched)
    for w in scenario.watch_list:
        mode = events or w.events
        if mode:
            recorder.arm(watched[(w.map, w.page)], stacks=mode == "stacks", page=(w.map, w.page))
    for step in scenario.steps:
        if progress:
            progress(f"{scenario.name} on {session.kernel.name}: step {step.index} {step.action}",
                     step.index, len(scenario.steps))
        recorder.step(step)
    recorder.disarm()
    return recorder.result


def _do(session: Session, device: dict, guest: _Guest, step: Step) -> str:
    """Carry out one step; a short description of what was done."""
    a, args, proc = session.agent, step.args, step.proc
    act = step.action
    if act == "mmap":
        length, offset = args["length"], args["offset"]
        addr = a.mmap(proc, device["name"], length, offset=offset, write=args["write"],
                      shared=args["shared"], align=device["align"] if device["align"] > 2 << 20 else 0)
        guest.maps.setdefault(proc, {})[args["name"]] = _Mapping(args["name"], addr, length, offset)
        return f"{args['name']} = mmap({device['name']}, {format_size(length)} at {format_size(offset)})"
    if act == "touch":
        m = guest.mapping(proc, args["map"])
        a.touch(proc, [m.addr + p * PAGE for p in args["pages"]], write=args["write"])
        kind = "write" if args["write"] else "read"
        return f"{kind} {args['map']} pages {_pages_text(args['pages'])}"
    if act == "fork":
        a.fork(proc, args["child"])
        guest.maps[args["child"]] = {
            name: _Mapping(m.name, m.addr, m.length, m.offset, set(m.unmapped))
            for name, m in guest.maps.get(proc, {}).items()}
        return f"fork {proc} -> {args['child']}"
    if act == "munmap":
        m = guest.mapping(proc, args["map"])
        a.munmap(proc, m.addr + args["offset"], args["length"])
        first = args["offset"] // PAGE
        m.unmapped.update(range(first, first + args["length"] // PAGE))
        if len(m.unmapped) >= m.length // PAGE:
            del guest.maps[proc][args["map"]]
        return f"munmap {args['map']} {format_size(args['length'])} at {format_size(args['offset'])}"
    if act == "exit":
        a.exit(proc)
        guest.maps.pop(proc, None)
        return f"exit {proc}"
    if act in ("pin", "splice"):
        m = guest.mapping(proc, args["map"])
        start = m.addr + args["offset"]
        span = (args["map"], args["offset"] // PAGE, args["length"] // PAGE)
        if act == "pin":
            guest.pins[args["name"]] = (proc, a.pin(proc, start, args["length"]))
            guest.held[args["name"]] = ("pin", *span)
            return f"pin {args['name']}: {args['map']} {format_size(args['length'])} (io_uring, long-term)"
        info = a.splice(proc, start, args["length"])
        guest.pipes[args["name"]] = (proc, info["pipe"])
        guest.held[args["name"]] = ("pipe", args["map"], span[1], -(-info["bytes"] // PAGE))
        return f"splice {args['name']}: {info['bytes']} bytes of {args['map']} into a pipe"
    if act == "unpin":
        pin_proc, pin_id = guest.pins.pop(args["pin"])
        a.unpin(pin_proc, pin_id)
        guest.held.pop(args["pin"], None)
        return f"unpin {args['pin']}"
    if act == "drain":
        pipe_proc, pipe_id = guest.pipes.pop(args["splice"])
        n = a.drain(pipe_proc, pipe_id)
        guest.held.pop(args["splice"], None)
        return f"drain {args['splice']}: {n} bytes read"
    if act == "madvise":
        m = guest.mapping(proc, args["map"])
        a.madvise(proc, m.addr + args["offset"], args["length"], args["advice_value"])
        return f"madvise {args['map']} MADV_{args['advice']}"
    if act == "mprotect":
        m = guest.mapping(proc, args["map"])
        a.mprotect(proc, m.addr + args["offset"], args["length"], args["prot"])
        return f"mprotect {args['map']} {args['prot'] or 'none'}"
    if act == "snapshot":
        return "snapshot"
    if act == "kmsg":
        a.kmsg(args["text"])
        return f"kmsg: {args['text']}"
    raise UserError(f"step {step.index}: the runner does not know action {act!r}")


# Reading /proc/PID/pagemap over a PUD-mapped device-dax range zaps the PUD:
# the page walk has no pud_entry callback there, so walk_pud_range() calls
# split_huge_pud(), which for a file/dax PUD just clears it (seen on 7.2).
# The guest's own truth would change what it observes, so for 1G devices
# it is not asked.
PUD_SIZE = 1 << 30


def _with_pagemap(session: Session, pages: list[PageRecord]) -> list[PageRecord]:
    """*pages* with the guest's /proc/PID/pagemap PFN of each mapped address."""
    from dataclasses import replace

    by_proc: dict[str, list[int]] = {}
    for pr in pages:
        if pr.proc is not None:
            by_proc.setdefault(pr.proc, []).append(pr.vaddr)
    answers = {}
    for proc, addrs in by_proc.items():
        for entry in session.agent.pagemap(proc, addrs):
            answers[(proc, entry["addr"])] = entry["pfn"] if entry["present"] else None
    return [replace(pr, pagemap_pfn=answers.get((pr.proc, pr.vaddr))) for pr in pages]


def _pages_text(pages) -> str:
    pages = list(pages)
    if len(pages) > 6:
        return f"{pages[0]}..{pages[-1]} ({len(pages)} pages)"
    return ", ".join(map(str, pages))


def _snapshot(session: Session, device: dict, guest: _Guest, watched: dict, *, step: int,
              action: str, proc: str | None, label: str, detail: str, errno: int | None,
              error: str | None, started: float, complaints_from: int,
              accounting: list | None = None) -> StepRecord:
    prog = session.prog
    # Where each watched page is mapped, per process (pagemap asked first:
    # the agent's answer comes from the running guest).
    holders: dict[tuple[str, int], list[tuple[str, int]]] = {}
    for proc_name, maps in guest.maps.items():
        for map_name, page in watched:
            m = maps.get(map_name)
            if m is not None and page not in m.unmapped:
                holders.setdefault((map_name, page), []).append((proc_name, m.addr + page * PAGE))
    pids = session.agent.procs()
    pages: list[PageRecord] = []
    with session.stopped():
        if session.armed_watcher is not None and accounting is not None:
            # events from here on are counted, and named, for the next step
            accounting.extend(session.armed_watcher.reconcile(next_step=step + 1))
        first = device["start"] // PAGE
        bulk = inspect.read_pages(prog, first, device["size"] // PAGE)
        pgmap = inspect.pgmap_state(prog, inspect.find_dev_pagemap(prog, first))
        for (map_name, page), pfn in sorted(watched.items()):
            folio = inspect.folio_state(prog, pfn)
            rows = holders.get((map_name, page)) or [(None, None)]
            for proc_name, vaddr in rows:
                pte = None
                if proc_name is not None:
                    try:
                        pte = inspect.pte_state(prog, pids[proc_name], vaddr)
                    except inspect.InspectError:
                        pte = None
                pages.append(PageRecord(map=map_name, page=page, pfn=pfn, folio=folio,
                                        proc=proc_name, vaddr=vaddr, pte=pte, pagemap_pfn=None,
                                        pinned=guest.holds("pin", map_name, page),
                                        in_pipe=guest.holds("pipe", map_name, page)))
    if device["align"] < PUD_SIZE:
        pages = _with_pagemap(session, pages)
    session.vm.sync_console()  # every line the step made the kernel print is in
    complaints = tuple((c.kind, c.text) for _, c in session.vm.complaints[complaints_from:])
    return StepRecord(step=step, action=action, proc=proc, label=label, detail=detail, errno=errno,
                      error=error, seconds=time.monotonic() - started, pages=tuple(pages),
                      pgmap=pgmap, device_refcount=bulk.refcount, device_mapcount=bulk.mapcount,
                      complaints=complaints)
