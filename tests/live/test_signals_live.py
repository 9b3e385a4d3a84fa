"""Signals, kernel kills and RSS counters on both kernels, live.

scenarios/hwpoison-4k.toml: madvise(MADV_HWPOISON) of a mapped 4K device
page sends the caller SIGBUS BUS_MCEERR_AR (memory_failure_dev_pagemap ->
mf_generic_kill_procs -> kill_proc); the worker survives it and the later
steps work; the console's memory-failure lines belong to that step. A
worker killed with SIGKILL shows as exited at the step where it died, and a
later step that uses it fails its check in one line. MM_FILEPAGES grows by
one for a 4K write fault on `after` (insert_page_into_pte_locked:
inc_mm_counter(mm, mm_counter_file(folio))) and not on `before` (insert_pfn
touches no RSS counter).
"""

from __future__ import annotations

import errno
import signal
from pathlib import Path

import pytest

from lab import timeline as tl
from lab.actions import CHECK_ERRNO
from lab.guest import StepError
from lab.runner import Recorder, run_scenario
from lab.scenario import load_scenario

pytestmark = pytest.mark.live

ROOT = Path(__file__).resolve().parents[2]
MADVISE_STEP = 5


@pytest.fixture(scope="module")
def hwpoison(session):
    return run_scenario(session, load_scenario(ROOT / "scenarios" / "hwpoison-4k.toml"))


def test_hwpoison_sigbus_is_recorded_and_survived(session, hwpoison):
    steps = {st.step: st for st in hwpoison.steps}
    st = steps[MADVISE_STEP]
    assert (st.action, st.errno, st.error) == ("madvise", None, None)
    a_page_1 = next(pr.vaddr for pr in steps[2].pages if pr.proc == "a")
    (sig,) = st.signals
    assert (sig.proc, sig.signal, sig.code, sig.addr, sig.addr_lsb, sig.survived, sig.during) == (
        "a", signal.SIGBUS, 4, a_page_1, 12, True, "madvise")  # 4: BUS_MCEERR_AR, 12: a PTE
    assert [k for k, _ in st.kernel_messages] == ["memory-failure", "memory-failure"]
    assert "Sending SIGBUS to w:a:" in st.kernel_messages[0][1]
    assert st.kernel_messages[1][1].endswith("recovery action for dax page: Recovered")
    assert not st.complaints
    # the page is poisoned and unmapped from a and from b (b got no signal)
    assert all("PG_hwpoison" in pr.folio.flags for pr in st.pages)
    assert all(pr.pte is None for pr in st.pages)
    # a survived: touching the page again works (the fault path ignores PG_hwpoison)
    again = steps[MADVISE_STEP + 1]
    assert (again.errno, again.signals) == (None, ())
    assert next(pr for pr in again.pages if pr.proc == "a").pte.level == "PTE"
    assert all(s.errno is None for s in hwpoison.steps)
    assert sum(len(s.signals) for s in hwpoison.steps) == 1
    frame = tl.df_signals([hwpoison])
    assert list(frame["si_code"]) == ["BUS_MCEERR_AR"] and frame["survived"].all()


def test_a_4k_write_fault_is_counted_in_mm_filepages_on_after_only(session, hwpoison):
    frame = tl.df_processes([hwpoison]).set_index(["step", "proc"])
    before_fault, after_fault = (frame.loc[(s, "a"), "file_pages"] for s in (1, 2))
    counted = 1 if session.kernel.name == "after" else 0
    assert after_fault - before_fault == counted
    # the memory failure's zap uncounts it (after), the re-fault counts it again
    assert frame.loc[(MADVISE_STEP, "a"), "file_pages"] == before_fault
    assert frame.loc[(MADVISE_STEP + 1, "a"), "file_pages"] == before_fault + counted
    assert frame.loc[(1, "a"), "device_pte"] == 0 and frame.loc[(2, "a"), "device_pte"] == 1
    assert frame.loc[(2, "a"), "pid"] == session.agent.procs()["a"]


def test_a_worker_killed_by_sigkill_shows_as_exited(session):
    rec = Recorder(session, session.vm.device(4096))
    for action, fields in (("mmap", {"proc": "k", "name": "km", "length": "16K"}),
                           ("touch", {"map": "km", "pages": [0], "write": True}),
                           ("fork", {"proc": "k", "child": "j"})):
        assert rec.step(rec.check(action, fields)).errno is None
    step = rec.check("touch", {"map": "km", "proc": "j", "pages": [0], "write": True})
    pid = session.agent.kill("j", signal.SIGKILL)  # as the OOM killer would
    record = rec.step(step)
    assert record.errno == errno.ESRCH  # the agent: "process j has exited"
    assert record.exited == (("j", "killed by SIGKILL"),)
    assert [(s.proc, s.pid, s.signal, s.survived) for s in record.signals] == [
        ("j", pid, signal.SIGKILL, False)]
    assert "j" not in {p.proc for p in record.processes}
    assert rec.model.procs["j"].exited_at == record.step
    with pytest.raises(StepError, match=r'process "j" exited at step \d+ \(killed by SIGKILL\)'):
        rec.check("touch", {"map": "km", "proc": "j", "pages": [0]})
    late = rec.step(step, strict=False)  # a scenario step: recorded, not raised
    assert late.errno == CHECK_ERRNO and "killed by SIGKILL" in late.error
    assert rec.step(rec.check("touch", {"map": "km", "pages": [1], "write": True})).errno is None


def test_rss_counters_agree_with_the_guests_smaps(session):
    """The page walk behind /proc/PID/smaps counts a mapped page only where
    vm_normal_page() finds one: on `before` the devmap PTE is special (no
    page, Rss 0), on `after` the folio is there (Rss 4K). The counter drgn
    reads moves by the same amount."""
    rec = Recorder(session, session.vm.device(4096))
    rec.step(rec.check("mmap", {"proc": "r", "name": "rm", "length": "16K"}))
    before = next(p for p in rec.result.steps[-1].processes if p.proc == "r")
    rec.step(rec.check("touch", {"map": "rm", "pages": [2], "write": True}))
    after = next(p for p in rec.result.steps[-1].processes if p.proc == "r")
    addr = rec.model.procs["r"].views["rm"].addr
    (vma,) = [v for v in session.agent.maps("r", smaps=True) if v["start"] == addr]
    assert (after.file_pages - before.file_pages) * 4096 == vma["rss"]
    assert vma["rss"] == (4096 if session.kernel.name == "after" else 0)
    assert (after.anon_pages, after.shmem_pages) == (before.anon_pages, before.shmem_pages)
