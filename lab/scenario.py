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
from .model import MapSpec, Step, UserError, format_size, parse_size

__all__ = [
    "ACTIONS",
    "DEVICE_SIZES",
    "EVENT_MODES",
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

_TOP_KEYS = ("name", "title", "description", "device", "watch", "step")


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
