"""Expectations of a scenario (``[[expect]]``) checked against a run's
frames: pure, like the invariants in `lab.timeline`.

A page's field is read from the timeline row of that page in the named
process (default: the first process mapping it, by name, else the row with
no process); the device's from `lab.timeline.df_device` (``pgmap_ref`` from
the steps frame); a process's from the processes frame.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence

import pandas as pd

from .scenario import ExpectSpec

__all__ = ["EXPECTATION_COLUMNS", "check_expectations", "failed"]

EXPECTATION_COLUMNS = {
    "expect": "Int64", "kernel": "string", "step": "Int64", "action": "string",
    "object": "string", "field": "string", "wanted": "string", "actual": "string",
    "passed": "boolean", "why": "string", "message": "string",
}


def _plain(value):
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    if hasattr(value, "item"):
        return value.item()
    return value


def _value(spec: ExpectSpec, frames: Mapping[str, pd.DataFrame], kernel: str, step: int):
    """The value of the spec's object and field at *step* on *kernel*
    (None: the run has no such row)."""
    if spec.object == "page":
        t = frames["timeline"]
        rows = t[(t["kernel"] == kernel) & (t["step"] == step) & (t["map"] == spec.map)
                 & (t["page"] == spec.page)]
        if spec.proc is not None:
            rows = rows[rows["proc"] == spec.proc]
        rows = rows.sort_values("proc", na_position="last")
        return _plain(rows.iloc[0][spec.field]) if len(rows) else None
    if spec.object == "device":
        name = "steps" if spec.field == "pgmap_ref" else "device"
        d = frames.get(name)
        if d is None:
            return None
        rows = d[(d["kernel"] == kernel) & (d["step"] == step)]
        return _plain(rows.iloc[0][spec.field]) if len(rows) else None
    p = frames.get("processes")
    if p is None or spec.field not in p.columns:
        return None
    rows = p[(p["kernel"] == kernel) & (p["step"] == step) & (p["proc"] == spec.proc)]
    return _plain(rows.iloc[0][spec.field]) if len(rows) else None


def _compare(spec: ExpectSpec, actual, before) -> bool:
    if actual is None:
        return False
    if spec.op == "equals":
        return actual == spec.value
    if spec.op == "at_least":
        return actual >= spec.value
    if spec.op == "at_most":
        return actual <= spec.value
    return before is not None and actual - before == spec.value


def check_expectations(expects: Sequence[ExpectSpec], frames: Mapping[str, pd.DataFrame],
                       kernels: Iterable[str]) -> pd.DataFrame:
    """One row per (expectation, kernel it applies to): what was wanted,
    the actual value (a delta's actual is the change), whether it passed,
    and one line saying so. :data:`EXPECTATION_COLUMNS`."""
    steps = frames["steps"]
    rows = []
    for spec in expects:
        for kernel in kernels:
            if not fnmatch.fnmatchcase(kernel, spec.kernel):
                continue
            actual = _value(spec, frames, kernel, spec.step)
            before = None
            if spec.op == "delta":
                since = 0 if spec.since == "start" else max(spec.step - 1, 0)
                before = _value(spec, frames, kernel, since)
            passed = _compare(spec, actual, before)
            shown = (actual - before if spec.op == "delta" and None not in (actual, before)
                     else actual)
            action = steps[(steps["kernel"] == kernel) & (steps["step"] == spec.step)]["action"]
            action = action.iloc[0] if len(action) else None
            verdict = "holds" if passed else "FAILS"
            rows.append({
                "expect": spec.index, "kernel": kernel, "step": spec.step, "action": action,
                "object": spec.target, "field": spec.field, "wanted": spec.wanted,
                "actual": "missing" if actual is None else str(shown), "passed": passed,
                "why": spec.why,
                "message": (f"expect {spec.index} {verdict} on {kernel} at step {spec.step}"
                            f"{f' ({action})' if action else ''}: {spec.target} {spec.field} "
                            f"{spec.wanted}, actual "
                            f"{'missing' if actual is None else shown}"),
            })
    return pd.DataFrame(rows, columns=list(EXPECTATION_COLUMNS)).astype(EXPECTATION_COLUMNS)


def failed(expectations: pd.DataFrame) -> pd.DataFrame:
    """The rows that did not hold."""
    if expectations.empty:
        return expectations
    return expectations[~expectations["passed"].fillna(False).astype(bool)]
