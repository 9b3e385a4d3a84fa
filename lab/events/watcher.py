"""The one owner of a guest's gdbstub connection: write watchpoints on the
counters of watched folios, one event per change, and the lab's own stops.

Stops and the gdbstub: while a gdb client is attached, QEMU reports every
stop of the guest to it, and a watchpoint hit leaves the guest stopped until
the client continues. So once a watch is armed, the lab's consistent
snapshots stop the guest through the gdbstub too (``\\x03``, answered by a
``T02`` stop) instead of QMP ``stop``: a stop the lab asked for is then never
mistaken for a hit, and a hit is never left waiting behind a snapshot.

A thread waits for stop replies while the guest runs. At a hit it reads the
registers and the folio's counters, notes who ran (task on that CPU) and,
for watches that want it, the kernel stack (drgn), then continues the guest.
Every other conversation with the stub happens while that thread is parked
in a stop the lab asked for (:meth:`Watcher.paused`).

Accounting: each watched counter's value is known when it is armed and
after every event; :meth:`Watcher.reconcile`, called while stopped, reads
each counter again and records any difference as a ``lost`` event, so
nothing the watchpoints missed is hidden.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import drgn

from .. import inspect
from ..inspect.stack import Frame, code_location, kernel_stack, task_on_cpu
from ..model import Event, UserError
from ..vm import VmError
from .rsp import GdbRemote, RspError, RspRefused, RspTimeout, StopReply

__all__ = ["Counter", "Event", "EventsError", "Watcher"]


RIP = 16  # gdb's x86-64 register number of rip


class EventsError(VmError):
    """The gdbstub did not answer, refused, or the hit thread failed; the
    watches are gone and the guest was left running."""


@dataclass
class Counter:
    """One watched counter of one folio."""

    folio_pfn: int
    order: int
    name: str  # refcount, mapcount, large_mapcount, entire_mapcount, ...
    address: int
    size: int
    stacks: bool
    value: int  # last known value (after the last event)
    checked: int  # value at the last accounting (reconcile), or when armed
    recorded: int = 0  # sum of write events' deltas since then


@dataclass
class _Stats:
    hits: int = 0
    silent_writes: int = 0  # a write that left the value as it was
    handling_seconds: float = 0.0
    stack_seconds: float = 0.0
    stacks: int = 0
    pauses: int = 0


def _signed(raw: bytes) -> int:
    return int.from_bytes(raw, "little", signed=True)


class Watcher:
    """Watchpoints on folio counters of one guest, through its gdbstub."""

    def __init__(self, socket_path: Path, prog: drgn.Program, *, timeout: float = 10.0,
                 record: bool = False):
        self.prog = prog
        self.timeout = timeout
        self._path = socket_path
        self._record_bytes = record
        self._rsp: GdbRemote | None = None
        self.counters: dict[int, Counter] = {}  # by address
        self.events: list[Event] = []
        self.step = 0
        self.stats = _Stats()
        self._locations: dict[int, tuple[Frame, ...]] = {}  # pc -> code_location(pc - 1)
        self._lock = threading.Lock()  # the lab's \x03 against the thread's "c" and "D"
        self._parked = threading.Event()
        self._resume = threading.Event()
        self._thread: threading.Thread | None = None
        self._reset_connection_state()

    def _reset_connection_state(self) -> None:
        """What belongs to one connection (a new one starts clean)."""
        self.error: str | None = None  # what went wrong in the hit thread
        self._pause_wanted = False
        self._closing = False
        self._paused_depth = 0
        self._p_works = True  # the stub answers 'p' (one register)
        self._released = False  # the hit thread already let go (after an error)
        self._parked.clear()
        self._resume.clear()

    # -- connection ------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._rsp is not None

    @property
    def transcript(self):
        return self._rsp.transcript if self._rsp else None

    def _connect(self) -> None:
        """Attach (which stops the guest), then park the hit thread there."""
        self._reset_connection_state()
        try:
            rsp = GdbRemote.connect(self._path, timeout=self.timeout, record=self._record_bytes)
        except RspError as exc:
            raise EventsError(f"{exc}; is the VM booted with events on "
                              f"(Session.boot(events=True))?") from exc
        try:
            rsp.start()
        except RspError as exc:
            self._let_go(rsp, stopped=True)  # connecting stopped the guest
            raise EventsError(f"the gdbstub did not answer ({exc})") from exc
        self._rsp = rsp
        self._pause_wanted = True
        self._parked.set()
        self._paused_depth = 1
        self._thread = threading.Thread(target=self._loop, args=(rsp,), name="devdax-lab-watcher",
                                        daemon=True)
        self._thread.start()

    def _let_go(self, rsp: GdbRemote, *, stopped: bool) -> None:
        """Leave the guest running with no watchpoint: ``D`` (QEMU removes
        them all and continues), after stopping a guest that may run (a
        running QEMU takes any byte for an interrupt, so a ``D`` sent then is
        lost). If that fails, a new connection sends the ``D`` (QEMU serves
        one client; connecting stops the guest): closing a socket alone
        would leave the watchpoints armed, and the next hit would stop the
        guest with nobody to continue it."""
        try:
            if not stopped:
                rsp.interrupt()
                rsp.wait_stop(timeout=self.timeout)
            rsp.detach()
            rsp.close()
            return
        except (RspError, OSError):
            rsp.close()
        try:
            fresh = GdbRemote.connect(self._path, timeout=self.timeout)
            try:
                fresh.start()
                fresh.detach()
            finally:
                fresh.close()
        except RspError as exc:
            self.error = (self.error or "") + f"; the guest may be left stopped ({exc})"

    # -- stops the lab asks for -------------------------------------------------
    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The guest stopped, through the gdbstub (nestable)."""
        if self._rsp is None:
            self._connect()  # connecting stops the guest
        else:
            self._pause()
        try:
            yield
        finally:
            self._unpause()

    def _pause(self) -> None:
        self._paused_depth += 1
        if self._paused_depth > 1:
            return
        with self._lock:  # the hit thread lets go under it too
            self._pause_wanted = True
            if not self._released:
                try:
                    self._rsp.interrupt()
                except RspError as exc:
                    self.error = self.error or str(exc)
        if not self._parked.wait(self.timeout) or self.error:
            self._fail(self.error or f"no stop reply within {self.timeout:.0f} s")
        self.stats.pauses += 1

    def _fail(self, reason: str) -> None:
        """Let go of the stub and say why (the events so far are kept)."""
        self._detach()
        raise EventsError(f"watching stopped: {reason}; the watches are removed and the guest "
                          f"runs (events so far are kept)")

    def _unpause(self) -> None:
        self._paused_depth -= 1
        if self._paused_depth > 0:
            return
        if not self.counters:  # nothing watched: let go of the stub altogether
            self._detach()
            return
        with self._lock:
            self._pause_wanted = False
            self._parked.clear()
            self._resume.set()

    def _talk(self, what: str, fn, *args):
        """A request while stopped; a stub that fails or does not answer ends
        the watching (one clear error, the guest left running)."""
        try:
            return fn(*args)
        except RspError as exc:
            self._paused_depth = 0
            self._fail(f"{what}: {exc}")

    # -- the hit thread ----------------------------------------------------------
    def _loop(self, rsp: GdbRemote) -> None:
        """Wait for stops while the guest runs; park in the ones the lab asked for."""
        stopped = True  # connecting stopped the guest
        try:
            while self._wait_resume():
                with self._lock:
                    if self._pause_wanted:  # asked again before the guest ran
                        self._parked.set()
                        continue
                    rsp.cont()  # under the lock: a \x03 can only come after it
                    stopped = False
                while True:
                    try:
                        stop = rsp.wait_stop(timeout=0.5)
                    except RspTimeout:
                        if self._closing:
                            return
                        continue
                    stopped = True
                    if stop.exited:
                        self.error = "the guest exited"
                        self._released = True
                        self._parked.set()
                        return
                    if stop.watch is not None:
                        self._hit(rsp, stop)
                    with self._lock:
                        if self._pause_wanted:
                            # our \x03, or a hit that raced with it (QEMU then
                            # ignores the \x03: the guest is already stopped)
                            self._parked.set()
                            break
                        rsp.cont()
                        stopped = False
        except Exception as exc:  # noqa: BLE001 - never leave the guest stopped
            self.error = f"{type(exc).__name__}: {exc}"
            with self._lock:
                self._let_go(rsp, stopped=stopped)
                self._released = True
            self._parked.set()

    def _wait_resume(self) -> bool:
        """Parked: wait until the lab lets the guest go (False: closing)."""
        self._resume.wait()
        self._resume.clear()
        return not self._closing

    def _hit(self, rsp: GdbRemote, stop: StopReply) -> None:
        t0 = time.perf_counter()
        self.stats.hits += 1
        hit = self.counters.get(stop.watch)
        if hit is None:
            return
        prog = self.prog
        if prog is None:
            raise EventsError("drgn was detached while watching (Session.detach)")
        group = [c for c in self.counters.values() if c.folio_pfn == hit.folio_pfn]
        wants_stack = any(c.stacks for c in group)
        # all registers only to unwind a stack; else just rip (a short reply)
        pc = None
        regs = rsp.read_registers() if wants_stack or not self._p_works else None
        if regs is None:
            pc = rsp.read_register(RIP)
            if pc is None:
                self._p_works = False
        if pc is None:
            regs = regs or rsp.read_registers()
            pc = regs["rip"]
        # Every counter of the hit's folio is read again: one write can cover
        # two counters (a struct page initialised as a whole), and a
        # watchpoint reports only the first it matches.
        lo = min(c.address for c in group)
        hi = max(c.address + c.size for c in group)
        raw = rsp.read_memory(lo, hi - lo)
        changed = []
        for c in group:
            new = _signed(raw[c.address - lo:c.address - lo + c.size])
            if new == c.value:
                continue
            if c is hit:
                changed.append((c, c.value, new))
                c.recorded += new - c.value
            else:
                # Not this watchpoint's counter: an earlier write whose own hit
                # was not reported (QEMU reports one watchpoint per stop). Who
                # made it is unknown: it is recorded as lost, not given this
                # writer's name.
                self._note(c, "lost", new)
            c.value = new
        if not changed:
            self.stats.silent_writes += 1
            self.stats.handling_seconds += time.perf_counter() - t0
            return
        comm, pid = task_on_cpu(prog, stop.cpu or 0)
        location = self._locations.get(pc)
        if location is None:  # the same few writers hit again and again
            location = self._locations[pc] = code_location(prog, pc - 1)
        stack = None
        if regs is not None and any(c.stacks for c, _, _ in changed):
            t1 = time.perf_counter()
            stack = kernel_stack(prog, regs, pc - 1)
            self.stats.stack_seconds += time.perf_counter() - t1
            self.stats.stacks += 1
        seconds = time.perf_counter() - t0
        self.stats.handling_seconds += seconds
        for c, old, new in changed:
            self.events.append(Event(
                seq=len(self.events), step=self.step, kind="write", folio_pfn=c.folio_pfn,
                field=c.name, old=old, new=new, cpu=stop.cpu, comm=comm, pid=pid, pc=pc,
                location=location, stack=stack if c.stacks else None, seconds=seconds))

    # -- watches -------------------------------------------------------------------
    def watch(self, pfn: int, *, stacks: bool = False) -> list[Counter]:
        """Arm write watchpoints on the counters of the folio holding *pfn*
        (addresses and widths from the running kernel's types, read while
        the guest is stopped: drgn is not used from two threads at once)."""
        armed: list[Counter] = []
        with self.paused():
            try:
                head, order, fields = inspect.folio_counters(self.prog, pfn)
            except inspect.InspectError as exc:
                raise UserError(str(exc)) from exc
            new: list[Counter] = []
            for name, address, size in fields:
                if address in self.counters:
                    self.counters[address].stacks |= stacks
                    armed.append(self.counters[address])
                    continue
                value = _signed(self._talk("read", self._rsp.read_memory, address, size))
                try:
                    self._rsp.insert_watchpoint(address, size)
                except RspError as exc:  # none of this folio's new ones stay armed
                    for c in new:
                        self._talk("remove", self._rsp.remove_watchpoint, c.address, c.size)
                        del self.counters[c.address]
                    raise EventsError(f"cannot watch {name} of PFN {pfn:#x}: {exc}") from exc
                c = Counter(folio_pfn=head, order=order, name=name, address=address, size=size,
                            stacks=stacks, value=value, checked=value)
                self.counters[address] = c
                new.append(c)
                armed.append(c)
        return armed

    def unwatch(self, pfn: int | None = None) -> None:
        """Remove the watchpoints of the folio holding *pfn* (all with None).
        The guest keeps running; with nothing left, the stub is let go."""
        if self._rsp is None:
            return
        with self.paused():
            heads = {c.folio_pfn for c in self.counters.values()}
            if pfn is not None:
                heads = {c.folio_pfn for c in self.counters.values()
                         if c.folio_pfn <= pfn < c.folio_pfn + (1 << c.order)}
            for address, c in list(self.counters.items()):
                if c.folio_pfn in heads:
                    self._talk("remove", self._rsp.remove_watchpoint, address, c.size)
                    del self.counters[address]

    def reconcile(self, next_step: int | None = None) -> list[dict]:
        """While stopped: the accounting of every watched counter since the
        last call. Each row: ``start`` (value then), ``recorded`` (sum of the
        events' deltas), ``read`` (value now) and ``lost`` (read - start -
        recorded). A non-zero ``lost`` also becomes a ``lost`` event, so what
        the watchpoints missed is never hidden. From then on, events are
        counted for *next_step* (so that an event and the accounting row
        that counts it always name the same step)."""
        rows: list[dict] = []
        if self._rsp is None or not self.counters:
            return rows
        with self.paused():
            for address, c in list(self.counters.items()):
                try:
                    now = _signed(self._rsp.read_memory(c.address, c.size))
                except RspRefused:
                    # The struct page is gone (its memmap was removed with
                    # the device): recorded, and the watch dropped.
                    rows.append({"step": self.step, "folio_pfn": c.folio_pfn, "field": c.name,
                                 "start": c.checked, "recorded": c.recorded, "read": None,
                                 "lost": None})
                    self._note(c, "gone", None)
                    self._talk("remove", self._rsp.remove_watchpoint, address, c.size)
                    del self.counters[address]
                    continue
                except RspError as exc:
                    self._paused_depth = 0
                    self._fail(f"reading {c.name}: {exc}")
                rows.append({"step": self.step, "folio_pfn": c.folio_pfn, "field": c.name,
                             "start": c.checked, "recorded": c.recorded, "read": now,
                             "lost": now - c.checked - c.recorded})
                if now != c.value:  # a change no hit reported, found only now
                    self._note(c, "lost", now)
                c.value = c.checked = now
                c.recorded = 0
            if next_step is not None:
                self.step = next_step
        return rows

    def _note(self, c: Counter, kind: str, now: int | None) -> None:
        """An event no hit reported: a ``lost`` change, or the counter
        ``gone`` (new is None)."""
        self.events.append(Event(
            seq=len(self.events), step=self.step, kind=kind, folio_pfn=c.folio_pfn,
            field=c.name, old=c.value, new=now, cpu=None, comm=None, pid=None, pc=None,
            location=(), stack=None, seconds=0.0))

    # -- the end -------------------------------------------------------------------
    def _detach(self) -> None:
        """Let go of the stub and end the hit thread; the guest runs."""
        rsp, self._rsp = self._rsp, None
        self._closing = True
        self._resume.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout + 1)
            self._thread = None
        if rsp is not None:
            if self._released:
                rsp.close()
            else:
                self._let_go(rsp, stopped=self._parked.is_set())
        self.counters.clear()
        error = self.error
        self._reset_connection_state()
        self.error = error  # kept to be read; a new connection starts clean

    def close(self) -> None:
        """Remove every watch and leave the guest running."""
        if self._rsp is None:
            return
        if not self._parked.is_set():
            with contextlib.suppress(EventsError):
                self._pause()
        if self._rsp is not None:
            self._detach()
