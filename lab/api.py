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
import inspect as _inspect
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from . import timeline as tl
from .actions import REGISTRY
from .guest import PAGE_SIZE, Where, parse_pages
from .model import DEFAULT_DAX, PUD_LAYOUT, UserError

__all__ = ["Lab", "Mapping", "Pin", "Pipe"]

PAGE = PAGE_SIZE  # pages are counted in 4K units (lab.guest)


@dataclass(frozen=True)
class Mapping:
    """A device-dax mapping in a guest process (as it was when returned)."""

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


_HANDLES = (Mapping, Pin, Pipe)


def _api_value(kind: str, value: Any) -> Any:
    """A value as the notebook passes it, in the form a scenario file writes
    it: handles by name, one page as a list."""
    if isinstance(value, _HANDLES):
        return value.name
    if kind == "pages" and (isinstance(value, (int, str, tuple, range))
                            and not isinstance(value, bool)):
        return list(value) if isinstance(value, (tuple, range)) else [value]
    return value


class Lab:
    """A booted kernel driven step by step (or a saved run, read-only)."""

    def __init__(self, *, session=None, recorder=None, frames: dict | None = None,
                 meta: dict | None = None):
        self._session = session
        self._recorder = recorder
        self._frames = frames  # for a reopened run
        self.meta = meta or {}
        self._names = itertools.count(1)

    # -- opening -------------------------------------------------------------
    @classmethod
    def boot(cls, kernel: str = "after", *, pud: bool = False, events: bool = False, say=print,
             progress=None, cold: bool = False) -> Lab:
        """Boot *kernel* (``before``, ``after``...) with a 4K and a 2M device
        (and a 1G one with *pud*) and attach drgn. With *events*, QEMU serves
        a gdbstub so that :meth:`watch` can record every counter change. The
        guest starts from its saved post-boot state (made on first use)
        unless *cold*. Downloads, builds and the boot itself show as
        progress bars (a widget in a notebook) unless *progress* is given
        (``lab.progress.silent`` for none)."""
        from .progress import bars
        from .session import Session

        session = Session.boot(kernel, dax=PUD_LAYOUT if pud else DEFAULT_DAX, say=say,
                               progress=progress or bars(), events=events, cold=cold)
        return cls(session=session)

    @classmethod
    def open(cls, directory: str | Path) -> Lab:
        """A saved run (``timeline.parquet`` and friends) with no VM; or a
        sweep directory (``devdax-lab sweep``): its dataset as the frames
        (every cell's rows, ``kernel`` and ``scenario`` columns; ``cells``
        one summary a cell) and sweep.json as ``meta``."""
        import json

        from .sweep import SUMMARY_NAME, read_dataset, read_sweep

        d = Path(directory)
        if (d / SUMMARY_NAME).exists():
            names = sorted(p.name for p in (d / "data").iterdir()) if (d / "data").is_dir() else []
            return cls(frames={name: read_dataset(d, name) for name in names},
                       meta=read_sweep(d))
        if not (d / "timeline.parquet").exists():
            raise UserError(f"{d} holds no timeline.parquet (the output of `devdax-lab run`) nor "
                            "sweep.json (of `devdax-lab sweep`)")
        frames = {p.stem: pd.read_parquet(p) for p in sorted(d.glob("*.parquet"))}
        meta = json.loads((d / "meta.json").read_text()) if (d / "meta.json").exists() else {}
        return cls(frames=frames, meta=meta)

    @staticmethod
    def open_core(vmcore: str | Path, kernel: str = "after"):
        """A guest memory dump (:meth:`dump`, ``devdax-lab run --dump-at``)
        read with *kernel*'s debug info and the same readers, no VM: a
        :class:`lab.inspect.core.Core` (``.folio(pfn)``, ``.pgmap(pfn)``,
        ``.pte(pid, addr)``, ``.report("devdax")``, ``.prog``)."""
        from .inspect.core import Core
        from .launch import resolve_kernel

        return Core.open(vmcore, resolve_kernel(kernel).artifacts)

    def dump(self, path: str | Path):
        """Write the guest's memory (RAM and NVDIMMs) to *path* as an ELF
        vmcore with QMP ``dump-guest-memory``; open it with :meth:`open_core`
        or ``drgn -c``. Returns a :class:`lab.inspect.core.DumpInfo`."""
        from .inspect.core import dump_guest_memory

        self._need_live()
        return dump_guest_memory(self._session.vm.qmp, path)

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
    def step(self, action: str, *, label: str | None = None, **fields):
        """Take one step of any action in `lab.actions` (``lab.step("touch",
        map=m, pages=[0], write=True)``), checked against the live guest
        exactly as a scenario file's step would be, then a snapshot.

        Returns the new handle for actions that create one (mmap, pin,
        splice), else the step's record. The guest refusing a step whose
        outcome is the kernel's to decide (madvise, mprotect, mremap, mlock,
        ...) is recorded and returned; any other refusal raises UserError.
        """
        self._need_live()
        if self._recorder is None:
            raise UserError("map a device first: lab.mmap(\"4K\", length=\"64K\")")
        spec = REGISTRY.get(action)
        if spec is None:
            raise UserError(f"unknown action {action!r} (known: {', '.join(REGISTRY)})")
        kinds = {f.name: f.kind for f in spec.fields}
        raw = {k: _api_value(kinds.get(k, ""), v) for k, v in fields.items() if v is not None}
        for f in spec.fields:  # a new handle's name, made up if not given
            if f.auto and f.name not in raw:
                raw[f.name] = self._new_name(f.auto)
        where = Where(f"lab.{action}()", "")
        step = self._recorder.check(action, raw, label, where)
        for map_name, page in step.pages_touched:
            self._recorder.watch(map_name, page)
        record = self._recorder.step(step)
        if record.errno is not None and not spec.kernel_decides:
            raise UserError(f"step {record.step} ({record.action}) failed: {record.error} "
                            f"(errno {record.errno}); it is recorded in the timeline")
        if record.errno is None and spec.creates:
            return self._handle(spec.creates, step)
        return record

    def _new_name(self, prefix: str) -> str:
        while True:
            name = f"{prefix}{next(self._names)}"
            if self._recorder is None or self._recorder.model.name_taken(name) is None:
                return name

    def _handle(self, kind: str, step):
        model = self._recorder.model
        if kind == "map":
            return self.mappings[step.args["name"]]
        h = model.handles[step.args["name"]]
        return (Pin if kind == "pin" else Pipe)(step.args["name"], h.proc, h.map)

    def _device(self, device: str) -> dict:
        self._need_live()
        d = next((x for x in self._session.vm.devices if x["name"] == device), None)
        return d or self._session.vm.device(device)

    def mmap(self, device: str = "4K", length: int | str = "64K", *, proc: str = "a",
             offset: int | str = 0, name: str | None = None, write: bool = True,
             shared: bool = True, label: str | None = None) -> Mapping:
        """Map *length* of a device (by alignment "4K"/"2M"/"1G" or name) in
        *proc*. One device per Lab: the first mmap chooses it."""
        dev = self._device(device)
        if self._recorder is None:
            from .runner import Recorder

            self._recorder = Recorder(self._session, dev)
        elif dev["name"] != self._recorder.device["name"]:
            raise UserError(f"this Lab follows {self._recorder.device['name']}; one device per Lab")
        return self.step("mmap", label=label, proc=proc, name=name, length=length,
                         offset=offset, write=write, shared=shared)

    # -- events ----------------------------------------------------------------
    def _pfn_of(self, target: Mapping | int, page: int) -> tuple[int, tuple[str, int] | None]:
        if isinstance(target, Mapping):
            (page,) = parse_pages([page], target.pages, target.name,
                                  Where("lab.watch()", ""), "page")
            dev = self._device(target.device)
            offset = self._recorder.model.maps[target.name].offset
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

    def folio_mapping(self, target: Mapping | int, page: int = 0) -> dict:
        """``folio->mapping`` (hex address, None when unset) and
        ``folio->index`` of the folio holding page *page* of mapping *target*
        (or PFN *target*), read with drgn while the guest is stopped."""
        from .inspect.mapping import folio_mapping

        self._need_live()
        pfn, _where = self._pfn_of(target, page)
        with self._session.stopped():
            fm = folio_mapping(self._session.prog, pfn)
        return {"mapping": f"{fm.mapping:#x}" if fm.mapping else None, "anon": fm.anon,
                "index": fm.index}

    def read_pagemap(self, m: Mapping, pages: int | Sequence[int | str] = (0,), *,
                     proc: str | None = None, label: str | None = None) -> list[dict]:
        """Read /proc/PID/pagemap for *pages* of *m* in the guest, the way a
        tool would, then take a snapshot step: the read is not neutral (over a
        PUD-mapped device-dax range the page walk splits, that is zaps, the
        PUD; docs/glossary.md). Returns the agent's entries (addr, present, pfn)."""
        self._need_live()
        pages = parse_pages(_api_value("pages", pages), m.pages, m.name,
                            Where("lab.read_pagemap()", ""))
        entries = self._session.agent.pagemap(proc or m.proc, [m.addr + p * PAGE for p in pages])
        self.step("snapshot", label=label or f"after reading pagemap of {m.name} pages {list(pages)}")
        return entries

    # -- data ------------------------------------------------------------------
    def _runs(self) -> list:
        return [self._recorder.result] if self._recorder else []

    def frame(self, name: str) -> pd.DataFrame:
        """One of timeline, steps, device, device_pages, complaints,
        kernel_messages, signals, processes, events, accounting, call_paths
        (see lab.timeline)."""
        if self._frames is not None:
            return self._frames.get(name, pd.DataFrame())
        runs = self._runs()
        builders = {"timeline": tl.df_timeline, "steps": tl.df_steps, "device": tl.df_device,
                    "device_pages": tl.df_device_pages, "complaints": tl.df_complaints,
                    "kernel_messages": tl.df_kernel_messages, "signals": tl.df_signals,
                    "processes": tl.df_processes,
                    "events": tl.df_events, "accounting": tl.df_accounting,
                    "call_paths": lambda r: tl.df_call_paths(tl.df_events(r)),
                    "violations": lambda r: tl.df_violations(tl.check_invariants(
                        tl.df_timeline(r), tl.df_steps(r), tl.df_processes(r),
                        tl.df_kernel_messages(r)))}
        if name not in builders:
            raise UserError(f"no frame {name!r} (have: {', '.join(builders)})")
        if not runs and name == "violations":
            return tl.df_violations([])
        if not runs and name not in ("events", "accounting", "call_paths", "kernel_messages",
                                     "signals", "processes"):
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

    @property
    def signals(self) -> pd.DataFrame:
        """Every signal a guest process received, per step, and every process
        the kernel killed: `lab.timeline.df_signals`."""
        return self.frame("signals")

    @property
    def violations(self) -> pd.DataFrame:
        """Every invariant broken so far, earliest step first
        (`lab.timeline.df_violations`): empty while the kernel's accounting holds."""
        return self.frame("violations")

    @property
    def processes(self) -> pd.DataFrame:
        """RSS counters of every live process after every step:
        `lab.timeline.df_processes`."""
        return self.frame("processes")

    @property
    def kernel_messages(self) -> pd.DataFrame:
        """The console's memory-management lines, per step:
        `lab.timeline.df_kernel_messages`."""
        return self.frame("kernel_messages")

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

        return LabPanel(self, boot=type(self).boot).widget

    @classmethod
    def boot_panel(cls, kernel: str = "after"):
        """A panel with no kernel booted yet: pick one and click Boot."""
        from .widgets import LabPanel

        return LabPanel(None, kernel=kernel, boot=cls.boot)

    def save(self, directory: str | Path) -> Path:
        """Write the frames, meta.json and report.html like `devdax-lab run`
        (`lab.experiment.write_experiment`); returns the report's path."""
        from .experiment import Experiment, write_experiment

        names = ["timeline", "steps", "device", "device_pages", "complaints", "kernel_messages",
                 "signals", "processes"]
        if any(r.accounting for r in self._runs()):
            names += ["events", "accounting", "call_paths"]
        frames = {n: self.frame(n) for n in names}
        meta = {"kernels": {self.kernel: {"release": self.release}},
                "scenario": {"name": "notebook session", "text": ""}, **self.meta}
        violations = tl.check_invariants(frames["timeline"], frames["steps"], frames.get(
            "processes"), frames.get("kernel_messages")) if len(frames["steps"]) else []
        frames["violations"] = tl.df_violations(violations)  # judged once, not twice
        exp = Experiment(None, self._runs(), frames, [], violations, meta,
                         session_title=f"notebook session on {self.kernel}")
        return write_experiment(exp, directory)

    @property
    def mappings(self) -> dict[str, Mapping]:
        """Every mapping still mapped in its owner, as it is now (address and
        length change with mremap)."""
        if self._recorder is None:
            return {}
        device = self._recorder.device["name"]
        return {v.spec.name: Mapping(v.spec.name, proc, device, v.addr, v.length)
                for proc, v in self._recorder.model.live_views()
                if proc == v.spec.proc and v.addr is not None}

    @property
    def pins(self) -> dict[str, Pin]:
        """The live pins."""
        return self._live_handles("pin", Pin)

    @property
    def pipes(self) -> dict[str, Pipe]:
        """The live pipes (spliced, not drained)."""
        return self._live_handles("splice", Pipe)

    def _live_handles(self, kind: str, cls):
        if self._recorder is None:
            return {}
        return {n: cls(n, h.proc, h.map) for n, h in self._recorder.model.handles.items()
                if h.kind == kind and h.released_at is None and h.guest_id is not None}

    def live_processes(self) -> list[str]:
        """Names of the live guest processes (``lab.processes`` is their RSS frame)."""
        return sorted(self._session.agent.procs()) if self._session else []


def _action_method(action: str):
    """``Lab.<action>(...)``: :meth:`Lab.step` with the action's positional
    fields (`lab.actions`), its docstring and signature from the registry."""
    spec = REGISTRY[action]

    def method(self, *args, label: str | None = None, **fields):
        if len(args) > len(spec.positional):
            raise TypeError(f"{action}() takes at most {len(spec.positional)} positional "
                            f"arguments ({', '.join(spec.positional) or 'none'})")
        for name, value in zip(spec.positional, args):
            if name in fields:
                raise TypeError(f"{action}() got two values for {name!r}")
            fields[name] = value
        return self.step(action, label=label, **fields)

    P = _inspect.Parameter
    params = [P("self", P.POSITIONAL_OR_KEYWORD)]
    for f in sorted(spec.fields, key=lambda f: (f.name not in spec.positional,
                                                 spec.positional.index(f.name)
                                                 if f.name in spec.positional else 0)):
        kind = P.POSITIONAL_OR_KEYWORD if f.name in spec.positional else P.KEYWORD_ONLY
        default = P.empty if f.required and not f.auto else (None if f.auto else f.default)
        if kind is P.POSITIONAL_OR_KEYWORD and default is P.empty and any(
                p.default is not P.empty for p in params[1:]):
            default = None
        params.append(P(f.name, kind, default=default))
    params.append(P("label", P.KEYWORD_ONLY, default=None))
    method.__name__ = method.__qualname__ = action
    method.__signature__ = _inspect.Signature(params)
    method.__doc__ = spec.doc + "\n\n" + "\n".join(
        f"{f.name}: {f.doc}" + ("" if f.required else f" (default {f.default!r})")
        for f in spec.fields)
    return method


for _name in REGISTRY:
    if _name not in Lab.__dict__:  # mmap: its own method (it picks the device)
        setattr(Lab, _name, _action_method(_name))
