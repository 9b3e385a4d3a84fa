"""Each invariant of lab.timeline, on recorded frames that keep it and on the
same frames changed in one place to break it: the violation names the
invariant, the kernel, the step, the page, the field, expected and actual.

The frames are df_timeline/df_steps of the golden records of real runs
(tests/golden/records/, see tests/golden/README.md); only the one value a
test changes is not real.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest

from lab import timeline as tl

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
sys.path.insert(0, str(GOLDEN))

from records import load  # noqa: E402

RECORDED = ["fork-share", "fault-2m", "pin-longterm", "splice-transient", "partial-munmap-2m"]


def _frames(run: str, kernel: str = "after") -> tuple[pd.DataFrame, pd.DataFrame]:
    runs = [r for r in load(GOLDEN / "records" / f"{run}.json") if r.kernel == kernel]
    return tl.df_timeline(runs), tl.df_steps(runs)


def _violations(timeline, steps, name):
    return [v for v in tl.check_invariants(timeline, steps) if v.invariant == name]


def _row(t, **where):
    mask = pd.Series(True, index=t.index)
    for k, v in where.items():
        mask &= t[k] == v
    return t.index[mask.fillna(False)]


@pytest.mark.parametrize("kernel", ["before", "after"])
@pytest.mark.parametrize("run", RECORDED)
def test_every_recorded_run_keeps_every_invariant(run, kernel):
    t, s = _frames(run, kernel)
    assert s["counts_mappings"].iloc[0] == (kernel == "after")  # probed from the fault handler
    assert tl.check_invariants(t, s) == []


def test_rmap_order_0():
    t, s = _frames("fork-share")
    rows = _row(t, step=4, page=2)  # a and b both map page 2 by PTE
    assert len(rows) == 2 and set(t.loc[rows, "mapcount"]) == {1}
    t.loc[rows, "mapcount"] = 0
    found = _violations(t, s, "rmap")
    assert len(found) == 1
    v = found[0]
    assert (v.kernel, v.step, v.action, v.map, v.page, v.field) == ("after", 4, "touch", "m", 2,
                                                                  "mapcount")
    assert (v.expected, v.actual) == ("1", "0")
    assert v.message == "2 PTE(s) map the page, _mapcount says 1"


def test_rmap_large_folio():
    t, s = _frames("fault-2m")
    rows = _row(t, step=2, page=0)
    t.loc[rows, "entire_mapcount"] = 1
    t.loc[rows, "large_mapcount"] = 1
    found = {v.field: v for v in _violations(t, s, "rmap")}
    assert set(found) == {"entire_mapcount", "large_mapcount"}
    assert found["entire_mapcount"].message == ("1 PMD/PUD entry map the folio, "
                                                "_entire_mapcount says 2")
    assert (found["large_mapcount"].expected, found["large_mapcount"].actual) == ("0", "1")
    t, s = _frames("fault-2m")
    t.loc[_row(t, step=2, page=0), "nr_pages_mapped"] = 0
    (v,) = _violations(t, s, "rmap")
    assert v.field == "nr_pages_mapped" and v.step == 2


def test_refs_names_the_unexplained_reference():
    t, s = _frames("pin-longterm")
    rows = _row(t, step=3, page=1)  # pinned and mapped: 1 + 1 entry + 1024
    assert set(t.loc[rows, "refcount"]) == {1026}
    t.loc[rows, "refcount"] = 1025
    (v,) = _violations(t, s, "refs")
    assert (v.step, v.action, v.page, v.field, v.expected, v.actual) == (
        3, "pin", 1, "refcount", "1026", "1025")
    assert v.message == ("refcount 1025, expected 1026 (1 idle + 1 entry + 1024 for pins): "
                         "-1 unexplained")


def test_refs_counts_pipes_on_both_kernels():
    for kernel, entry in (("before", 0), ("after", 1)):
        t, s = _frames("splice-transient", kernel)
        rows = _row(t, step=3, page=4)  # spliced into the pipe, still mapped
        assert set(t.loc[rows, "refcount"]) == {2 + entry}
        t.loc[rows, "folio_pipe_refs"] = 0
        (v,) = _violations(t, s, "refs")
        assert v.kernel == kernel and "+1 unexplained" in v.message


def test_flat_on_a_kernel_that_does_not_count():
    t, s = _frames("fault-2m", "before")
    rows = _row(t, step=2, page=0)
    t.loc[rows, "pt_devmap"] = False
    (v,) = _violations(t, s, "flat")
    assert (v.kernel, v.step, v.field) == ("before", 2, "pt_devmap")
    assert "without the special or devmap bit" in v.message
    t, s = _frames("fork-share", "before")
    t.loc[_row(t, step=2, page=0), "mapcount"] = 0
    (v,) = _violations(t, s, "flat")
    assert (v.field, v.expected, v.actual) == ("mapcount", "-1", "0")


def test_no_leak():
    t, s = _frames("fork-share")
    last = t["step"].max()
    row = _row(t, step=last, page=0)[0]
    t.loc[row, "refcount"] += 1
    found = _violations(t, s, "no-leak")
    assert len(found) == 1 and (found[0].step, found[0].page) == (last, 0)
    assert "refcount is 2 after everything was released, 1 before" in found[0].message


def test_floors():
    t, s = _frames("fault-2m")
    row = _row(t, step=1, page=0)[0]
    t.loc[row, "mapcount"] = -2
    found = _violations(t, s, "floors")
    assert len(found) == 1 and found[0].step == 1 and "below -1" in found[0].message


def test_pgmap_ref_stable():
    t, s = _frames("fault-2m")
    touch = s.index[s["action"] == "touch"][0]
    s.loc[touch, "pgmap_ref"] += 1
    v = _violations(t, s, "pgmap-ref-stable")[0]  # (the next neutral step moves it back)
    assert v.step == s.loc[touch, "step"] and "after touch" in v.message
    assert (v.expected, v.actual) == (str(s.loc[touch, "pgmap_ref"] - 1),
                                      str(s.loc[touch, "pgmap_ref"]))


def test_pin_visible():
    t, s = _frames("pin-longterm")
    rows = _row(t, step=3, page=0)
    t.loc[rows, "refcount"] -= tl.GUP_PIN_COUNTING_BIAS
    assert {v.invariant for v in tl.check_invariants(t, s)} == {"refs", "pin-visible"}


def test_violations_are_ordered_by_step_and_become_a_frame():
    t, s = _frames("fork-share")
    t.loc[_row(t, step=4, page=2), "mapcount"] = 0
    t.loc[_row(t, step=2, page=0), "refcount"] = 5
    found = tl.check_invariants(t, s)
    assert [v.step for v in found] == sorted(v.step for v in found)
    frame = tl.df_violations(found)
    assert list(frame.columns) == list(tl.VIOLATION_COLUMNS)
    assert frame.iloc[0]["step"] == 2 and frame.iloc[0]["invariant"] == "refs"


def _hwpoison(kernel: str):
    runs = [r for r in load(GOLDEN / "records" / "hwpoison-4k.json") if r.kernel == kernel]
    for r in runs:  # captured before the probe existed: what it answers on these kernels
        r.counts_mappings = kernel == "after"
    return (tl.df_timeline(runs), tl.df_steps(runs), tl.df_processes(runs),
            tl.df_kernel_messages(runs))


@pytest.mark.parametrize("kernel", ["before", "after"])
def test_rss_holds_on_the_recorded_memory_failure(kernel):
    assert tl.check_invariants(*_hwpoison(kernel)) == []


def test_rss_broken():
    t, s, p, k = _hwpoison("after")
    row = p.index[(p["step"] == 4) & (p["proc"] == "b")][0]
    p.loc[row, "file_pages"] = 0  # b maps page 1 by a PTE: MM_FILEPAGES must count it
    (v,) = [v for v in tl.check_invariants(t, s, p, k) if v.invariant == "rss"]
    assert (v.step, v.proc, v.field, v.expected, v.actual) == (4, "b", "file_pages", ">= 1", "0")
    t, s, p, k = _hwpoison("before")
    p.loc[p.index[(p["step"] == 2) & (p["proc"] == "a")], "file_pages"] = 1
    (v,) = [v for v in tl.check_invariants(t, s, p, k) if v.invariant == "rss"]
    assert v.step == 2 and "moved from 0 to 1" in v.message
    k = pd.DataFrame([{"kernel": "before", "step": 7, "action": "exit", "kind": "rss-counter",
                       "text": "BUG: Bad rss-counter state mm:00000000 type:MM_FILEPAGES val:-1"}])
    t, s, p, _ = _hwpoison("before")
    (v,) = [v for v in tl.check_invariants(t, s, p, k) if v.invariant == "rss"]
    assert v.step == 7 and "Bad rss-counter state" in v.message


def test_pgmap_ref_stable_checks_neutral_steps_after_a_pin_too():
    t, s = _frames("pin-longterm")
    munmap = s.index[s["action"] == "munmap"][0]  # after the pin step
    s.loc[munmap, "pgmap_ref"] += 3
    (v,) = _violations(t, s, "pgmap-ref-stable")[:1]
    assert v.step == s.loc[munmap, "step"] and "after munmap" in v.message


def test_no_leak_needs_a_baseline_from_step_0():
    t, s = _frames("fork-share")
    late = t[t["step"] >= 2].copy()  # as a notebook session watches: from the touch on
    late.loc[late["step"] == late["step"].max(), "refcount"] = 1
    assert _violations(late, s, "no-leak") == []
