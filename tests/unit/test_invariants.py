"""Each invariant of lab.timeline, on recorded frames that keep it and on the
same frames changed in one place to break it: the violation names the
invariant, the kernel, the step and the page.

The frames are real runs (tests/golden/timeline/, see tests/golden/README.md);
only the one value a test changes is not.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from lab import timeline as tl

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "timeline"


def _frames(run: str, kernel: str = "after") -> tuple[pd.DataFrame, pd.DataFrame]:
    t = pd.read_parquet(GOLDEN / run / "timeline.parquet")
    s = pd.read_parquet(GOLDEN / run / "steps.parquet")
    return (t[t["kernel"] == kernel].reset_index(drop=True),
            s[s["kernel"] == kernel].reset_index(drop=True))


def _violations(timeline, steps, name):
    return [v for v in tl.check_invariants(timeline, steps) if v.invariant == name]


@pytest.mark.parametrize("run", ["compare-fork-share", "compare-fault-2m"])
def test_the_recorded_after_runs_keep_every_invariant(run):
    assert tl.check_invariants(*_frames(run)) == []


def test_refcount_ge_mappings_is_broken_on_before_by_fork_share():
    """The seed change from the other side: on before the two processes'
    PTEs hold no reference."""
    t, s = _frames("compare-fork-share", "before")
    broken = _violations(t, s, "refcount>=mappings")
    assert broken and {v.step for v in broken} == {4}


def test_no_leak():
    t, s = _frames("compare-fork-share")
    last = t["step"].max()
    row = t.index[(t["step"] == last) & t["proc"].isna()][0]
    assert _violations(t, s, "no-leak") == []
    t.loc[row, "refcount"] += 1
    (v,) = _violations(t, s, "no-leak")
    assert (v.kernel, v.step, v.map, v.page) == ("after", last, t.loc[row, "map"],
                                                 t.loc[row, "page"])
    assert "refcount is 2 after everything was released, 1 before" in v.message


def test_floors():
    t, s = _frames("compare-fault-2m")
    row = t.index[t["step"] == 2][0]
    t.loc[row, "mapcount"] = -2
    (v,) = _violations(t, s, "floors")
    assert (v.step, v.page) == (2, t.loc[row, "page"]) and "below -1" in v.message
    t.loc[row, "mapcount"] = -1
    t.loc[row, "refcount"] = 0
    (v,) = _violations(t, s, "floors")
    assert "refcount is 0" in v.message


def test_refcount_ge_mappings():
    t, s = _frames("compare-fork-share")
    # step 4: a and b both map page 2 by PTE; the folio's refcount is 3
    both = t[(t["step"] == 4) & (t["page"] == 2) & t["pt_present"].fillna(False)]
    assert len(both) == 2 and set(both["refcount"]) == {3}
    assert _violations(t, s, "refcount>=mappings") == []
    t.loc[both.index, "refcount"] = 1
    (v,) = _violations(t, s, "refcount>=mappings")
    assert (v.step, v.page) == (4, 2)
    assert v.message == "refcount 1 is below the 2 page-table entries mapping the folio"


def test_pgmap_ref_stable():
    t, s = _frames("compare-fault-2m")
    touch = s.index[s["action"] == "touch"][0]
    s.loc[touch, "pgmap_ref"] += 1
    (v,) = _violations(t, s, "pgmap-ref-stable")
    assert v.step == s.loc[touch, "step"] and "after touch" in v.message


def test_pin_visible():
    t, s = _frames("compare-fork-share")
    row = t.index[(t["step"] == 2) & (t["page"] == 0)][0]
    t.loc[row, "pinned"] = True
    (v,) = _violations(t, s, "pin-visible")
    assert (v.step, v.page) == (2, 0) and "do not show the pin" in v.message
    t.loc[row, "refcount"] += tl.GUP_PIN_COUNTING_BIAS  # what FOLL_PIN adds to an order-0 folio
    assert _violations(t, s, "pin-visible") == []
