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
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .actions import ACTIONS, REGISTRY, check_step
from .guest import (
    DEVICE_SIZES,
    MADVISE,
    PAGE_SIZE,
    GuestModel,
    StepError,
    Where,
    check_keys,
    parse_pages,
    show,
    table as _table,
    type_name,
)
from . import columns
from .model import MapSpec, Step, UserError, format_size, parse_size

__all__ = [
    "ACTIONS",
    "DEVICE_SIZES",
    "EVENT_MODES",
    "ExpectSpec",
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

_TOP_KEYS = ("name", "title", "description", "device", "watch", "step", "expect")

# What an [[expect]] may test, by the object it names (lab/expect.py reads
# the frames): a watched page's timeline columns, the device's aggregates,
# a process's memory counters.
DEVICE_FIELDS = ("pages_changed", "pages_mapped", "refcount_sum_delta", "pgmap_ref")
PROC_FIELDS = ("file_pages", "anon_pages", "shmem_pages")
EXPECT_OPS = ("equals", "at_least", "at_most", "delta")


class ScenarioError(StepError):
    """A scenario that cannot run as written. The message is one line:
    ``FILE: step N (ACTION): FIELD: what is wrong``."""


# -- value types -------------------------------------------------------------


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
class ExpectSpec:
    """One ``[[expect]]``: at step *step* (index), on kernels matching
    *kernel* (a glob), *field* of the object (``map`` + ``page`` [+ ``proc``],
    ``device``, or ``proc``) compared by *op* with *value*; a ``delta`` is
    relative to the previous step, or to step 0 with ``since = "start"``."""

    index: int  # 1-based, in file order
    step: int
    kernel: str
    object: str  # "page", "device" or "proc"
    field: str
    op: str
    value: Any
    map: str | None = None
    page: int | None = None
    proc: str | None = None
    since: str = "previous"
    why: str = ""

    @property
    def target(self) -> str:
        """The object in words: ``m page 3 (b)``, ``the device``, ``process a``."""
        if self.object == "page":
            return f"{self.map} page {self.page}" + (f" ({self.proc})" if self.proc else "")
        return "the device" if self.object == "device" else f"process {self.proc}"

    @property
    def wanted(self) -> str:
        """The comparison in words: ``== 2``, ``>= 1``, ``+1 since step 0``."""
        if self.op == "delta":
            since = "the previous step" if self.since == "previous" else "step 0"
            return f"changed by {self.value:+d} since {since}"
        return {"equals": "==", "at_least": ">=", "at_most": "<="}[self.op] + f" {self.value}"


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
    expect: tuple[ExpectSpec, ...] = ()

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


def _step(state: GuestModel, file: str, index: int, raw: Any) -> Step:
    where = Where(file, f"step {index}", ScenarioError)
    if not isinstance(raw, dict):
        where.fail("step", f"must be a table ([[step]]), not {type_name(raw)}")
    if "action" not in raw:
        where.fail("action", f"missing (one of: {', '.join(ACTIONS)})")
    action = raw["action"]
    if isinstance(action, str) and action in ACTIONS:
        where = Where(file, f"step {index} ({action})", ScenarioError)
        spec = REGISTRY[action]
        check_keys(where, raw, ("action", *(f.name for f in spec.fields), "label"),
                   [f.name for f in spec.fields if f.required])
    label = None if raw.get("label") is None else where.string("label", raw["label"])
    fields = {k: v for k, v in raw.items() if k not in ("action", "label")}
    return check_step(state, where, index, action, fields, label)


def _device(file: str, data: dict[str, Any]) -> int:
    where = Where(file, "", ScenarioError)
    if "device" not in data:
        where.fail("device", 'missing (add [device] with align = "4K", "2M" or "1G")')
    table = _table(where, "device", data["device"])
    where = Where(file, "device", ScenarioError)
    check_keys(where, table, ("align",), ("align",))
    v = table["align"]
    known = ", ".join(f'"{format_size(a)}"' for a in DEVICE_SIZES)
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        where.fail("align", f"must be one of {known}, not {type_name(v)} {show(v)}")
    try:
        align = parse_size(v)
    except UserError:
        align = -1
    if align not in DEVICE_SIZES:
        where.fail("align", f"no device with alignment {show(v)} (known: {known})")
    return align


def _watch(file: str, raw: Any, maps: Mapping[str, MapSpec]) -> tuple[WatchSpec, ...]:
    where = Where(file, "", ScenarioError)
    if not isinstance(raw, list):
        where.fail("watch", f"must be an array of {{map = ..., page = ...}} tables, "
                   f"not {type_name(raw)}")
    out = []
    for i, entry in enumerate(raw, 1):
        w = Where(file, f"watch {i}", ScenarioError)
        if not isinstance(entry, dict):
            w.fail("watch", f"must be a table {{map = ..., page = ...}}, not {type_name(entry)}")
        check_keys(w, entry, ("map", "page", "events"), ("map", "page"))
        name = w.name("map", entry["map"])
        if name not in maps:
            known = ", ".join(f'"{m}"' for m in maps) or "none"
            w.fail("map", f'no mapping "{name}" (mappings: {known})')
        page = entry["page"]
        if isinstance(page, bool) or not isinstance(page, int):
            w.fail("page", f"must be an integer, not {type_name(page)} {show(page)}")
        if not 0 <= page < maps[name].pages:
            w.fail("page", f'page {page} is outside mapping "{name}" ({maps[name].pages} pages)')
        events = entry.get("events", False)
        if events is True:
            events = "counts"
        if events is not False and events not in EVENT_MODES:
            w.fail("events", f'must be true, false, "counts" or "stacks", not {show(events)}')
        out.append(WatchSpec(name, page, events or None))
    return tuple(dict.fromkeys(out))


def _expect(file: str, raw: Any, steps: tuple[Step, ...],
            state: GuestModel) -> tuple[ExpectSpec, ...]:
    top = Where(file, "", ScenarioError)
    if not isinstance(raw, list):
        top.fail("expect", f"must be an array of tables ([[expect]]), not {type_name(raw)}")
    labels = {s.label: s.index for s in steps if s.label}
    out = []
    keys = ("step", "kernel", "map", "page", "proc", "device", "field", *EXPECT_OPS, "since",
            "why")
    for i, entry in enumerate(raw, 1):
        w = Where(file, f"expect {i}", ScenarioError)
        if not isinstance(entry, dict):
            w.fail("expect", f"must be a table ([[expect]]), not {type_name(entry)}")
        check_keys(w, entry, keys, ("step", "field"))
        step = entry["step"]
        if isinstance(step, str):
            if step not in labels and step != "start":
                known = ", ".join(f'"{x}"' for x in labels) or "none"
                w.fail("step", f'no step labelled "{step}" (labels: {known}; or "start")')
            step = 0 if step == "start" else labels[step]
        elif isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= len(steps):
            w.fail("step", f"must be a step number 0-{len(steps)} or a label, not {show(step)}")
        kernel = w.string("kernel", entry.get("kernel", "*"))
        ops = [op for op in EXPECT_OPS if op in entry]
        if len(ops) != 1:
            w.fail(ops[1] if ops else "equals",
                   f"give exactly one of {', '.join(EXPECT_OPS)}")
        op, value = ops[0], entry[ops[0]]
        if op == "equals":
            if not isinstance(value, (bool, int, str)):
                w.fail(op, f"must be an integer, boolean or string, not {type_name(value)}")
        elif isinstance(value, bool) or not isinstance(value, int):
            w.fail(op, f"must be an integer, not {type_name(value)} {show(value)}")
        since = entry.get("since", "previous")
        if since not in ("previous", "start"):
            w.fail("since", f'must be "previous" or "start", not {show(since)}')
        if "since" in entry and op != "delta":
            w.fail("since", "only a delta is measured since a step")
        field_name = w.string("field", entry["field"])
        proc = None if entry.get("proc") is None else w.name("proc", entry["proc"])
        if proc is not None and proc not in state.procs:
            known = ", ".join(f'"{p}"' for p in state.procs) or "none"
            w.fail("proc", f'no process "{proc}" (processes: {known})')
        if "map" in entry or "page" in entry:
            if "device" in entry:
                w.fail("device", "name one object: map and page, device, or proc")
            map_name = w.name("map", entry.get("map"))
            if map_name not in state.maps:
                known = ", ".join(f'"{m}"' for m in state.maps) or "none"
                w.fail("map", f'no mapping "{map_name}" (mappings: {known})')
            page = entry.get("page")
            if isinstance(page, bool) or not isinstance(page, int) or not (
                    0 <= page < state.maps[map_name].pages):
                w.fail("page", f'must be a page of "{map_name}" (0-'
                       f"{state.maps[map_name].pages - 1}), not {show(page)}")
            obj, fields = "page", columns.names()
        elif entry.get("device") is True:
            if proc is not None:
                w.fail("proc", "name one object: map and page, device, or proc")
            obj, fields, map_name, page = "device", DEVICE_FIELDS, None, None
        elif proc is not None:
            obj, fields, map_name, page = "proc", PROC_FIELDS, None, None
        else:
            w.fail("map", "name the object: map and page, device = true, or proc")
        if field_name not in fields:
            what = "a page" if obj == "page" else f"the {obj}"
            w.fail("field", f'"{field_name}" is not a field of {what} '
                   f"(fields: {', '.join(fields)})")
        numeric = obj != "page" or columns.by_name[field_name].dtype not in ("string", "boolean")
        if op != "equals" and not numeric:
            w.fail(op, f'"{field_name}" is not a number: compare it with equals')
        if op == "equals" and numeric and not isinstance(value, int):
            w.fail(op, f'"{field_name}" is a number, not {type_name(value)} {show(value)}')
        if op == "equals" and not numeric and isinstance(value, int) and not isinstance(
                value, bool) and columns.by_name[field_name].dtype == "boolean":
            w.fail(op, f'"{field_name}" is true or false, not {show(value)}')
        if op == "delta" and step == 0:
            w.fail("step", "a delta needs a step before it: step 0 is the start")
        why = w.string("why", entry.get("why", ""))
        out.append(ExpectSpec(i, step, kernel, obj, field_name, op, value, map_name, page, proc,
                              since, why))
    return tuple(out)


def validate_text(text: str, name: str = "<string>", *, path: Path | None = None) -> Scenario:
    """Parse and check a scenario. *name* is the file name used in messages
    (its stem is the scenario's name unless the text sets ``name``).

    :raises ScenarioError: at the first thing that cannot run as written.
    """
    top = Where(name, "", ScenarioError)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ScenarioError(f"{name}: TOML syntax error: {e}") from e
    check_keys(top, data, _TOP_KEYS, ())
    scen_name = Path(name).stem if "name" not in data else top.name("name", data["name"])
    title = scen_name if "title" not in data else top.string("title", data["title"])
    description = "" if "description" not in data else top.string(
        "description", data["description"])
    device = _device(name, data)
    raw_steps = data.get("step")
    if raw_steps is None:
        top.fail("step", "no steps (add [[step]] tables)")
    if not isinstance(raw_steps, list):
        top.fail("step", f"must be an array of tables ([[step]]), not {type_name(raw_steps)}")
    if not raw_steps:
        top.fail("step", "no steps (add [[step]] tables)")
    state = GuestModel(device)
    steps = tuple(_step(state, name, i, raw) for i, raw in enumerate(raw_steps, 1))
    watch = _watch(name, data["watch"], state.maps) if "watch" in data else ()
    expect = _expect(name, data["expect"], steps, state) if "expect" in data else ()
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
        expect=expect,
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
