"""Shipped scenarios on both kernels: the differences the seed change makes
("device/dax: properly refcount device dax pages when mapping"), checked
against the guest's own /proc/PID/pagemap; invariants; complaints recorded
against their step; reproducibility; the CLI's outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from lab import timeline as tl
from lab.experiment import run_experiment
from lab.scenario import ScenarioError, validate_text

pytestmark = pytest.mark.live

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = ROOT / "scenarios"


@pytest.fixture(scope="module")
def compares():
    """fault-4k, fault-2m, fork-share and pin-longterm on before and after."""
    out = {}
    for name in ("fault-4k", "fault-2m", "fork-share", "pin-longterm"):
        out[name] = run_experiment(SCENARIOS / f"{name}.toml", ["before", "after"], say=lambda *_: None)
    return out


def _page(frame: pd.DataFrame, kernel: str, step: int, page: int, proc: str | None = "a") -> pd.Series:
    rows = frame[(frame["kernel"] == kernel) & (frame["step"] == step) & (frame["page"] == page)]
    rows = rows[rows["proc"].isna()] if proc is None else rows[rows["proc"] == proc]
    assert len(rows) == 1, rows
    return rows.iloc[0]


def _start(frame, kernel, page):
    return _page(frame, kernel, 0, page, proc=None)


def test_pagemap_agrees_with_the_page_tables(compares):
    for exp in compares.values():
        t = exp.frames["timeline"]
        mapped = t[t["pt_present"].fillna(False).astype(bool)]
        assert len(mapped) > 0
        # a PTE maps the page itself; a PMD maps the folio: pagemap names the page
        assert (mapped["pagemap_pfn"] == mapped["pfn"]).all()


def test_fault_4k(compares):
    t = compares["fault-4k"].frames["timeline"]
    for page in (0, 1, 4, 5):
        for kernel in ("before", "after"):
            start, faulted = _start(t, kernel, page), _page(t, kernel, 2, page)
            assert faulted["pt_level"] == "PTE" and faulted["pt_write"]
            if kernel == "after":
                assert faulted["refcount"] == start["refcount"] + 1
                assert faulted["mapcount"] == start["mapcount"] + 1 == 0
                assert not faulted["pt_special"] and pd.isna(faulted["pt_devmap"])
            else:
                assert (faulted["refcount"], faulted["mapcount"]) == (start["refcount"], start["mapcount"])
                assert faulted["pt_special"] and faulted["pt_devmap"]
            gone = _page(t, kernel, 4, page, proc=None)
            assert (gone["refcount"], gone["mapcount"]) == (start["refcount"], start["mapcount"])
    read = _page(t, "after", 3, 8)
    # A read fault of a shared writable mapping maps the page writable (no
    # dirty tracking on device-dax), but nothing has written it yet.
    assert read["pt_write"] and not read["pt_dirty"]
    assert read["refcount"] == _start(t, "after", 8)["refcount"] + 1
    assert not compares["fault-4k"].violations


def test_fault_2m(compares):
    t = compares["fault-2m"].frames["timeline"]
    for kernel in ("before", "after"):
        head_start, head = _start(t, kernel, 0), _page(t, kernel, 2, 0)
        assert head["pt_level"] == "PMD" and head["order"] == 9
        if kernel == "after":
            assert head["refcount"] == head_start["refcount"] + 1
            assert head["entire_mapcount"] == 0 and pd.isna(head["pt_devmap"])
        else:
            assert head["refcount"] == head_start["refcount"] and head["entire_mapcount"] == -1
            assert head["pt_devmap"]
    assert not compares["fault-2m"].violations


def test_fork_share(compares):
    exp = compares["fork-share"]
    t = exp.frames["timeline"]
    # pages 2 and 3: touched by a, then by the child b (step 4)
    for page in (2, 3):
        start = _start(t, "after", page)
        shared = _page(t, "after", 4, page, proc="b")
        assert shared["refcount"] == start["refcount"] + 2 and shared["mapcount"] == 1
        before = _page(t, "before", 4, page, proc="b")
        assert before["refcount"] == _start(t, "before", page)["refcount"] and before["mapcount"] == -1
    # the child's exit drops its mappings: back to one on after
    assert _page(t, "after", 5, 2)["mapcount"] == 0
    # the exact invariants hold on both: on before two devmap entries and no
    # reference (flat), on after one reference and one mapcount per entry
    assert exp.violations == []
    steps = exp.frames["steps"]
    assert dict(zip(steps["kernel"], steps["counts_mappings"])) == {"before": False,
                                                                    "after": True}
    assert any("refcount" in line and "after" in line for line in exp.differences)


def test_pin_longterm(compares):
    exp = compares["pin-longterm"]
    t = exp.frames["timeline"]
    steps = exp.frames["steps"]
    pin_step = int(steps[(steps["kernel"] == "after") & (steps["action"] == "pin")]["step"].iloc[0])
    unpin_step = int(steps[(steps["kernel"] == "after") & (steps["action"] == "unpin")]["step"].iloc[0])
    for kernel in ("before", "after"):
        at_pin = t[(t["kernel"] == kernel) & (t["step"] == pin_step)]
        pinned = at_pin[at_pin["pinned"].astype(bool)]
        assert len(pinned) > 0 and len(pinned) < len(at_pin)
        # FOLL_PIN on an order-0 folio adds GUP_PIN_COUNTING_BIAS, on both kernels
        assert (pinned["refcount"] >= tl.GUP_PIN_COUNTING_BIAS).all()
        assert (at_pin[~at_pin["pinned"].astype(bool)]["refcount"] < tl.GUP_PIN_COUNTING_BIAS).all()
        released = t[(t["kernel"] == kernel) & (t["step"] == unpin_step)]
        starts = t[(t["kernel"] == kernel) & (t["step"] == 0)].set_index("page")["refcount"]
        assert (released.set_index("page")["refcount"] == starts).all()
    assert not [v for v in exp.violations if v.invariant == "pin-visible"]


KMSG = """
title = "a provoked kernel complaint"
[device]
align = "4K"
[[step]]
action = "mmap"
proc = "a"
name = "m"
length = "8K"
[[step]]
action = "kmsg"
text = "<4>WARNING: provoked by tests/live/test_scenarios.py"
[[step]]
action = "touch"
map = "m"
pages = [0]
write = true
"""


def test_kernel_complaint_is_recorded_against_its_step(tmp_path):
    path = tmp_path / "kmsg.toml"
    path.write_text(KMSG)
    exp = run_experiment(path, ["after"], say=lambda *_: None)
    complaints = exp.frames["complaints"]
    assert list(complaints["step"]) == [2] and list(complaints["kind"]) == ["warning"]
    assert "provoked by tests/live" in complaints["text"].iloc[0]
    assert exp.frames["steps"].set_index("step").loc[2, "complaints"] == 1


def test_same_scenario_twice_gives_the_same_timeline():
    runs = [run_experiment(SCENARIOS / "fork-share.toml", ["after"], say=lambda *_: None)
            for _ in range(2)]
    frames = [r.frames["timeline"].drop(columns=["vaddr"]) for r in runs]
    pd.testing.assert_frame_equal(frames[0], frames[1])
    steps = [r.frames["steps"].drop(columns=["seconds"]) for r in runs]
    pd.testing.assert_frame_equal(steps[0], steps[1])


def test_bad_scenario_exits_2_and_boots_nothing(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(KMSG.replace('pages = [0]', 'pages = [99]'))
    proc = subprocess.run([sys.executable, "-m", "lab.cli", "run", str(bad), "--kernel", "after",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "step 3 (touch): pages" in proc.stderr
    assert not (tmp_path / "out").exists()
    with pytest.raises(ScenarioError, match="step 3 \\(touch\\): pages"):
        validate_text(bad.read_text())


def test_cli_compare_writes_every_output(tmp_path, chromium):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "lab.cli", "compare", str(SCENARIOS / "fault-4k.toml"),
                           "--kernels", "before,after", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("timeline.parquet", "timeline.csv", "report.html", "meta.json"):
        assert (out / name).stat().st_size > 0, name
    meta = json.loads((out / "meta.json").read_text())
    assert set(meta["kernels"]) == {"before", "after"}
    assert meta["kernels"]["after"]["release"].startswith("7.2")
    assert meta["scenario"]["sha256"] and "fault" in meta["scenario"]["text"]
    assert meta["accelerator"] in ("tcg", "kvm") and meta["qemu"] and meta["drgn"] and meta["python"]
    t = pd.read_parquet(out / "timeline.parquet")
    assert set(t["kernel"]) == {"before", "after"}
    _check_report_in_chromium(chromium, out / "report.html")


def _check_report_in_chromium(chromium, report: Path) -> None:
    """Open the report from the file in Debian's Chromium (the shared fixture
    of tests/conftest.py): no console errors, every chart drawn; a screenshot
    stays in test-output/."""
    shots = ROOT / "test-output"
    shots.mkdir(exist_ok=True)
    page = chromium.new_page(viewport={"width": 1400, "height": 900})
    try:
        errors = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(report.as_uri())
        page.wait_for_function("document.querySelectorAll('.plotly-graph-div').length > 0")
        drawn = page.evaluate("""() => [...document.querySelectorAll('.plotly-graph-div')]
            .map(el => (el._fullData || []).length)""")
        page.screenshot(path=str(shots / "compare-fault-4k-report.png"), full_page=True)
    finally:
        page.close()
    assert drawn and all(n > 0 for n in drawn), drawn
    assert not errors, errors
