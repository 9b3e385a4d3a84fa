"""Watchpoint events on both kernels (lab.events): every change of a watched
folio's counters during fault-4k, fork-share, pin-longterm and fault-2m,
accounted for; who made them; what a watch costs the guest when it is gone;
bad questions."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from lab import Lab, inspect
from lab.experiment import run_experiment
from lab.model import UserError

from lab.session import Session

pytestmark = pytest.mark.live

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = ROOT / "scenarios"
NAMES = ("fault-4k", "fork-share", "pin-longterm", "fault-2m")


@pytest.fixture(scope="module")
def watched():
    """The four scenarios on before and after, every watched page's folio
    watched (fault-4k with stacks)."""
    return {name: run_experiment(SCENARIOS / f"{name}.toml", ["before", "after"],
                                 events="stacks" if name == "fault-4k" else "counts",
                                 say=lambda *_: None)
            for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_accounting_holds(watched, name):
    f = watched[name].frames
    acc = f["accounting"]
    # every watched counter of every watched folio, after every step, on both kernels
    steps = len(watched[name].scenario.steps)
    assert set(acc["kernel"]) == {"before", "after"} and set(acc["step"]) == set(range(1, steps + 1))
    assert acc["lost"].eq(0).all(), acc[acc["lost"] != 0]
    assert not (f["events"]["kind"] == "lost").any()
    # the accounting's reading is the snapshot's: refcount after each step
    t = f["timeline"]
    ref = acc[acc["field"] == "refcount"].merge(
        t.drop_duplicates(["kernel", "step", "folio_pfn"])[["kernel", "step", "folio_pfn", "refcount"]],
        on=["kernel", "step", "folio_pfn"])
    assert len(ref) and (ref["read"] == ref["refcount"]).all()


def test_a_4k_write_fault_on_after_is_a_reference_and_a_mapcount(watched):
    ev = watched["fault-4k"].frames["events"]
    fault = ev[(ev["kernel"] == "after") & (ev["step"] == 2)]
    for page in ("m:0", "m:1", "m:4", "m:5"):
        rows = fault[fault["pages"] == page]
        assert sorted(zip(rows["field"], rows["delta"], strict=True)) == [("mapcount", 1), ("refcount", 1)]
        assert rows["stack"].str.contains("dev_dax_huge_fault").all()
        assert rows["stack"].str.contains("__dev_dax_pte_fault").all()
    assert set(fault["writer"]) == {"insert_page_into_pte_locked", "__folio_add_rmap"}
    # the read fault of page 8 is mapped the same way
    assert len(ev[(ev["kernel"] == "after") & (ev["step"] == 3)]) == 2


def test_on_before_mappings_make_no_events(watched):
    for name in ("fault-4k", "fork-share", "fault-2m"):
        ev = watched[name].frames["events"]
        assert not (ev["kernel"] == "before").any(), ev[ev["kernel"] == "before"]
        assert (ev["kernel"] == "after").any()


def test_pins_are_events_on_both_kernels(watched):
    ev = watched["pin-longterm"].frames["events"]
    for kernel in ("before", "after"):
        k = ev[(ev["kernel"] == kernel) & (ev["field"] == "refcount")]
        pin, unpin = k[k["action"] == "pin"], k[k["action"] == "unpin"]
        # pages 0-3 pinned: GUP_PIN_COUNTING_BIAS (1024) each, given back by unpin
        assert pin["delta"].sum() == 4 * 1024 and unpin["delta"].sum() == -4 * 1024
        assert pin["writer"].str.contains("grab_folio|gup_put_folio|try_get_folio").all()
        assert unpin["writer"].str.contains("gup_put_folio|unpin").all()
    b = ev[ev["kernel"] == "before"]
    # on before only GUP moved anything: the pins' +1024s and their release
    assert b["writer"].str.contains("grab_folio|gup_put_folio|try_get_folio|unpin").all()
    assert b["delta"].sum() == 0


def test_a_pmd_mapping_on_after(watched):
    ev = watched["fault-2m"].frames["events"]
    a = ev[(ev["kernel"] == "after") & (ev["step"] == 2)]
    assert set(a["field"]) >= {"refcount", "entire_mapcount", "large_mapcount"}
    assert set(a[a["field"] == "refcount"]["writer"]) == {"insert_pmd"}
    assert (a[a["field"] == "entire_mapcount"]["new"] == 0).all()


def test_cli_run_with_watch_writes_events(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "lab.cli", "run", str(SCENARIOS / "fault-4k.toml"),
                           "--kernel", "after", "--out", str(out), "--watch"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "accounting holds" in proc.stdout
    ev = pd.read_parquet(out / "events.parquet")
    assert len(ev) == 20 and ev["stack"].isna().all()  # 5 faults x 2 + their undoing, no stacks
    html = (out / "report.html").read_text()
    assert "Who changed the counters" in html and "insert_page_into_pte_locked" in html


def test_bad_questions_and_the_guest_keeps_running():
    with Lab.boot("after", events=True, say=lambda *_: None) as lab:
        m = lab.mmap("4K", length="16K")
        with pytest.raises(UserError, match="not on any device-dax namespace"):
            lab.watch(1)  # PFN 1: ordinary RAM
        lab.watch(m, 0)
        lab.touch(m, 0, write=True)
        assert len(lab.events) == 2
        lab.unwatch()
        session = lab._session
        assert not session.watcher.connected
        assert session.vm.qmp.cmd("query-status")["status"] == "running"
        lab.touch(m, 1, write=True)  # the guest runs, snapshots go back to QMP
        assert len(lab.events) == 2 and lab.timeline["step"].max() == 3
    with Lab.boot("after", say=lambda *_: None) as lab:
        m = lab.mmap("4K", length="16K")
        with pytest.raises(UserError, match="booted without events"):
            lab.watch(m, 0)


def test_session_close_with_watches_armed_leaves_nothing_behind():
    s = Session.boot("after", events=True, say=lambda *_: None)
    run_dir, pid = s.vm.spec.run_dir, s.vm.proc.pid
    dev = s.vm.device(4096)
    s.watcher.watch(dev["start"] >> 12)
    assert s.watcher.connected
    s.close()
    assert not run_dir.exists()
    with pytest.raises(ProcessLookupError):
        import os
        os.kill(pid, 0)


def test_a_failure_in_the_hit_thread_leaves_the_guest_running():
    from lab.events import EventsError

    with Session.boot("after", events=True, say=lambda *_: None) as s:
        dev = s.vm.device(4096)
        first = dev["start"] >> 12
        s.watcher.watch(first)
        s.watcher.prog = None  # the next hit's task lookup fails in the hit thread
        addr = s.agent.mmap("a", dev["name"], 4 * 4096)
        s.agent.touch("a", [addr], write=True)  # returns: the thread let the guest go
        with pytest.raises(EventsError, match="watching stopped: .*drgn was detached"):
            with s.stopped():
                pass
        assert not s.watcher.connected
        assert s.vm.qmp.cmd("query-status")["status"] == "running"
        s.agent.touch("a", [addr + 4096], write=True)
        with s.stopped():  # through QMP again
            assert s.vm.qmp.cmd("query-status")["status"] == "paused"
            assert inspect.folio_state(s.prog, first + 1).refcount == 2


@pytest.mark.parametrize("kernel", ["before", "after"])
def test_a_folio_removed_while_watched_is_a_recorded_event(kernel):
    """Unbinding the device removes its memmap: the watched struct page is
    gone. That is an event and an accounting row, not an error or a hang."""
    with Session.boot(kernel, events=True, say=lambda *_: None) as s:
        dev = s.vm.device(4096)
        w = s.watcher
        w.watch(dev["start"] >> 12, stacks=True)
        s.agent.sysfs("/sys/bus/dax/drivers/device_dax/unbind", dev["name"])
        w.step = 1
        with s.stopped():
            rows = w.reconcile()
        assert [(r["field"], r["read"], r["lost"]) for r in rows] == [
            ("refcount", None, None), ("mapcount", None, None)]
        gone = [e for e in w.events if e.kind == "gone"]
        assert [(e.field, e.new, e.delta) for e in gone] == [("refcount", None, None),
                                                              ("mapcount", None, None)]
        assert not w.connected  # nothing left to watch: the stub is let go
        assert s.vm.qmp.cmd("query-status")["status"] == "running" and s.agent.ping()
