"""Tidy DataFrames from scenario runs, kernel-vs-kernel differences, and
named invariant checks. Pure: functions of RunResults and DataFrames.

``mapcount``, ``large_mapcount`` and ``entire_mapcount`` are the raw values
the kernel stores: -1 means "not mapped", 0 "mapped once".
``nr_pages_mapped`` and ``pincount`` are plain counts that start at 0 (and
``nr_pages_mapped`` exists only with CONFIG_PAGE_MAPCOUNT; docs/glossary.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from . import columns
from .actions import pgmap_neutral_actions
from .model import RunResult

__all__ = [
    "TIMELINE_COLUMNS",
    "df_timeline",
    "df_device",
    "df_device_pages",
    "df_complaints",
    "df_kernel_messages",
    "df_signals",
    "df_processes",
    "SIGNAL_COLUMNS",
    "PROCESS_COLUMNS",
    "df_steps",
    "df_diff",
    "Violation",
    "VIOLATION_COLUMNS",
    "df_violations",
    "check_invariants",
    "INVARIANTS",
    "describe_differences",
    "GUP_PIN_COUNTING_BIAS",
    "EVENT_COLUMNS",
    "df_events",
    "accounting_problems",
    "df_accounting",
    "df_call_paths",
    "writer_of",
]

# include/linux/mm.h: a FOLL_PIN on an order-0 folio adds this to _refcount.
GUP_PIN_COUNTING_BIAS = 1024

TIMELINE_COLUMNS = columns.dtypes()


def _row_sources(run: RunResult, st, pr) -> dict:
    """The record each `lab.columns` source names, for one timeline row."""
    return {"run": run, "step": st, "page": pr, "folio": pr.folio,
            "counter": pr.folio.counters, "pte": pr.pte, "pgmap": st.pgmap}


def _value(column: columns.Column, sources: dict):
    record = sources[column.source]
    if record is None:  # no page-table entry in this row: null, not a guess
        return None
    if column.source == "counter":
        return record.get(column.name)
    for part in (column.attr or column.name).split("."):
        record = getattr(record, part)
    return record


def df_timeline(runs: Iterable[RunResult]) -> pd.DataFrame:
    """One row per (kernel, step, watched page, process mapping it).

    A page no process maps any more still has one row, with ``proc`` null.
    Columns: see :data:`TIMELINE_COLUMNS` (nullable dtypes: a value a kernel
    does not have is null, never a made-up number). ``pt_*`` describe the
    page-table entry in that row's process; ``pagemap_pfn`` is what the
    guest's /proc/PID/pagemap said.
    """
    rows = [[_value(c, sources) for c in columns.TIMELINE]
            for run in runs for st in run.steps for pr in st.pages
            for sources in (_row_sources(run, st, pr),)]
    frame = pd.DataFrame(rows, columns=list(TIMELINE_COLUMNS))
    return frame.astype(TIMELINE_COLUMNS)


def df_steps(runs: Iterable[RunResult]) -> pd.DataFrame:
    """One row per (kernel, step): action, label, detail, errno, error,
    seconds (action + snapshot), pgmap reference count, complaints, and
    ``counts_mappings``: whether the kernel's device-dax faults map folios
    (probed from its code; null when unknown)."""
    rows = []
    for run in runs:
        for st in run.steps:
            rows.append({"kernel": run.kernel, "step": st.step, "action": st.action,
                         "proc": st.proc, "label": st.label, "detail": st.detail,
                         "errno": st.errno, "error": st.error, "seconds": st.seconds,
                         "pgmap_ref": st.pgmap.ref.count, "complaints": len(st.complaints),
                         "counts_mappings": getattr(run, "counts_mappings", None)})
    return pd.DataFrame(rows).astype({"errno": "Int64", "pgmap_ref": "Int64",
                                      "counts_mappings": "boolean"})


def df_device(runs: Iterable[RunResult], *, window: int = 256) -> pd.DataFrame:
    """Device-wide aggregates per (kernel, step) from the bulk read.

    ``pages_changed``: pages whose refcount differs from their value before
    the first step; ``pages_mapped``: pages with a raw mapcount >= 0;
    ``refcount_sum_delta``: the summed refcount change since the start.
    """
    rows = []
    for run in runs:
        base = run.steps[0].device_refcount.astype(np.int64)
        for st in run.steps:
            ref = st.device_refcount.astype(np.int64)
            rows.append({"kernel": run.kernel, "step": st.step, "action": st.action,
                         "device": run.device["name"], "pages": len(ref),
                         "pages_changed": int((ref != base).sum()),
                         "pages_mapped": int((st.device_mapcount >= 0).sum()),
                         "refcount_sum_delta": int((ref - base).sum())})
    del window
    return pd.DataFrame(rows)


def df_device_pages(runs: Iterable[RunResult], *, margin: int = 16) -> pd.DataFrame:
    """Refcount of every device page near the watched ones, per step (for a
    heatmap): columns kernel, step, page_index (from the device's start), refcount."""
    rows = []
    for run in runs:
        first_pfn = run.device["start"] // 4096
        watched = {pr.pfn - first_pfn for st in run.steps for pr in st.pages}
        if not watched:
            continue
        lo = max(0, min(watched) - margin)
        hi = min(len(run.steps[0].device_refcount), max(watched) + margin + 1)
        for st in run.steps:
            for i in range(lo, hi):
                rows.append({"kernel": run.kernel, "step": st.step, "page_index": i,
                             "refcount": int(st.device_refcount[i])})
    return pd.DataFrame(rows, columns=["kernel", "step", "page_index", "refcount"])


def df_complaints(runs: Iterable[RunResult]) -> pd.DataFrame:
    """Every WARN/BUG/Oops/panic/"Bad ..." line the guest printed, per step."""
    rows = [{"kernel": run.kernel, "step": st.step, "action": st.action, "kind": kind, "text": text}
            for run in runs for st in run.steps for kind, text in st.complaints]
    return pd.DataFrame(rows, columns=["kernel", "step", "action", "kind", "text"])


def df_kernel_messages(runs: Iterable[RunResult]) -> pd.DataFrame:
    """Every memory-management line the guest kernel printed (memory failure,
    hwpoison, OOM, page dumps, rss-counter, ...: `lab.console.MM_KINDS`), per
    step: kernel, step, action, kind, text. Not complaints: a memory failure
    handled as designed is data (a "Bad rss-counter state" line is both)."""
    rows = [{"kernel": run.kernel, "step": st.step, "action": st.action, "kind": kind,
             "text": text}
            for run in runs for st in run.steps for kind, text in st.kernel_messages]
    return pd.DataFrame(rows, columns=["kernel", "step", "action", "kind", "text"])


# -- signals and processes ------------------------------------------------------

SIGNAL_COLUMNS = {
    "kernel": "string", "step": "Int64", "action": "string", "proc": "string", "pid": "Int64",
    "signal": "string", "si_code": "string", "address": "Int64", "addr_lsb": "Int64",
    "survived": "boolean", "during": "string", "sender": "Int64", "text": "string",
}


def df_signals(runs: Iterable[RunResult]) -> pd.DataFrame:
    """One row per signal a guest process received, at the step it arrived:
    ``signal`` and ``si_code`` by name (SIGBUS, BUS_MCEERR_AR), ``address``
    (si_addr, for a signal the kernel raised), ``addr_lsb`` (a memory
    failure's mapping size as a shift: 12 for a PTE), ``survived``, ``during``
    (the agent command whose answer reported it), ``sender`` (the pid that
    sent it with kill) and ``text``, one line. A process the kernel killed
    has one row with ``survived`` false and no si_code (a wait status has none).
    """
    from .signals import describe_signal, si_code_name, signal_name

    rows = [{"kernel": run.kernel, "step": st.step, "action": st.action, "proc": sg.proc,
             "pid": sg.pid, "signal": signal_name(sg.signal),
             "si_code": si_code_name(sg.signal, sg.code), "address": sg.addr,
             "addr_lsb": sg.addr_lsb, "survived": sg.survived, "during": sg.during,
             "sender": sg.sender,
             "text": describe_signal(sg.signal, sg.code, sg.addr, sg.survived)}
            for run in runs for st in run.steps for sg in st.signals]
    return pd.DataFrame(rows, columns=list(SIGNAL_COLUMNS)).astype(SIGNAL_COLUMNS)


PROCESS_COLUMNS = {
    "kernel": "string", "step": "Int64", "proc": "string", "pid": "Int64",
    "file_pages": "Int64", "anon_pages": "Int64", "shmem_pages": "Int64",
    "device_pte": "Int64", "device_pmd": "Int64", "device_pud": "Int64",
}

_ENTRY_SHIFT = {"PTE": 12, "PMD": 21, "PUD": 30}


def df_processes(runs: Iterable[RunResult]) -> pd.DataFrame:
    """One row per live guest process at each step: its mm's RSS counters in
    pages (``file_pages`` = MM_FILEPAGES, ``anon_pages`` = MM_ANONPAGES,
    ``shmem_pages`` = MM_SHMEMPAGES; null where they could not be read) and
    the page-table entries of that process that map watched device pages, by
    level (``device_pte``, ``device_pmd``, ``device_pud``: entries, not
    pages; a PMD entry maps 512 pages). Only watched pages are seen: a
    mapped page nobody watches is in the counters but not in the entries.
    """
    rows = []
    for run in runs:
        for st in run.steps:
            entries: dict[str, dict[str, set[int]]] = {}
            for pr in st.pages:
                if pr.proc is None or pr.pte is None or not pr.pte.present:
                    continue
                level = pr.pte.level
                entries.setdefault(pr.proc, {}).setdefault(level, set()).add(
                    pr.vaddr >> _ENTRY_SHIFT[level])
            for p in st.processes:
                levels = entries.get(p.proc, {})
                rows.append({"kernel": run.kernel, "step": st.step, "proc": p.proc, "pid": p.pid,
                             "file_pages": p.file_pages, "anon_pages": p.anon_pages,
                             "shmem_pages": p.shmem_pages,
                             **{f"device_{lv.lower()}": len(levels.get(lv, ()))
                                for lv in _ENTRY_SHIFT}})
    return pd.DataFrame(rows, columns=list(PROCESS_COLUMNS)).astype(PROCESS_COLUMNS)


# -- events (watchpoints on folio counters, `lab.events`) ---------------------

EVENT_COLUMNS = {
    "kernel": "string", "seq": "Int64", "step": "Int64", "action": "string", "label": "string",
    "kind": "string", "folio_pfn": "Int64", "pages": "string", "field": "string",
    "old": "Int64", "new": "Int64", "delta": "Int64", "cpu": "Int64", "comm": "string",
    "pid": "Int64", "pc": "string", "function": "string", "writer": "string",
    "source": "string", "stack": "string", "handle_ms": "Float64",
}

# Frames that only carry a counter change out (atomics, page_ref/folio_ref
# wrappers): the "writer" of an event is the first frame that is not one.
_PLUMBING = ("arch_atomic", "raw_atomic", "atomic_", "atomic64_", "page_ref_", "folio_ref_",
             "folio_get", "folio_put", "get_page", "put_page", "set_page_count",
             "init_page_count", "set_page_refcounted", "__page_ref", "try_get_page")


def writer_of(frames: Sequence[tuple]) -> str | None:
    """The first frame (innermost first) that is not counter plumbing."""
    for name, _where, _inline in frames:
        if not name.startswith(_PLUMBING):
            return name
    return frames[-1][0] if frames else None


def _frames_text(frames) -> str | None:
    if not frames:
        return None
    return " < ".join(f"{n} ({w})" if w else n for n, w, _ in frames)


def df_events(runs: Iterable[RunResult]) -> pd.DataFrame:
    """One row per change of a watched counter (kind "write"), per change
    the watchpoints missed and the accounting found (kind "lost"), or per
    counter whose struct page was removed while watched (kind "gone").

    ``function`` is the function holding the writing instruction (pc - 1,
    inlining resolved), ``writer`` the first frame of the stack (or of the
    inline chain) that is not atomic/page_ref plumbing, ``source`` the
    inline chain with file:line, ``stack`` the drgn-unwound kernel stack
    (innermost first; null where the watch did not ask for stacks).
    """
    rows = []
    for run in runs:
        labels = {st.step: (st.action, st.label) for st in run.steps}
        for ev in run.events:
            pages = run.watched_folios.get(ev.folio_pfn, [])
            frames = ev.stack or ev.location
            action, label = labels.get(ev.step, (None, None))
            rows.append({
                "kernel": run.kernel, "seq": ev.seq, "step": ev.step, "action": action,
                "label": label, "kind": ev.kind, "folio_pfn": ev.folio_pfn,
                "pages": ", ".join(f"{m}:{p}" for m, p in pages) or None, "field": ev.field,
                "old": ev.old, "new": ev.new, "delta": ev.delta, "cpu": ev.cpu,
                "comm": ev.comm, "pid": ev.pid, "pc": f"{ev.pc:#x}" if ev.pc is not None else None,
                "function": next((n for n, _, inline in ev.location if not inline), None),
                "writer": writer_of(frames) if frames else None,
                "source": _frames_text(ev.location),
                "stack": " < ".join(n for n, _, _ in ev.stack) if ev.stack else None,
                "handle_ms": ev.seconds * 1000 if ev.kind == "write" else None,
            })
    return pd.DataFrame(rows, columns=list(EVENT_COLUMNS)).astype(EVENT_COLUMNS)


def df_accounting(runs: Iterable[RunResult]) -> pd.DataFrame:
    """Per (kernel, step, watched counter): value at the previous snapshot
    (``start``), sum of recorded deltas, value read at this snapshot, and
    ``lost`` = read - start - recorded (0 when every change was caught;
    null, and ``ok`` false, when the struct page is gone)."""
    cols = ["kernel", "step", "folio_pfn", "field", "start", "recorded", "read", "lost", "ok"]
    rows = [{"kernel": run.kernel, **row, "ok": row["lost"] == 0}
            for run in runs for row in run.accounting]
    return pd.DataFrame(rows, columns=cols)


def accounting_problems(accounting: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rows with lost changes, rows whose counter is gone) of an
    accounting frame: a gone counter has no value to compare."""
    if accounting.empty:
        return accounting, accounting
    gone = accounting["read"].isna()
    lost = ~gone & (accounting["lost"].fillna(0) != 0)
    return accounting[lost], accounting[gone]


def df_call_paths(events: pd.DataFrame, depth: int = 8) -> pd.DataFrame:
    """The distinct ways the counters changed: per (kernel, field, sign of
    the delta, call path) the number of events, their summed delta and the
    steps they happened in. The path is the stack (or, without one, the
    inline chain) from the writer outwards, *depth* frames."""
    cols = ["kernel", "field", "change", "path", "events", "total_delta", "steps"]
    if events.empty:
        return pd.DataFrame(columns=cols)
    ev = events[events["kind"] == "write"].copy()
    if ev.empty:
        return pd.DataFrame(columns=cols)

    def path(row) -> str:
        names = (row["stack"] or "").split(" < ") if isinstance(row["stack"], str) else []
        if not names:
            names = [n.split(" (")[0] for n in (row["source"] or "").split(" < ") if n]
        writer = row["writer"]
        if writer in names:
            names = names[names.index(writer):]
        return " < ".join(names[:depth])

    ev["path"] = ev.apply(path, axis=1)
    ev["change"] = np.where(ev["delta"].astype("int64") > 0, "+", "-")
    out = (ev.groupby(["kernel", "field", "change", "path"], sort=False)
           .agg(events=("seq", "size"), total_delta=("delta", "sum"),
                steps=("step", lambda s: ", ".join(map(str, sorted(set(s)))))).reset_index())
    return out.sort_values(["kernel", "field", "events"], ascending=[True, True, False],
                           ignore_index=True)[cols]


DIFF_FIELDS = columns.names("diff")


def _per_page(timeline: pd.DataFrame) -> pd.DataFrame:
    """One row per (kernel, step, map, page): folio fields, and the entry of
    the first process that maps the page (processes sorted by name)."""
    ordered = timeline.sort_values(["kernel", "step", "map", "page", "proc"], na_position="last")
    return ordered.drop_duplicates(["kernel", "step", "map", "page"])


def df_diff(timeline: pd.DataFrame, fields: Sequence[str] = DIFF_FIELDS) -> pd.DataFrame:
    """Where kernels differ: one row per (step, map, page, field) whose values
    are not the same on every kernel; a column per kernel with its value as
    text ("null" where the kernel has none)."""
    pages = _per_page(timeline)
    kernels = list(dict.fromkeys(pages["kernel"]))
    rows = []
    for (step, map_name, page), group in pages.groupby(["step", "map", "page"], sort=True):
        by_kernel = group.set_index("kernel")
        if len(by_kernel) < 2:
            continue
        for fld in fields:
            values = {k: by_kernel.at[k, fld] if k in by_kernel.index else None for k in kernels}
            shown = {k: _fmt(v) for k, v in values.items()}  # text: fields mix ints and bools
            if len(set(shown.values())) > 1:
                rows.append({"step": step, "action": by_kernel["action"].iloc[0],
                             "map": map_name, "page": page, "field": fld, **shown})
    return pd.DataFrame(rows, columns=["step", "action", "map", "page", "field", *kernels])


def describe_differences(diff: pd.DataFrame, kernels: Sequence[str]) -> list[str]:
    """Plain-language sentences: one per change (a set of pages differing the
    same way, told once with the steps it spans), each saying what the differing fields are consistent with
    (docs/glossary.md). The refcount series is named only when the pattern
    is its own: refcount and a mapcount up by the same number of mappings on
    one kernel, the mapcount unmapped (-1) on the other."""
    if diff.empty:
        return ["The kernels agree on every watched field at every step."]
    # one sentence per change: a page differing the same way at several
    # steps is told once, with the steps it spans; pages that share both
    # the difference and the steps share the sentence
    spans: dict[tuple, list[tuple[int, str]]] = {}
    for (step, action, map_name, page), g in diff.groupby(["step", "action", "map", "page"], sort=True):
        signature = tuple((r["field"], *(r[k] for k in kernels)) for _, r in g.iterrows())
        spans.setdefault((map_name, int(page), signature), []).append((int(step), action))
    changes: dict[tuple, list[int]] = {}
    for (map_name, page, signature), steps in spans.items():
        changes.setdefault((map_name, signature, tuple(steps)), []).append(page)
    changes = {(m, tuple(sorted(p)), sig): list(steps) for (m, sig, steps), p in changes.items()}
    out = []
    for (map_name, pages, signature), steps in sorted(changes.items(),
                                                      key=lambda c: (c[1][0], c[0][1])):
        values = {sig[0]: dict(zip(kernels, sig[1:])) for sig in signature}
        parts = []
        for i, k in enumerate(kernels, start=1):
            parts.append(f"on {k}: " + ", ".join(f"{sig[0]} {sig[i]}" for sig in signature))
        why = "".join(f" {sentence}" for sentence in _explain(values, kernels))
        which = "page" if len(pages) == 1 else "pages"
        out.append(f"{_steps_text(steps)}, {map_name} {which} {_pages_list(list(pages))}: "
                   + "; ".join(parts) + "." + why)
    return out


def _steps_text(steps: Sequence[tuple[int, str]]) -> str:
    """``Step 2 (touch)`` or ``Steps 2-3, 5 (touch, fork, exit)``."""
    if len(steps) == 1:
        return f"Step {steps[0][0]} ({steps[0][1]})"
    actions = ", ".join(dict.fromkeys(a for _, a in steps))
    return f"Steps {_pages_list([s for s, _ in steps])} ({actions})"


_REFCOUNT_SERIES = ('"device/dax: properly refcount device dax pages when mapping" (Linux 6.15;'
                    " docs/glossary.md)")
_MAPCOUNTS = ("mapcount", "entire_mapcount", "large_mapcount")


def _as_int(text: str) -> int | None:
    try:
        return int(text)
    except (TypeError, ValueError):
        return None


def _explain(values: dict[str, dict[str, str]], kernels: Sequence[str]) -> list[str]:
    """What the differing *values* ({field: {kernel: text}}) are consistent
    with, one sentence per kind of difference, built only from the fields
    that differ."""
    out = []
    ref = values.get("refcount")
    maps = {f: values[f] for f in _MAPCOUNTS if f in values}
    if ref and maps:
        series = _series_pattern(ref, maps, kernels)
        if series:
            hi, lo, n, field = series
            holders = "the mapping holds" if n == 1 else f"each of the {n} mappings holds"
            out.append(f"Consistent with {_REFCOUNT_SERIES}: on {hi} {holders} a folio"
                       f" reference and is counted in {field}; on {lo} the mapping holds neither"
                       f" ({field} stays -1).")
        else:
            out.append("Refcount and mapcount both differ, but not by one reference per counted"
                       " mapping with the mapcount unmapped on the other kernel: not the pattern"
                       " of the refcount series alone; look for an extra get/put or a mapping"
                       " counted without its reference.")
    elif ref:
        hi = _highest(ref, kernels)
        out.append("Only the refcount differs, the mapcounts agree: consistent with a reference"
                   f" taken outside the page tables (a pin, a pipe buffer) or not given back"
                   f" (a leak) on {hi}, or an extra put on the other kernel"
                   " - not with how a mapping is counted.")
    elif maps:
        out.append(f"Only {', '.join(maps)} differ{'s' if len(maps) == 1 else ''}, the refcount"
                   " agrees: consistent with a mapping counted in the rmap without a folio"
                   " reference of its own (or a mapcount not given back) - not with the refcount"
                   " series, where the two move together.")
    if "pt_special" in values:
        out.append("The entry's special bit differs: vm_normal_page() returns NULL for a special"
                   " entry, so zap, fork and GUP treat the page as pageless on the kernel that"
                   " set it.")
    elif "pt_devmap" in values:
        out.append("Only the devmap bit differs (a PMD/PUD: no special bit there):"
                   " vm_normal_page_pmd() returns NULL for a devmap PMD, and zap, split and GUP"
                   " route devmap PMDs/PUDs through their devmap paths on the kernel that set"
                   " it.")
    if "pt_level" in values:
        out.append("The page is mapped at a different page-table level (or not at all) on one"
                   " kernel.")
    if "pincount" in values:
        out.append("The large folio's _pincount differs: a FOLL_PIN counted on one kernel only.")
    if "pgmap_ref" in values:
        out.append("The dev_pagemap's percpu_ref count differs: it is taken in bulk when the"
                   " pages are created, so a difference means a pgmap reference taken or dropped"
                   " by a step.")
    return out


def _highest(field: dict[str, str], kernels: Sequence[str]) -> str:
    numbers = {k: _as_int(field[k]) for k in kernels}
    known = {k: v for k, v in numbers.items() if v is not None}
    return max(known, key=known.get) if known else kernels[0]


def _series_pattern(ref: dict[str, str], maps: dict[str, dict[str, str]],
                    kernels: Sequence[str]) -> tuple[str, str, int, str] | None:
    """(kernel with the counted mappings, kernel without, number of mappings,
    mapcount field) when refcount and one mapcount field are both higher by
    the same n >= 1 on one kernel and that field is -1 (unmapped) on the
    other; None otherwise. Two kernels only."""
    if len(kernels) != 2:
        return None
    a, b = kernels
    ra, rb = _as_int(ref[a]), _as_int(ref[b])
    if ra is None or rb is None or ra == rb:
        return None
    hi, lo = (a, b) if ra > rb else (b, a)
    n = abs(ra - rb)
    for field, by_kernel in maps.items():
        m_hi, m_lo = _as_int(by_kernel[hi]), _as_int(by_kernel[lo])
        if m_hi is not None and m_lo == -1 and m_hi - m_lo == n:
            return hi, lo, n, field
    return None


def _pages_list(pages: Sequence[int]) -> str:
    runs, start, prev = [], pages[0], pages[0]
    for p in [*pages[1:], None]:
        if p is not None and p == prev + 1:
            prev = p
            continue
        runs.append(str(start) if start == prev else f"{start}-{prev}")
        if p is not None:
            start = prev = p
    return ", ".join(runs)


def _fmt(value) -> str:
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return "null"
    return str(value)


@dataclass(frozen=True)
class Violation:
    """One invariant broken at one step: where (kernel, step and its action,
    process, mapping, page, folio), which counter, what the invariant
    expected and what the kernel had, and one line saying what it means."""

    invariant: str
    kernel: str
    step: int
    map: str | None
    page: int | None
    message: str
    action: str | None = None
    proc: str | None = None
    folio_pfn: int | None = None
    field: str | None = None
    expected: str | None = None
    actual: str | None = None


VIOLATION_COLUMNS = {
    "invariant": "string", "kernel": "string", "step": "Int64", "action": "string",
    "proc": "string", "map": "string", "page": "Int64", "folio_pfn": "Int64",
    "field": "string", "expected": "string", "actual": "string", "message": "string",
}


def df_violations(violations: Iterable[Violation]) -> pd.DataFrame:
    """One row per violation, in the order found (the first is the first
    broken step of the first invariant): :data:`VIOLATION_COLUMNS`."""
    rows = [{c: getattr(v, c) for c in VIOLATION_COLUMNS} for v in violations]
    return pd.DataFrame(rows, columns=list(VIOLATION_COLUMNS)).astype(VIOLATION_COLUMNS)


def _v(invariant: str, r, message: str, *, fld: str | None = None, expected=None,
       actual=None, proc=None) -> Violation:
    """A Violation at timeline row *r*."""
    def opt(key):
        value = r.get(key) if hasattr(r, "get") else None
        return None if value is None or pd.isna(value) else value

    page = opt("page")
    folio = opt("folio_pfn")
    return Violation(invariant, r["kernel"], int(r["step"]), opt("map"),
                     None if page is None else int(page), message, action=opt("action"),
                     proc=proc if proc is not None else opt("proc"),
                     folio_pfn=None if folio is None else int(folio), field=fld,
                     expected=None if expected is None else str(expected),
                     actual=None if actual is None else str(actual))


def _inv_back_to_start(pages: pd.DataFrame, _steps: pd.DataFrame) -> Iterable[Violation]:
    """no-leak: once nothing maps, pins or splices a page, its refcount and
    mapcount are back to their values before the first step."""
    for (_kernel, _map, _page), g in pages.groupby(["kernel", "map", "page"]):
        g = g.sort_values("step")
        start, last = g.iloc[0], g.iloc[-1]
        if start["step"] != 0:
            continue  # watched from a later step (a notebook session): no baseline
        released = pd.isna(last["proc"]) and not last["pinned"] and not last["in_pipe"]
        if not released:
            continue
        for fld in ("refcount", "mapcount"):
            if last[fld] != start[fld]:
                yield _v("no-leak", last, f"{fld} is {last[fld]} after everything was released, "
                         f"{start[fld]} before the first step", fld=fld, expected=start[fld],
                         actual=last[fld])


def _inv_floors(pages: pd.DataFrame, _steps: pd.DataFrame) -> Iterable[Violation]:
    """floors: no raw mapcount below -1, no device page refcount below 1."""
    for _, r in pages.iterrows():
        for fld in ("mapcount", "entire_mapcount", "large_mapcount"):
            if not pd.isna(r[fld]) and r[fld] < -1:
                yield _v("floors", r, f"{fld} is {r[fld]}, below -1 (an underflow)", fld=fld,
                         expected=">= -1", actual=r[fld])
        if r["refcount"] < 1:
            yield _v("floors", r, f"refcount is {r['refcount']}, below 1 on a device page in "
                     "use", fld="refcount", expected=">= 1", actual=r["refcount"])


_LEVEL_SIZE = {"PTE": 1 << 12, "PMD": 1 << 21, "PUD": 1 << 30}
# include/linux/mm_types.h (CONFIG_PAGE_MAPCOUNT): the bit of _nr_pages_mapped
# that says the folio is mapped entirely (by a PMD or PUD).
ENTIRELY_MAPPED = 0x800000


def _entries(timeline: pd.DataFrame) -> pd.DataFrame:
    """The present page-table entries of the timeline: one row per (kernel,
    step, folio, process, level, entry): pages of one folio under one PMD or
    PUD share that entry."""
    mapped = timeline[timeline["pt_present"].fillna(False).astype(bool)].copy()
    span = mapped["pt_level"].map(_LEVEL_SIZE).astype("UInt64")
    mapped["entry"] = mapped["vaddr"] - mapped["vaddr"] % span
    return mapped.drop_duplicates(["kernel", "step", "folio_pfn", "proc", "pt_level", "entry"])


def _counts_mappings(steps: pd.DataFrame) -> dict[str, bool | None]:
    """Per kernel: does a device-dax fault map the folio (probed from the
    fault handler's code, `lab.inspect.probes`)? None: unknown."""
    if "counts_mappings" not in steps.columns:
        return {}
    out = {}
    for kernel, g in steps.groupby("kernel"):
        value = g["counts_mappings"].dropna()
        out[kernel] = None if value.empty else bool(value.iloc[0])
    return out


class _Counted:
    """The entries of a timeline counted once (per kernel, step and PFN or
    folio), and one row per folio and per page to check against them."""

    def __init__(self, timeline: pd.DataFrame):
        entries = _entries(timeline)
        ptes = entries[entries["pt_level"] == "PTE"]
        huge = entries[entries["pt_level"] != "PTE"]
        key = ["kernel", "step"]
        self.ptes_by_pfn = ptes.groupby([*key, "pfn"]).size().to_dict()
        self.ptes_by_folio = ptes.groupby([*key, "folio_pfn"]).size().to_dict()
        self.huge_by_folio = huge.groupby([*key, "folio_pfn"]).size().to_dict()
        self.folios = timeline.drop_duplicates([*key, "folio_pfn"])
        self.pages = timeline.drop_duplicates([*key, "pfn"])

    def folio(self, r) -> tuple[int, int]:
        """(PMD/PUD entries, PTE entries) mapping the folio of row *r*."""
        k = (r["kernel"], r["step"], r["folio_pfn"])
        return self.huge_by_folio.get(k, 0), self.ptes_by_folio.get(k, 0)


def _inv_rmap(timeline: pd.DataFrame, steps: pd.DataFrame) -> Iterable[Violation]:
    """rmap, on a kernel whose device-dax faults map folios: every folio's
    mapcounts match the page-table entries that map it, in every process.
    Order 0: ``_mapcount + 1`` = PTEs mapping the page. A large folio:
    ``_entire_mapcount + 1`` = PMD/PUD entries; ``_large_mapcount + 1`` = all
    its entries (a PMD or PUD counts once, each PTE once: folio_mapcount());
    ``_nr_pages_mapped`` has ENTIRELY_MAPPED set exactly while a PMD/PUD maps
    it. A kernel whose faults insert PFNs is checked by ``flat`` instead."""
    counts = _counts_mappings(steps)
    counting = [k for k, v in counts.items() if v is True]
    if not counting:
        return
    timeline = timeline[timeline["kernel"].isin(counting)]
    c = _Counted(timeline)
    for _, row in c.pages[c.pages["order"] == 0].iterrows():
        n = c.ptes_by_pfn.get((row["kernel"], row["step"], row["pfn"]), 0)
        if row["mapcount"] + 1 != n:
            yield _v("rmap", row, f"{n} PTE(s) map the page, _mapcount says "
                     f"{row['mapcount'] + 1}", fld="mapcount", expected=n - 1,
                     actual=row["mapcount"])
    for _, r in c.folios[c.folios["order"] > 0].iterrows():
        huge, ptes = c.folio(r)
        if not pd.isna(r["entire_mapcount"]) and r["entire_mapcount"] + 1 != huge:
            yield _v("rmap", r, f"{huge} PMD/PUD entr{'y' if huge == 1 else 'ies'} map the "
                     f"folio, _entire_mapcount says {r['entire_mapcount'] + 1}",
                     fld="entire_mapcount", expected=huge - 1, actual=r["entire_mapcount"])
        if not pd.isna(r["large_mapcount"]):
            total = huge + ptes
            # unwatched pages of the folio may be PTE-mapped too: exact only without PTEs
            wrong = (r["large_mapcount"] + 1 != total) if not ptes else (
                r["large_mapcount"] + 1 < total)
            if wrong:
                yield _v("rmap", r, f"{total} entries map the folio, _large_mapcount says "
                         f"{r['large_mapcount'] + 1}", fld="large_mapcount",
                         expected=total - 1, actual=r["large_mapcount"])
        if not pd.isna(r["nr_pages_mapped"]):
            entirely = bool(int(r["nr_pages_mapped"]) & ENTIRELY_MAPPED)
            if entirely != (huge > 0):
                yield _v("rmap", r, f"{huge} PMD/PUD entries map the folio, _nr_pages_mapped "
                         f"{int(r['nr_pages_mapped']):#x} says {'it is' if entirely else 'not'}"
                         " entirely mapped", fld="nr_pages_mapped",
                         expected="ENTIRELY_MAPPED set" if huge else "ENTIRELY_MAPPED clear",
                         actual=f"{int(r['nr_pages_mapped']):#x}")


def _inv_refs(timeline: pd.DataFrame, steps: pd.DataFrame) -> Iterable[Violation]:
    """refs: a folio's refcount is explained exactly. It is 1 at rest
    (__init_zone_device_page; free_zone_device_folio() sets it back), plus
    one per page-table entry on a kernel whose faults map folios, plus what
    pins hold (GUP_PIN_COUNTING_BIAS per pin of an order-0 folio; one per pin
    of a large folio, whose _pincount counts the same: io_uring keeps one
    pin per folio of a buffer), plus one per page held by a pipe (vmsplice
    takes page references)."""
    counts = _counts_mappings(steps)
    known = [k for k, v in counts.items() if v is not None]
    if not known:
        return
    c = _Counted(timeline[timeline["kernel"].isin(known)])
    for _, r in c.folios.iterrows():
        huge, ptes = c.folio(r)
        n_entries = huge + ptes if counts[r["kernel"]] else 0
        pins = int(r["folio_pins"]) if not pd.isna(r.get("folio_pins")) else 0
        pipes = int(r["folio_pipe_refs"]) if not pd.isna(r.get("folio_pipe_refs")) else 0
        pin_refs = pins * (GUP_PIN_COUNTING_BIAS if r["order"] == 0 else 1)
        expected = 1 + n_entries + pin_refs + pipes
        if r["refcount"] != expected:
            parts = ["1 idle"]
            if n_entries:
                parts.append(f"{n_entries} entr{'y' if n_entries == 1 else 'ies'}")
            if pin_refs:
                parts.append(f"{pin_refs} for pins")
            if pipes:
                parts.append(f"{pipes} for pipes")
            yield _v("refs", r, f"refcount {r['refcount']}, expected {expected} "
                     f"({' + '.join(parts)}): {r['refcount'] - expected:+d} unexplained",
                     fld="refcount", expected=expected, actual=r["refcount"])
        if r["order"] > 0 and not pd.isna(r["pincount"]) and r["pincount"] != pins:
            yield _v("refs", r, f"{pins} pin(s) of the folio, _pincount says "
                     f"{r['pincount']}", fld="pincount", expected=pins, actual=r["pincount"])


def _inv_flat(timeline: pd.DataFrame, steps: pd.DataFrame) -> Iterable[Violation]:
    """flat, on a kernel whose device-dax faults insert PFNs (devmap
    entries, before 6.15): every entry mapping a device page is special or
    devmap (so vm_normal_page() finds no page behind it) and no mapcount
    moves: _mapcount, _entire_mapcount and _large_mapcount stay -1."""
    counts = _counts_mappings(steps)
    for _, r in timeline.iterrows():
        if counts.get(r["kernel"]) is not False:
            continue
        if r["pt_present"] is True and not (r["pt_special"] is True or r["pt_devmap"] is True):
            yield _v("flat", r, f"a {r['pt_level']} entry maps the page without the special or "
                     "devmap bit", fld="pt_devmap", expected="special or devmap",
                     actual="neither")
        for fld in ("mapcount", "entire_mapcount", "large_mapcount"):
            if not pd.isna(r[fld]) and r[fld] != -1:
                yield _v("flat", r, f"{fld} is {r[fld]} on a kernel whose mappings do not "
                         "count", fld=fld, expected=-1, actual=r[fld])


def _inv_pgmap_stable(_pages: pd.DataFrame, steps: pd.DataFrame) -> Iterable[Violation]:
    """pgmap-ref-stable: mapping and unmapping leave the dev_pagemap's
    percpu_ref count unchanged. The references are taken in bulk when the
    pages are created (pagemap_range) and dropped by memunmap_pages(); on
    6.12 GUP takes one only while it follows a page, and neither kernel
    keeps one for a pin's lifetime (docs/glossary.md)."""
    neutral = pgmap_neutral_actions()
    for _kernel, g in steps.groupby("kernel"):
        g = g.sort_values("step")
        before = None
        for _, r in g.iterrows():
            if before is not None and r["action"] in neutral and r["pgmap_ref"] != before:
                yield _v("pgmap-ref-stable", r, f"dev_pagemap reference count "
                         f"{r['pgmap_ref']} after {r['action']}, {before} before it",
                         fld="pgmap_ref", expected=before, actual=r["pgmap_ref"])
            before = r["pgmap_ref"]


def _inv_pin_visible(pages: pd.DataFrame, _steps: pd.DataFrame) -> Iterable[Violation]:
    """pin-visible: while a long-term pin is held, the pinned folio shows it
    (pincount > 0 for a large folio; refcount >= GUP_PIN_COUNTING_BIAS for an
    order-0 one)."""
    for _, r in pages[pages["pinned"].fillna(False).astype(bool)].iterrows():
        if r["order"] > 0 and not pd.isna(r["pincount"]):
            shows, fld = r["pincount"] > 0, "pincount"
        else:
            shows, fld = r["refcount"] >= GUP_PIN_COUNTING_BIAS, "refcount"
        if not shows:
            yield _v("pin-visible", r, f"pinned, but refcount {r['refcount']} and pincount "
                     f"{_fmt(r['pincount'])} do not show the pin", fld=fld,
                     expected=f">= {GUP_PIN_COUNTING_BIAS}" if fld == "refcount" else "> 0",
                     actual=r[fld])


def _inv_rss(processes: pd.DataFrame | None, steps: pd.DataFrame,
             kernel_messages: pd.DataFrame | None = None) -> Iterable[Violation]:
    """rss: a process's device-dax mappings are in the right counter. On a
    kernel whose faults map folios, MM_FILEPAGES counts every device page
    mapped (1 a PTE, 512 a PMD, 262144 a PUD: the inserts add the folio's
    pages to mm_counter_file()), so it is at least what the watched entries
    map; on one that inserts PFNs, device mappings move no counter, so a
    process's MM_FILEPAGES stays what it was when it appeared. On any
    kernel, a "Bad rss-counter state" line (check_mm() at exit) breaks it."""
    counts = _counts_mappings(steps)
    if processes is not None and len(processes):
        first: dict[tuple, int] = {}
        for _, r in processes.sort_values(["kernel", "step"]).iterrows():
            if pd.isna(r["file_pages"]) or counts.get(r["kernel"]) is None:
                continue
            pages = int(r["device_pte"]) + 512 * int(r["device_pmd"]) + (
                262144 * int(r["device_pud"]))
            key = (r["kernel"], r["proc"], r["pid"])
            base = first.setdefault(key, int(r["file_pages"]))
            if counts[r["kernel"]] and r["file_pages"] < pages:
                yield _v("rss", r, f"MM_FILEPAGES is {r['file_pages']} while the watched entries "
                         f"map {pages} device pages", fld="file_pages", expected=f">= {pages}",
                         actual=r["file_pages"])
            elif not counts[r["kernel"]] and r["file_pages"] != base:
                yield _v("rss", r, f"MM_FILEPAGES moved from {base} to {r['file_pages']} on a "
                         "kernel whose device-dax mappings are not counted", fld="file_pages",
                         expected=base, actual=r["file_pages"])
    if kernel_messages is not None and len(kernel_messages):
        for _, r in kernel_messages[kernel_messages["kind"] == "rss-counter"].iterrows():
            yield _v("rss", r, f"the kernel complained at exit: {r['text']}")


# name -> (check, whether it reads every row (True) or one row per page)
INVARIANTS = {
    "rmap": (_inv_rmap, True),
    "refs": (_inv_refs, True),
    "flat": (_inv_flat, True),
    "no-leak": (_inv_back_to_start, False),
    "floors": (_inv_floors, False),
    "pgmap-ref-stable": (_inv_pgmap_stable, False),
    "pin-visible": (_inv_pin_visible, False),
}


def check_invariants(timeline: pd.DataFrame, steps: pd.DataFrame,
                     processes: pd.DataFrame | None = None,
                     kernel_messages: pd.DataFrame | None = None) -> list[Violation]:
    """Every violation of every invariant in :data:`INVARIANTS` (and of
    ``rss`` when the run recorded processes or kernel messages), the
    earliest step first (then in the order of INVARIANTS)."""
    pages = _per_page(timeline)
    out: list[Violation] = []
    for check, every_row in INVARIANTS.values():
        out.extend(check(timeline if every_row else pages, steps))
    out.extend(_inv_rss(processes, steps, kernel_messages))
    order = [*INVARIANTS, "rss"]
    return sorted(out, key=lambda v: (v.step, order.index(v.invariant)))
