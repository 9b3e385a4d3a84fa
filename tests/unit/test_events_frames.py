"""Events as frames, call paths and the waterfall, from a recorded run:
fork-share with stack-unwinding watches on `before` and `after`
(tests/golden/events/fork-share.json, made by tests/golden/capture_gdb.py);
and the watcher's answer when the gdbstub does not answer."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from lab import timeline as tl
from lab.events import EventsError, Watcher
from lab.events.watcher import Event
from lab.plots import plot_events

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "events" / "fork-share.json"


def _frames(rows):
    return tuple(tuple(f) for f in rows) if rows is not None else None


@pytest.fixture(scope="module")
def runs():
    out = []
    for r in json.loads(GOLDEN.read_text())["runs"]:
        events = [Event(**{**e, "location": _frames(e["location"]), "stack": _frames(e["stack"])})
                  for e in r["events"]]
        out.append(SimpleNamespace(
            kernel=r["kernel"], events=events, accounting=r["accounting"],
            steps=[SimpleNamespace(**s) for s in r["steps"]],
            watched_folios={pfn: [tuple(p) for p in pages] for pfn, pages in r["watched_folios"]}))
    return out


@pytest.fixture(scope="module")
def events(runs):
    return tl.df_events(runs)


def test_accounting_holds_in_the_recording(runs):
    acc = tl.df_accounting(runs)
    assert len(acc) == 120 and acc["ok"].all()
    assert (acc["start"] + acc["recorded"] == acc["read"]).all()
    # before: nothing moved; after: a's touch of pages 0-3 moved both counters
    after = acc[acc["kernel"] == "after"]
    assert after[(after["step"] == 2) & (after["field"] == "refcount")]["recorded"].tolist() == [1] * 4 + [0]  # pages 0-3 then 6
    assert acc[acc["kernel"] == "before"]["recorded"].eq(0).all()


def test_before_maps_without_events_after_with_two_per_fault(events):
    assert not (events["kernel"] == "before").any()
    a = events[events["kernel"] == "after"]
    faults = a[a["step"] == 2]
    assert sorted(faults["pages"]) == sorted(["m:0", "m:1", "m:2", "m:3"] * 2)
    assert set(zip(faults["field"], faults["delta"], faults["writer"], strict=True)) == {
        ("refcount", 1, "insert_page_into_pte_locked"), ("mapcount", 1, "__folio_add_rmap")}
    assert faults["stack"].str.contains("dev_dax_huge_fault").all()
    assert faults["source"].str.contains(r"mm/memory\.c:\d+|mm/rmap\.c:\d+").all()
    assert (faults["comm"] == "w:a").all() and faults["pid"].notna().all()
    # b's exit: mapcount down by rmap removal, references by folios_put_refs
    exit_ = a[a["step"] == 5]
    assert set(exit_["writer"]) == {"__folio_remove_rmap", "folios_put_refs"}
    assert (exit_["delta"] == -1).all() and (exit_["comm"] == "w:b").all()


def test_events_dtypes_are_nullable(events):
    assert str(events["delta"].dtype) == "Int64" and str(events["stack"].dtype) == "string"
    assert list(events.columns) == list(tl.EVENT_COLUMNS)


def test_call_paths_count_each_way_once(events):
    paths = tl.df_call_paths(events)
    assert len(paths) == 4 and paths["events"].tolist() == [7, 7, 7, 7]
    assert paths["total_delta"].abs().tolist() == [7, 7, 7, 7]
    add = paths[(paths["field"] == "refcount") & (paths["change"] == "+")]["path"].item()
    assert add.startswith("insert_page_into_pte_locked < insert_page < vmf_insert_page_mkwrite")
    assert tl.df_call_paths(events.iloc[0:0]).empty


def test_writer_skips_counter_plumbing():
    frames = (("arch_atomic_inc", None, True), ("page_ref_inc", None, True),
              ("folio_get", None, True), ("insert_pmd", "mm/huge_memory.c:1", False))
    assert tl.writer_of(frames) == "insert_pmd"
    assert tl.writer_of(frames[:2]) == "page_ref_inc"  # all plumbing: the outermost


def test_waterfall_has_a_trace_per_folio_counter_with_writers_on_hover(events, runs):
    fig = plot_events(events, tl.df_steps.__wrapped__(runs) if hasattr(tl.df_steps, "__wrapped__")
                      else None)
    after = events[events["kernel"] == "after"]
    assert len(fig.data) == after.groupby(["folio_pfn", "field"]).ngroups == 10
    assert all(t.type == "waterfall" for t in fig.data)
    hover = " ".join(h for t in fig.data for h in t.hovertext)
    assert "insert_page_into_pte_locked" in hover and "dev_dax_huge_fault" in hover
    first = next(t for t in fig.data if t.name.endswith("refcount"))
    assert first.base == 1 and list(first.y)[:1] == [1]


def test_a_lost_change_is_marked_on_the_chart(events):
    ev = events[events["kernel"] == "after"].head(1).copy()
    ev["kind"] = "lost"  # as Watcher.reconcile records a change no watchpoint saw
    fig = plot_events(ev)
    assert "lost" in fig.data[0].hovertext[0] and list(fig.data[0].text) == ["lost"]


def test_a_gdbstub_that_does_not_answer_is_an_error_not_a_hang(tmp_path):
    path = tmp_path / "gdb.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    held = []
    threading.Thread(target=lambda: held.append(server.accept()), daemon=True).start()
    w = Watcher(path, prog=None, timeout=0.5)
    t = time.monotonic()
    with pytest.raises(EventsError, match="did not answer"):
        with w.paused():
            pass
    assert time.monotonic() - t < 3 and not w.connected
    server.close()


def test_report_has_the_events_section(runs, events, tmp_path):
    from lab import report

    gold = Path(__file__).resolve().parents[1] / "golden" / "timeline" / "compare-fork-share"
    f = {n: pd.read_parquet(gold / f"{n}.parquet")
         for n in ("timeline", "steps", "device", "device_pages", "complaints")}
    acc, paths = tl.df_accounting(runs), tl.df_call_paths(events)
    path = report.build_report(tmp_path, title="fork-share", scenario_text="", meta={}, **f,
                               events=events, accounting=acc, call_paths=paths)
    html = path.read_text()
    assert "Accounting holds" in html and "the 28 recorded change(s)" in html
    assert "fig-events" in html and "folios_put_refs &lt; free_pages_and_swap_cache" in html
    assert html.count("<script type=\"text/javascript\">") <= 2  # plotly.js inline once
    # a counter that moved more than its events: the verdict says so and lists it
    acc.loc[acc.index[-1], "lost"] = -1
    html = report.build_report(tmp_path, title="x", scenario_text="", meta={}, **f,
                               events=events, accounting=acc, call_paths=paths).read_text()
    assert "Accounting: 1 counter/step pair(s) changed by more than the recorded events" in html


def test_accounting_problems_tell_lost_from_gone(runs):
    acc = tl.df_accounting(runs)
    assert all(p.empty for p in tl.accounting_problems(acc))
    acc.loc[acc.index[0], "lost"] = 2  # as reconcile reports a change no hit saw
    acc.loc[acc.index[1], ["read", "lost"]] = None  # and a struct page removed while watched
    lost, gone = tl.accounting_problems(acc)
    assert list(lost.index) == [acc.index[0]] and list(gone.index) == [acc.index[1]]
