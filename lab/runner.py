"""Run a scenario against a booted session: each step through the guest
agent, then a snapshot of the watched folios, their page-table entries in
every process that maps them, the device's dev_pagemap and all its struct
pages (bulk path), every live process's RSS counters, the signals each
process received, the processes the kernel killed, and any complaint or
memory-management message the guest kernel printed meanwhile.

The result is plain data (the records of `lab.model`: RunResult,
StepRecord, PageRecord); `lab.timeline` turns it into DataFrames.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import inspect
from .inspect import probes
from .actions import CHECK_ERRNO, REGISTRY, Guest, check_step
from .agent import AgentError
from .guest import PAGE_SIZE, GuestModel, StepError, Where
from .model import PageRecord, ProcessRecord, RunResult, SignalRecord, Step, StepRecord, UserError
from .progress import Progress
from .scenario import Scenario
from .session import Session
from .signals import describe_signal

__all__ = ["Recorder", "run_scenario", "PAGE"]

PAGE = PAGE_SIZE  # pages are counted in 4K units (lab.guest)


class Recorder:
    """Takes steps one at a time and snapshots after each: the engine of
    :func:`run_scenario` and of the notebook API (`lab.api.Lab`).

    ``model`` is the live guest as `lab.guest` models it: every step is
    checked against it by its action (`lab.actions`), carried out through
    the agent, and applied to the model only once the guest agreed.
    """

    def __init__(self, session: Session, device: dict, scenario: Scenario | None = None,
                 watched: dict[tuple[str, int], int] | None = None, *,
                 verdict_reads: bool = True):
        self.session = session
        self.device = device
        # what the exact invariants need beyond the state itself (the kind
        # of kernel, who holds each folio); off only to measure their cost
        self.verdict_reads = verdict_reads
        self.model = GuestModel(device["align"], device["size"])
        self.watched = dict(watched or {})
        self.result = RunResult(scenario=scenario, kernel=session.kernel.name,
                                kernel_spelling=session.kernel_spelling, release=session.vm.release, accel=session.vm.spec.accel,
                                device=device, ready_seconds=round(session.vm.time_to_ready, 3))
        # does a device-dax fault map the folio here? (from the fault handler's code)
        if verdict_reads:
            self.result.dax_fault_calls = tuple(sorted(probes.dax_fault_inserts(session.prog)))
            self.result.counts_mappings = probes.counts_device_dax_mappings(session.prog)
        self.result.steps.append(self._snapshot(0, "start", None, "start", "", None, None,
                                                time.monotonic(), self._console_marks()))

    def _console_marks(self) -> tuple[int, int]:
        """How many complaints and mm messages the console held so far."""
        return len(self.session.vm.complaints), len(self.session.vm.mm_messages)

    @property
    def next_index(self) -> int:
        return self.result.steps[-1].step + 1

    def watch(self, map_name: str, page: int) -> None:
        """Follow page *page* of mapping *map_name* from the next snapshot on."""
        spec = self.model.maps.get(map_name)
        if spec is None:
            raise UserError(f"no mapping named {map_name!r}")
        self.watched.setdefault((map_name, page),
                                (self.device["start"] + spec.offset) // PAGE + page)

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

    def check(self, action: str, fields: Mapping[str, Any], label: str | None = None,
              where: Where | None = None) -> Step:
        """*action* with *fields* checked against the live guest model, as the
        next step (the model is not changed).

        :raises StepError: what a scenario file would be told, in one line.
        """
        index = self.next_index
        where = where or Where("lab", f"step {index} ({action})")
        return check_step(self.model.copy(), where, index, action, fields, label)

    def step(self, step: Step, *, strict: bool = True) -> StepRecord:
        """Carry out *step* (made by :meth:`check`, or a scenario's) and record
        the snapshot after it. The guest refusing it (an agent error: an
        advice the kernel refuses, a fault) is recorded with its errno, not
        raised. A step that no longer fits the live guest (its mapping's mmap
        failed earlier, say) raises StepError with *strict*, else it is
        recorded with ENOENT."""
        started = time.monotonic()
        complaints_from = self._console_marks()
        if self.session.armed_watcher is not None:
            self.session.armed_watcher.step = step.index  # events during the action
        errno_, error, detail = None, None, ""
        action = REGISTRY[step.action]
        model = self.model.copy()
        try:
            where = Where("lab", f"step {step.index} ({step.action})")
            step = check_step(model, where, step.index, step.action, step.fields, step.label)
        except StepError as exc:
            if strict:
                raise
            errno_, error = CHECK_ERRNO, str(exc)
        else:
            try:
                result = action.perform(Guest(self.session.agent, self.device, self.model), step)
            except AgentError as exc:  # the guest refused: the model stays as it was
                errno_, error = exc.errno, exc.message
            else:
                if action.settle is not None:
                    action.settle(model, step, result)
                self.model = model
                detail = action.describe(step, result)
        self.session.vm.check_alive()
        record = self._snapshot(step.index, step.action, step.proc, step.label or "", detail,
                                errno_, error, started, complaints_from)
        self.result.steps.append(record)
        return record

    def _snapshot(self, index, action, proc, label, detail, errno_, error, started,
                  complaints_from: tuple[int, int]) -> StepRecord:
        record = _snapshot(self.session, self.device, self.model, self.watched, step=index,
                           action=action, proc=proc, label=label, detail=detail, errno=errno_,
                           error=error, started=started, complaints_from=complaints_from,
                           accounting=self.result.accounting,
                           verdict_reads=self.verdict_reads)
        self._sync_events()
        return record


def run_scenario(session: Session, scenario: Scenario, *,
                 progress: Progress | None = None,
                 events: str | None = None, verdict_reads: bool = True,
                 dump_at: int | str | None = None, dump_dir: Path | None = None) -> RunResult:
    """Run every step of *scenario* in *session*'s guest, snapshot after each.
    With *dump_at* (a step, or ``"complaint"``: the first step the kernel
    complained at), write the guest's memory to *dump_dir* after that step's
    snapshot (:func:`lab.inspect.core.dump_guest_memory`).

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
    recorder = Recorder(session, device, scenario, watched, verdict_reads=verdict_reads)
    for w in scenario.watch_list:
        mode = events or w.events
        if mode:
            recorder.arm(watched[(w.map, w.page)], stacks=mode == "stacks", page=(w.map, w.page))
    stage = f"{scenario.name} on {session.kernel.name}"
    dumped = _maybe_dump(session, recorder.result.steps[0], dump_at, dump_dir, False)
    for step in scenario.steps:
        if progress:  # steps done so far, counted as steps
            progress(stage, step.index - 1, len(scenario.steps), unit="step")
        record = recorder.step(step, strict=False)
        dumped = _maybe_dump(session, record, dump_at, dump_dir, dumped)
    if progress:
        progress(stage, len(scenario.steps), len(scenario.steps), unit="step")
    recorder.disarm()
    return recorder.result


def _maybe_dump(session: Session, record: StepRecord, dump_at, dump_dir, dumped: bool) -> bool:
    """Dump the guest after *record* if ``--dump-at`` asks for it; whether a
    dump has been taken."""
    from .inspect.core import dump_due, dump_guest_memory

    if not dump_due(dump_at, record.step, len(record.complaints), dumped):
        return dumped
    dump_dir.mkdir(parents=True, exist_ok=True)
    info = dump_guest_memory(session.vm.qmp,
                             dump_dir / f"vmcore-{session.kernel.name}-step{record.step}")
    print(f"devdax-lab: step {record.step}: guest memory dumped to {info.path} "
          f"({info.size / 2**30:.2f} GiB in {info.seconds:.1f} s); read it with "
          f"`devdax-lab inspect --core {info.path} --kernel {session.kernel_spelling}`")
    return True


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


def _signal_records(received: list[dict], pids: dict[str, int]) -> list[SignalRecord]:
    """The signals the agent reported (each survived: the worker was alive
    to report it)."""
    return [SignalRecord(proc=s["proc"], pid=pids.get(s["proc"]), signal=s["signal"],
                         code=s["code"], addr=s["addr"] if s["code"] > 0 else None,
                         addr_lsb=s["addr_lsb"] or None, survived=True, during=s["cmd"],
                         sender=s["sender"] or None)
            for s in received]


def _deaths(guest: GuestModel, exited: list[dict], step: int
            ) -> tuple[list[SignalRecord], list[tuple[str, str]]]:
    """Processes the model thinks alive that the agent saw end (the kernel
    killed them, or they exited by themselves): marked exited at *step* in
    *guest* with the reason, so that later steps using them fail their
    check in one line."""
    signals, ended = [], []
    for dead in exited:
        proc = guest.procs.get(dead["name"])
        if proc is None or proc.exited_at is not None:
            continue  # an exit step the model already applied, or not the model's
        if dead["signal"] is not None:
            reason = describe_signal(dead["signal"], None, None, survived=False)
            signals.append(SignalRecord(proc=dead["name"], pid=dead["pid"], signal=dead["signal"],
                                        code=None, addr=None, addr_lsb=None, survived=False))
        elif dead["status"] is not None:
            reason = f"exited by itself with status {dead['status']}"
        else:
            reason = "ended, how is unknown"
        guest.end_process(dead["name"], step, reason)
        ended.append((dead["name"], reason))
    return signals, ended


def _processes(prog, pids: dict[str, int]) -> list[ProcessRecord]:
    """The RSS counters of every live worker (guest stopped)."""
    out = []
    for name, pid in sorted(pids.items()):
        try:
            rss = inspect.mm_rss(prog, pid)
        except inspect.InspectError:
            out.append(ProcessRecord(name, pid, None, None, None))
            continue
        out.append(ProcessRecord(name, pid, rss.file, rss.anon, rss.shmem))
    return out


def _held_pfns(guest: GuestModel, first_pfn: int) -> dict[str, list[range]]:
    """The PFN ranges held by each live pin ("pin") and pipe ("splice")
    (device-dax maps device offset X at the device's start + X)."""
    out: dict[str, list[range]] = {"pin": [], "splice": []}
    for h in guest.handles.values():
        if h.released_at is not None or h.guest_id is None:
            continue
        base = first_pfn + guest.maps[h.map].offset // PAGE + h.first
        out[h.kind].append(range(base, base + h.pages))
    return out


def _holds(held: dict[str, list[range]], pfn: int, folio: range, large: bool) -> dict:
    """What holds *pfn* and its folio: (pins of the page, pins of the folio,
    pipe references of the folio). A pin counts once per large folio it
    covers: io_uring keeps one pin per folio of a registered buffer
    (io_coalesce_buffer, io_uring/rsrc.c; measured on 6.12 and 7.2: two pins
    of one 2M folio give _pincount 2 and two references); a pipe holds a
    reference per page (iter_to_pipe -> get_user_pages_fast)."""
    pins = sum(pfn in r for r in held["pin"])
    if large:
        folio_pins = sum(1 for r in held["pin"] if r.start < folio.stop and folio.start < r.stop)
    else:
        folio_pins = pins
    pipes = sum(max(0, min(r.stop, folio.stop) - max(r.start, folio.start))
                for r in held["splice"])
    return {"pins": pins, "folio_pins": folio_pins, "folio_pipe_refs": pipes}


def _snapshot(session: Session, device: dict, guest: GuestModel, watched: dict, *, step: int,
              action: str, proc: str | None, label: str, detail: str, errno: int | None,
              error: str | None, started: float, complaints_from: tuple[int, int],
              accounting: list | None = None, verdict_reads: bool = True) -> StepRecord:
    prog = session.prog
    agent = session.agent
    # Signals come with each worker's answers; a live worker is asked for
    # what arrived since (between requests). Then which workers ended, and
    # how: the model learns of deaths before anything reads their pages.
    pids, exited = agent.proc_table()
    for name in sorted(pids):
        if name in guest.procs and guest.procs[name].exited_at is None:
            agent.signals(name)
    signals = _signal_records(agent.take_signals(), pids)
    killed, ended = _deaths(guest, exited, step)
    signals += killed
    # Where each watched page is mapped, per process (pagemap asked first:
    # the agent's answer comes from the running guest).
    holders: dict[tuple[str, int], list[tuple[str, int]]] = {}
    for proc_name, view in guest.live_views():
        for map_name, page in watched:
            if map_name == view.spec.name and view.addr is not None and view.mapped(page):
                holders.setdefault((map_name, page), []).append(
                    (proc_name, view.addr + page * PAGE))
    pages: list[PageRecord] = []
    with session.stopped():
        rss_started = time.monotonic()
        processes = _processes(prog, pids) if verdict_reads else []
        rss_seconds = time.monotonic() - rss_started
        if session.armed_watcher is not None and accounting is not None:
            # events from here on are counted, and named, for the next step
            accounting.extend(session.armed_watcher.reconcile(next_step=step + 1))
        first = device["start"] // PAGE
        held = _held_pfns(guest, first) if verdict_reads else {"pin": [], "splice": []}
        bulk = inspect.read_pages(prog, first, device["size"] // PAGE)
        pgmap = inspect.pgmap_state(prog, inspect.find_dev_pagemap(prog, first))
        for (map_name, page), pfn in sorted(watched.items()):
            folio = inspect.folio_state(prog, pfn)
            holds = _holds(held, pfn, range(folio.folio_pfn, folio.folio_pfn + (1 << folio.order)),
                           folio.order > 0)
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
                                        **holds,
                                        pinned=guest.holds("pin", map_name, page),
                                        in_pipe=guest.holds("splice", map_name, page)))
    if device["align"] < PUD_SIZE:
        pages = _with_pagemap(session, pages)
    session.vm.sync_console()  # every line the step made the kernel print is in
    complaints = tuple((c.kind, c.text) for _, c in session.vm.complaints[complaints_from[0]:])
    messages = tuple((m.kind, m.text) for _, m in session.vm.mm_messages[complaints_from[1]:])
    return StepRecord(step=step, action=action, proc=proc, label=label, detail=detail, errno=errno,
                      error=error, seconds=time.monotonic() - started, pages=tuple(pages),
                      pgmap=pgmap, device_refcount=bulk.refcount, device_mapcount=bulk.mapcount,
                      complaints=complaints, kernel_messages=messages, signals=tuple(signals),
                      exited=tuple(ended), processes=tuple(processes), rss_seconds=rss_seconds)
