"""df_timeline on golden records: the records of real runs (captured with
tests/golden/capture_records.py) give the timeline captured with them, and
every column of lab.columns comes from the record field it names."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest

from lab import columns
from lab import timeline as tl

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
sys.path.insert(0, str(GOLDEN))

from records import load  # noqa: E402


@pytest.mark.parametrize("name", ["fork-share", "fault-2m", "pin-longterm", "splice-transient",
                                  "partial-munmap-2m"])
def test_df_timeline_of_golden_records(name):
    runs = load(GOLDEN / "records" / f"{name}.json")
    frame = tl.df_timeline(runs)
    expected = pd.read_parquet(GOLDEN / "records" / f"{name}.timeline.parquet")
    assert list(frame.columns) == list(columns.names())
    assert dict(frame.dtypes.astype(str)) == columns.dtypes()
    pd.testing.assert_frame_equal(frame, expected)
    # one row per (kernel, step, watched page, process mapping it)
    assert len(frame) == sum(len(st.pages) for run in runs for st in run.steps)


@pytest.mark.parametrize("name", ["fork-share", "fault-2m", "pin-longterm", "splice-transient",
                                  "partial-munmap-2m"])
def test_each_column_comes_from_its_record_field(name):
    runs = load(GOLDEN / "records" / f"{name}.json")
    frame = tl.df_timeline(runs)
    run = runs[-1]
    st = run.steps[-2]
    pr = st.pages[0]
    row = frame[(frame["kernel"] == run.kernel) & (frame["step"] == st.step)].iloc[0]
    assert row["refcount"] == pr.folio.counters["refcount"] == pr.folio.refcount
    assert row["kernel_release"] == run.release
    assert row["pgmap_ref"] == st.pgmap.ref.count
    assert row["flags"] == "|".join(pr.folio.flags)
    if pr.pte is None:
        assert pd.isna(row["pt_level"])
    else:
        assert row["pt_level"] == pr.pte.level and bool(row["pt_young"]) == pr.pte.young


def test_each_difference_is_told_once_with_the_steps_it_spans():
    runs = load(GOLDEN / "records" / "fork-share.json")
    lines = tl.describe_differences(tl.df_diff(tl.df_timeline(runs)), ["before", "after"])
    assert len(lines) == 4, lines
    assert lines[0].startswith("Steps 2-5 (touch, fork, exit), m pages 0-1: on before: "
                               "refcount 1, mapcount -1")
    assert lines[2].startswith("Step 4 (touch), m pages 2-3: on before: refcount 1, mapcount -1"
                               ", pt_special True, pt_devmap True; on after: refcount 3, "
                               "mapcount 1")
    assert len(set(lines)) == len(lines)
