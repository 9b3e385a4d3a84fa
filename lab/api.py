"""The notebook API: one method per action, each a step with a snapshot after
it, appended to ``lab.timeline``.

    from lab import Lab
    with Lab.boot("after") as lab:
        m = lab.mmap("4K", length="64K")
        lab.touch(m, pages=[0], write=True)
        lab.timeline        # one row per (step, watched page, process)
        lab.plot()          # refcount and mapcount per step

``Lab.open(DIR)`` reopens the output of ``devdax-lab run``/``compare`` (or of
``Lab.save``) with no VM, for reading, plotting and the panel's charts.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import pandas as pd

from . import timeline as tl
from .model import DEFAULT_DAX, PUD_LAYOUT, UserError, format_size, parse_size
from .scenario import MADVISE, Step

__all__ = ["Lab", "Mapping", "Pin", "Pipe"]

PAGE = 4096


@dataclass(frozen=True)
class Mapping:
    """A device-dax mapping in a guest process."""

    name: str
    proc: str
    device: str
    addr: int
    length: int

    @property
    def pages(self) -> int:
        return self.length // PAGE


@dataclass(frozen=True)
class Pin:
    name: str
    proc: str
    map: str


@dataclass(frozen=True)
class Pipe:
    name: str
    proc: str
    map: str


def _pages(pages: int | Iterable[int | str], npages: int, name: str) -> tuple[int, ...]:
    """Page indices from ints and "A-B" ranges, checked against the mapping."""
    if isinstance(pages, (int, str)):
        pages = [pages]
    out: set[int] = set()
    for p in pages:
        if isinstance(p, str) and "-" in p:
            lo, hi = (int(x) for x in p.split("-", 1))
            out.update(range(lo, hi + 1))
        else:
            out.add(int(p))
    bad = sorted(p for p in out if not 0 <= p < npages)
    if bad:
        raise UserError(f"page {bad[0]} is outside mapping {name!r} ({npages} pages: 0-{npages - 1})")
    return tuple(sorted(out))


def _span(m: Mapping, offset: int | str, length: int | str | None, cap: int | None = None) -> dict:
    """{"offset", "length"} in bytes within *m*; the rest of it by default."""
    offset = parse_size(offset)
    if length is None:
        length = min(m.length - offset, cap) if cap else m.length - offset
    return {"offset": offset, "length": parse_size(length)}


class Lab:
    """A booted kernel driven step by step (or a saved run, read-only)."""

    def __init__(self, *, session=None, recorder=None, frames: dict | None = None,
                 meta: dict | None = None):
        self._session = session
        self._recorder = recorder
        self._frames = frames  # for a reopened run
        self.meta = meta or {}
        self._names = itertools.count(1)
        self._maps: dict[str, Mapping] = {}
        self._index = 0
        self._device_name: str | None = None

    # -- opening -------------------------------------------------------------
    @classmethod
    def boot(cls, kernel: str = "after", *, pud: bool = False, events: bool = False, say=print,
             progress=None) -> Lab:
        """Boot *kernel* (``before``, ``after``...) with a 4K and a 2M device
        (and a 1G one with *pud*) and attach drgn. With *events*, QEMU serves
        a gdbstub so that :meth:`watch` can record every counter change."""
        from .session import Session

        session = Session.boot(kernel, dax=PUD_LAYOUT if pud else DEFAULT_DAX, say=say,
                               progress=progress, events=events)
        return cls(session=session)

    @classmethod
    def open(cls, directory: str | Path) -> Lab:
        """A saved run (``timeline.parquet`` and friends) with no VM."""
        import json

        d = Path(directory)
        if not (d / "timeline.parquet").exists():
            raise UserError(f"{d} holds no timeline.parquet (the output of `devdax-lab run`)")
        frames = {p.stem: pd.read_parquet(p) for p in sorted(d.glob("*.parquet"))}
        meta = json.loads((d / "meta.json").read_text()) if (d / "meta.json").exists() else {}
        return cls(frames=frames, meta=meta)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the VM (nothing to do for a reopened run)."""
        if self._session is not None:
            self._session.close()
            self._session = None

    @property
    def live(self) -> bool:
        return self._session is not None

    @property
    def kernel(self) -> str:
        if self._session is not None:
            return self._session.kernel.name
        return ",".join(self.meta.get("kernels", {})) or "saved run"

    @property
    def release(self) -> str:
        return self._session.vm.release if self._session else ""

    def _need_live(self) -> None:
        if self._session is None:
            raise UserError("this Lab is a saved run (Lab.open): boot one with Lab.boot() to take steps")

    # -- steps -----------------------------------------------------------------
    def _run(self, action: str, proc: str | None, args: dict, label: str | None = None):
        self._need_live()
        if self._recorder is None:
            if self._device_name is None:
                raise UserError("map a device first: lab.mmap(\"4K\", length=\"64K\")")
            from .runner import Recorder

            self._recorder = Recorder(self._session, self._device(self._device_name))
        self._index += 1
        step = Step(self._index, action, proc, MappingProxyType(args), label)
        for map_name, page in step.pages_touched:
            self._recorder.watch(map_name, page)
        return self._recorder.step(step)

    def _device(self, device: str) -> dict:
        self._need_live()
        d = next((x for x in self._session.vm.devices if x["name"] == device), None)
        return d or self._session.vm.device(device)

    def mmap(self, device: str = "4K", length: int | str = "64K", *, proc: str = "a",
             offset: int | str = 0, name: str | None = None, label: str | None = None) -> Mapping:
        """Map *length* of a device (by alignment "4K"/"2M"/"1G" or name) in *proc*."""
        dev = self._device(device)
        if self._device_name is None:
            self._device_name = dev["name"]
        elif dev["name"] != self._device_name:
            raise UserError(f"this Lab follows {self._device_name}; one device per Lab")
        length, offset = parse_size(length), parse_size(offset)
        if length <= 0 or length % dev["align"] or offset % dev["align"]:
            raise UserError(f"length and offset must be multiples of {format_size(dev['align'])} "
                            f"on {dev['name']}")
        if offset + length > dev["size"]:
            raise UserError(f"{format_size(offset + length)} is beyond {dev['name']} "
                            f"({format_size(dev['size'])})")
        name = name or f"m{next(self._names)}"
        if name in self._maps:
            raise UserError(f"a mapping is already named {name!r}")
        record = self._run("mmap", proc, {"name": name, "length": length, "offset": offset,
                                          "write": True, "shared": True}, label)
        self._raise_on_error(record)
        m = self._recorder.mapping(proc, name)
        mapping = Mapping(name, proc, dev["name"], m.addr, m.length)
        self._maps[name] = mapping
        return mapping

    def touch(self, m: Mapping, pages: int | Sequence[int | str] = (0,), *, write: bool = True,
              proc: str | None = None, label: str | None = None):
        """Fault in *pages* (4K page indices within the mapping) by reading or writing one byte."""
        pages = _pages(pages, m.pages, m.name)
        return self._checked("touch", proc or m.proc, {"map": m.name, "pages": pages,
                                                       "write": write}, label)

    def fork(self, proc: str = "a", child: str = "b", *, label: str | None = None):
        """Fork *proc*; the child inherits its mappings."""
        return self._checked("fork", proc, {"child": child}, label)

    def munmap(self, m: Mapping, *, offset: int | str = 0, length: int | str | None = None,
               proc: str | None = None, label: str | None = None):
        """Unmap all of *m*, or *length* at *offset* within it."""
        return self._checked("munmap", proc or m.proc, {"map": m.name, **_span(m, offset, length)},
                             label)

    def exit(self, proc: str, *, label: str | None = None):
        """End guest process *proc* (its mappings go with it)."""
        return self._checked("exit", proc, {}, label)

    def pin(self, m: Mapping, *, offset: int | str = 0, length: int | str | None = None,
            proc: str | None = None, name: str | None = None, label: str | None = None) -> Pin:
        """Take a long-term pin (io_uring registered buffer) on a range of *m*."""
        name, proc = name or f"pin{next(self._names)}", proc or m.proc
        self._checked("pin", proc, {"map": m.name, "name": name, **_span(m, offset, length)}, label)
        return Pin(name, proc, m.name)

    def unpin(self, pin: Pin, *, label: str | None = None):
        return self._checked("unpin", pin.proc, {"pin": pin.name, "map": pin.map}, label)

    def splice(self, m: Mapping, *, offset: int | str = 0, length: int | str | None = None,
               proc: str | None = None, name: str | None = None, label: str | None = None) -> Pipe:
        """vmsplice a range of *m* into a pipe: transient references until drained
        (at most 1 MiB: what one pipe holds)."""
        name, proc = name or f"pipe{next(self._names)}", proc or m.proc
        span = _span(m, offset, length, cap=1 << 20)
        self._checked("splice", proc, {"map": m.name, "name": name, **span}, label)
        return Pipe(name, proc, m.name)

    def drain(self, pipe: Pipe, *, label: str | None = None):
        return self._checked("drain", pipe.proc, {"splice": pipe.name, "map": pipe.map}, label)

    def madvise(self, m: Mapping, advice: str, *, offset: int | str = 0,
                length: int | str | None = None, label: str | None = None):
        """madvise by name (DONTNEED, HUGEPAGE, ...); a refusal is recorded, not raised."""
        key = advice.upper().removeprefix("MADV_")
        if key not in MADVISE:
            raise UserError(f"unknown advice {advice!r} (known: {', '.join(MADVISE)})")
        return self._run("madvise", m.proc, {"map": m.name, "advice": key,
                                             "advice_value": MADVISE[key],
                                             **_span(m, offset, length)}, label)

    # -- events ----------------------------------------------------------------
    def _pfn_of(self, target: Mapping | int, page: int) -> tuple[int, tuple[str, int] | None]:
        if isinstance(target, Mapping):
            (page,) = _pages(page, target.pages, target.name)
            dev = self._device(target.device)
            offset = self._recorder.mapping(target.proc, target.name).offset
            return (dev["start"] + offset) // PAGE + page, (target.name, page)
        return int(target), None

    def watch(self, target: Mapping | int, page: int = 0, *, stacks: bool = False) -> None:
        """From now on, record every change of the counters (refcount,
        mapcount; large-folio mapcounts and pincount) of the folio holding
        page *page* of mapping *target*, or PFN *target*: ``lab.events``.
        *stacks* adds each writer's kernel stack (about 15x the cost a hit).
        Needs ``Lab.boot(..., events=True)``."""
        self._need_live()
        if self._recorder is None:
            raise UserError("map a device first: lab.mmap(\"4K\", length=\"64K\")")
        pfn, where = self._pfn_of(target, page)
        if where is not None:
            self._recorder.watch(*where)  # and follow the page in the timeline
        self._recorder.arm(pfn, stacks=stacks, page=where)

    def unwatch(self, target: Mapping | int | None = None, page: int = 0) -> None:
        """Stop recording the folio of *target* (every folio with None); the
        guest keeps running."""
        if self._recorder is None:
            return
        self._recorder.disarm(None if target is None else self._pfn_of(target, page)[0])

    @property
    def events(self) -> pd.DataFrame:
        """Every recorded change of a watched counter: `lab.timeline.df_events`."""
        return self.frame("events")

    @property
    def accounting(self) -> pd.DataFrame:
        """Per step and watched counter: start + recorded deltas vs the value read."""
        return self.frame("accounting")

    def call_paths(self) -> pd.DataFrame:
        """The distinct call paths that changed the counters, with counts."""
        return self.frame("call_paths")

    def plot_events(self):
        """A waterfall of every recorded change, by step, with the writers."""
        from .plots import plot_events

        return plot_events(self.events, self.steps)

    def snapshot(self, label: str = "snapshot"):
        """A snapshot with no action."""
        return self._run("snapshot", None, {}, label)

    # -- reads that are not steps ------------------------------------------------
    def rss(self, proc: str = "a") -> dict[str, int]:
        """RssFile, RssAnon and RssShmem of guest process *proc* in KiB, as
        /proc/PID/status shows them, read from its mm_struct with drgn while
        the guest is stopped (the mapping inserts add to MM_FILEPAGES on
        kernels that count device-dax mappings: docs/glossary.md)."""
        from .inspect.rss import mm_rss

        self._need_live()
        pid = self._session.pid(proc)
        with self._session.stopped():
            r = mm_rss(self._session.prog, pid)
        return {"RssFile": r.file * 4, "RssAnon": r.anon * 4, "RssShmem": r.shmem * 4}

    def vma(self, m: Mapping, *, proc: str | None = None):
        """The VMA behind *m* in *proc* (default its owner): start, end, vm_flags
        and their names (VM_HUGEPAGE, VM_NOHUGEPAGE, VM_MIXEDMAP...)."""
        from .inspect import vma_state

        self._need_live()
        pid = self._session.pid(proc or m.proc)
        with self._session.stopped():
            return vma_state(self._session.prog, pid, m.addr)

    def read_pagemap(self, m: Mapping, pages: int | Sequence[int | str] = (0,), *,
                     proc: str | None = None, label: str | None = None) -> list[dict]:
        """Read /proc/PID/pagemap for *pages* of *m* in the guest, the way a
        tool would, then take a snapshot step: the read is not neutral (over a
        PUD-mapped device-dax range the page walk splits, that is zaps, the
        PUD; docs/glossary.md). Returns the agent's entries (addr, present, pfn)."""
        self._need_live()
        pages = _pages(pages, m.pages, m.name)
        entries = self._session.agent.pagemap(proc or m.proc, [m.addr + p * PAGE for p in pages])
        self.snapshot(label or f"after reading pagemap of {m.name} pages {list(pages)}")
        return entries

    def _checked(self, action: str, proc: str | None, args: dict, label: str | None):
        record = self._run(action, proc, args, label)
        self._raise_on_error(record)
        return record

    @staticmethod
    def _raise_on_error(record) -> None:
        if record.errno is not None:
            raise UserError(f"step {record.step} ({record.action}) failed: {record.error} "
                            f"(errno {record.errno}); it is recorded in the timeline")

    # -- data ------------------------------------------------------------------
    def _runs(self) -> list:
        return [self._recorder.result] if self._recorder else []

    def frame(self, name: str) -> pd.DataFrame:
        """One of timeline, steps, device, device_pages, complaints (see lab.timeline)."""
        if self._frames is not None:
            return self._frames.get(name, pd.DataFrame())
        runs = self._runs()
        builders = {"timeline": tl.df_timeline, "steps": tl.df_steps, "device": tl.df_device,
                    "device_pages": tl.df_device_pages, "complaints": tl.df_complaints,
                    "events": tl.df_events, "accounting": tl.df_accounting,
                    "call_paths": lambda r: tl.df_call_paths(tl.df_events(r))}
        if name not in builders:
            raise UserError(f"no frame {name!r} (have: {', '.join(builders)})")
        if not runs and name not in ("events", "accounting", "call_paths"):
            # the older builders need at least one run; the event ones give
            # their own empty, typed frame
            return pd.DataFrame(columns=list(tl.TIMELINE_COLUMNS))
        return builders[name](runs)

    @property
    def timeline(self) -> pd.DataFrame:
        """One row per (kernel, step, watched page, process): `lab.timeline.df_timeline`."""
        return self.frame("timeline")

    @property
    def steps(self) -> pd.DataFrame:
        return self.frame("steps")

    @property
    def complaints(self) -> pd.DataFrame:
        return self.frame("complaints")

    def current(self) -> pd.DataFrame:
        """The rows of the latest step: the folios, pgmap and page-table state now."""
        t = self.timeline
        return t[t["step"] == t["step"].max()] if len(t) else t

    def plot(self):
        """Refcount and mapcount per step of every watched folio."""
        from .plots import plot_counts

        return plot_counts(self.timeline, self.complaints)

    def panel(self):
        """The ipywidgets control panel (lab.widgets)."""
        from .widgets import LabPanel

        return LabPanel(self).widget

    def save(self, directory: str | Path) -> Path:
        """Write the frames, meta.json and report.html like `devdax-lab run`."""
        from . import report

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        names = ["timeline", "steps", "device", "device_pages", "complaints"]
        if any(r.accounting for r in self._runs()):
            names += ["events", "accounting", "call_paths"]
        frames = {n: self.frame(n) for n in names}
        meta = {"kernels": {self.kernel: {"release": self.release}},
                "scenario": {"name": "notebook session", "text": ""}, **self.meta}
        report.write_outputs(out, frames, meta)
        return report.build_report(out, title=f"notebook session on {self.kernel}", scenario_text="",
                                   meta=meta, timeline=frames["timeline"], steps=frames["steps"],
                                   device=frames["device"], device_pages=frames["device_pages"],
                                   complaints=frames["complaints"], events=frames.get("events"),
                                   accounting=frames.get("accounting"),
                                   call_paths=frames.get("call_paths"))

    @property
    def mappings(self) -> dict[str, Mapping]:
        return dict(self._maps)

    def processes(self) -> list[str]:
        """Names of the live guest processes."""
        return sorted(self._session.agent.procs()) if self._session else []
