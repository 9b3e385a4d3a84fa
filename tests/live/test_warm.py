"""Warm start for real: a scenario's timeline from a restored guest equals a
cold boot's (apart from addresses and times) on both kernels, with and
without watchpoints (the gdbstub on a restored guest); the restored guest is
the one saved and its clock moves; several runs from one state at once do not
see each other and leave the saved files as they were; `--cold` boots."""

from __future__ import annotations

import concurrent.futures
import hashlib
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from lab import launch, warm
from lab.experiment import run_experiment

pytestmark = pytest.mark.live

ROOT = Path(__file__).resolve().parents[2]
FORK_SHARE = ROOT / "scenarios" / "fork-share.toml"
QUIET = dict(say=lambda *_: None)
# what differs between two runs of one scenario by design: where things are
# mapped, how long things took, which CPU and task a write ran on
EVENT_KEYS = ["step", "action", "kind", "folio_pfn", "pages", "field", "old", "new", "delta",
              "function", "writer"]


def _same_run(cold, warm_):
    pd.testing.assert_frame_equal(cold.frames["timeline"].drop(columns=["vaddr"]),
                                  warm_.frames["timeline"].drop(columns=["vaddr"]))
    pd.testing.assert_frame_equal(cold.frames["steps"].drop(columns=["seconds"]),
                                  warm_.frames["steps"].drop(columns=["seconds"]))


@pytest.mark.parametrize("watch", [None, "counts"])
@pytest.mark.parametrize("kernel", ["before", "after"])
def test_a_warm_timeline_equals_a_cold_one(kernel, watch):
    cold = run_experiment(FORK_SHARE, [kernel], cold=True, events=watch, **QUIET)
    hot = run_experiment(FORK_SHARE, [kernel], events=watch, **QUIET)
    assert cold.runs[0].release == hot.runs[0].release
    _same_run(cold, hot)
    if watch:
        # each folio's changes in their order; between two folios in one
        # step the order is the guest's scheduling (seen once under load)
        events = [r.frames["events"][EVENT_KEYS].sort_values(["step", "folio_pfn"], kind="stable")
                  .reset_index(drop=True) for r in (cold, hot)]
        assert len(events[0]) > 0 if kernel == "after" else True
        pd.testing.assert_frame_equal(events[0], events[1])
        pd.testing.assert_frame_equal(cold.frames["accounting"], hot.frames["accounting"])


def test_restored_guest_is_the_one_saved_and_runs_on():
    spec = launch.boot_spec("after", **QUIET)
    assert spec.restore_from is not None and "-incoming" in launch.Vm(spec).argv
    manifest = warm.make_state(spec, **QUIET)
    with launch.start(spec, **QUIET) as v:
        assert v.restored_at > 0  # restored, not booted
        assert v.time_to_ready < 2.0
        assert v.release == manifest["release"] and v.devices == manifest["devices"]
        first = warm._printk_time(v.sync_console())
        time.sleep(0.3)
        second = warm._printk_time(v.sync_console())
        assert manifest["uptime"] < first < second  # the clock goes on from the save
        addr = v.agent.mmap("w", v.device("2M")["name"], 2 << 20)
        v.agent.touch("w", [addr], write=True)
        assert v.agent.pagemap("w", [addr])[0]["present"]


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def test_runs_from_one_state_at_once_do_not_interfere():
    """Three guests restored from one state at once (what a sweep does): each
    is its own QEMU, maps and write-faults the same device page, and the
    saved RAM, NVDIMM and state files are unchanged afterwards (each guest's
    memory is a private copy-on-write mapping)."""
    spec = launch.boot_spec("before", **QUIET)
    warm.make_state(spec, **QUIET)
    saved = {f.name: _digest(f) for f in sorted(spec.restore_from.iterdir())}

    def one(n: int) -> tuple[int, int]:
        with launch.start(spec, **QUIET) as v:
            dev = v.device("4K")
            addr = v.agent.mmap("w", dev["name"], 4096)
            v.agent.touch("w", [addr], write=True)  # maps it: the PFN is the device's first
            pfn = v.agent.pagemap("w", [addr])[0]["pfn"]
            v.sync_console()
            return pfn, v.proc.pid

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        results = list(pool.map(one, range(3)))
    assert len({pid for _, pid in results}) == 3
    assert len({pfn for pfn, _ in results}) == 1  # the same page of the same device in each
    assert {f.name: _digest(f) for f in sorted(spec.restore_from.iterdir())} == saved


def test_cold_flag_boots_and_the_default_restores():
    def boot(*flags):
        proc = subprocess.run([sys.executable, "-m", "lab.cli", "boot", "--kernel", "before",
                               *flags], capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout

    assert ", restored, ready in" in boot()
    assert ", booted, ready in" in boot("--cold")


def test_a_state_that_is_not_the_guest_saved_falls_back_to_a_cold_boot(tmp_path, monkeypatch):
    """A saved state whose manifest disagrees with what restores (here: its
    release) is not used: one line says so, the guest boots cold, and the
    entry is removed so that the next run saves a good one."""
    import json

    spec = launch.boot_spec("before", cmdline_extra=["devdax_lab.test=stale"], **QUIET)
    manifest = warm.make_state(spec, **QUIET)
    (spec.restore_from / "manifest.json").write_text(json.dumps({**manifest, "release": "9.9"}))
    said = []
    with launch.start(spec, say=said.append) as v:
        assert v.spec.restore_from is None and v.release == manifest["release"]
    assert any("warm start from" in line and "booting cold" in line for line in said), said
    assert not spec.restore_from.exists()
