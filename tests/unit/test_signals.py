"""Signals, kernel messages and processes as data: the console's
memory-management lines parsed on consoles captured from real runs of
scenarios/hwpoison-4k.toml (tests/golden/capture_hwpoison_console.py), the
signal names, and df_signals / df_processes / df_kernel_messages on the
golden records of the same scenario (tests/golden/capture_records.py
hwpoison-4k) and on hand-made records."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import numpy as np
import pytest

from lab import timeline as tl
from lab.console import MM_KINDS, complaints, find_mm_message, mm_messages
from lab.guest import GuestModel, Proc, StepError, Where
from lab.model import (
    FolioState,
    PageRecord,
    PercpuRefState,
    PgmapState,
    ProcessRecord,
    PteState,
    RunResult,
    SignalRecord,
    StepRecord,
)
from lab.runner import _deaths, _signal_records
from lab.signals import describe_signal, si_code_name, signal_name

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
sys.path.insert(0, str(GOLDEN))

from records import load  # noqa: E402

MADV_PAGE_1 = "0x101201"  # dax0.0 starts at 0x101200000: page 1 of mapping m


# -- console: memory-management messages ----------------------------------------


@pytest.mark.parametrize("kernel", ["before", "after"])
def test_memory_failure_lines_of_a_real_run(kernel):
    lines = (GOLDEN / "console" / f"{kernel}-hwpoison.log").read_text().splitlines()
    found = mm_messages(lines)
    assert [m.kind for m in found] == ["memory-failure", "memory-failure"]
    sending, recovered = found
    assert sending.text.startswith(f"Memory failure: {MADV_PAGE_1}: Sending SIGBUS to w:a:")
    assert sending.text.endswith("due to hardware memory corruption")
    assert recovered.text == f"Memory failure: {MADV_PAGE_1}: recovery action for dax page: Recovered"
    assert not complaints(lines)  # handled as designed: no complaint


@pytest.mark.parametrize("line, kind", [
    ("[ 5.1] Injecting memory failure for pfn 0x101201 at process virtual address 0x7f0000001000",
     "memory-failure"),
    ("[ 5.1] Memory failure: 0x101201: forcibly killing w:a:153 because of failure to unmap "
     "corrupted page", "memory-failure"),
    ("[ 5.1] MCE: Killing w:a:153 due to hardware memory corruption fault at 7f0000001000",
     "memory-failure"),
    ("[ 5.1] Soft offline: 0x1234: page already poisoned", "hwpoison"),
    ("[ 5.1] Unpoison: Software-unpoisoned page 0x1234", "hwpoison"),
    ("[ 5.1] w:a invoked oom-killer: gfp_mask=0x140cca(GFP_HIGHUSER_MOVABLE|__GFP_COMP), order=0",
     "oom"),
    ("[ 5.1] Out of memory: Killed process 153 (w:a) total-vm:4kB, anon-rss:0kB", "oom"),
    ("[ 5.1] oom-kill:constraint=CONSTRAINT_NONE,nodemask=(null),task=w:a,pid=153,uid=0", "oom"),
    ("[ 5.1] BUG: Bad rss-counter state mm:00000000c0ffee type:MM_FILEPAGES val:1 Comm:w:a Pid:153",
     "rss-counter"),
    ("[ 5.1] BUG: Bad page state in process w:a  pfn:101201", "bad-page"),
    ("[ 5.1] BUG: Bad page map in process w:a  pte:8000000101201067 pmd:10c5c067", "bad-page"),
    ("[ 5.1] page: refcount:2 mapcount:0 mapping:0000000000000000 index:0x1 pfn:0x101201",
     "page-dump"),
    ("[ 5.1] flags: 0x17ffffc0002004(referenced|reserved|node=0|zone=4)", "page-dump"),
    ("[ 5.1] raw: 0017ffffc0002004 ffffea0004048048 ffffea0004048048 0000000000000000",
     "page-dump"),
    ("[ 5.1] page dumped because: VM_BUG_ON_FOLIO(!folio_test_large(folio))", "page-dump"),
    ("[ 5.1] w:a: page allocation failure: order:0, mode:0x40cc0(GFP_KERNEL|__GFP_COMP)",
     "alloc-failure"),
])
def test_mm_message_kinds(line, kind):
    found = find_mm_message(line)
    assert found is not None and found.kind == kind and kind in MM_KINDS
    assert not found.text.startswith("[")


@pytest.mark.parametrize("line", [
    "devdax-lab: console mark 3",
    "[ 1.0] WARNING: CPU: 0 PID: 1 at mm/memremap.c:42 x",
    "[ 1.0] nd_pmem namespace0.0: unable to guarantee persistence of writes",
    "[ 1.0] Freeing unused kernel image (initmem) memory: 2664K",
])
def test_other_lines_are_no_mm_message(line):
    assert find_mm_message(line) is None


@pytest.mark.parametrize("kernel", ["before", "after"])
def test_normal_boots_print_no_mm_message(kernel):
    assert mm_messages((GOLDEN / "console" / f"{kernel}-boot.log").read_text().splitlines()) == []


# -- signal names -----------------------------------------------------------------


def test_signal_and_si_code_names():
    assert signal_name(7) == "SIGBUS" and signal_name(9) == "SIGKILL" and signal_name(99) == "SIG99"
    assert si_code_name(signal.SIGBUS, 4) == "BUS_MCEERR_AR"
    assert si_code_name(signal.SIGBUS, 5) == "BUS_MCEERR_AO"
    assert si_code_name(signal.SIGSEGV, 1) == "SEGV_MAPERR"
    assert si_code_name(signal.SIGUSR1, 0) == "SI_USER"
    assert si_code_name(signal.SIGSEGV, 0x80) == "SI_KERNEL"
    assert si_code_name(signal.SIGBUS, 77) == "77"
    assert si_code_name(signal.SIGKILL, None) is None
    assert describe_signal(7, 4, 0x7F0000001000, True) == \
        "SIGBUS BUS_MCEERR_AR at 0x7f0000001000 (survived)"
    assert describe_signal(9, None, None, False) == "killed by SIGKILL"


# -- frames on the golden records of hwpoison-4k ----------------------------------

HWPOISON_STEP = 5  # madvise HWPOISON page 1


@pytest.fixture(scope="module")
def hwpoison_runs():
    return load(GOLDEN / "records" / "hwpoison-4k.json")


def test_df_signals_of_the_hwpoison_run(hwpoison_runs):
    frame = tl.df_signals(hwpoison_runs)
    assert dict(frame.dtypes.astype(str)) == tl.SIGNAL_COLUMNS
    assert len(frame) == 2  # one per kernel: a's SIGBUS, nothing for b
    for kernel in ("before", "after"):
        (row,) = frame[frame["kernel"] == kernel].itertuples()
        assert (row.step, row.action, row.proc, row.signal, row.si_code, row.addr_lsb,
                row.survived, row.during) == (HWPOISON_STEP, "madvise", "a", "SIGBUS",
                                              "BUS_MCEERR_AR", 12, True, "madvise")
        run = next(r for r in hwpoison_runs if r.kernel == kernel)
        a_page_1 = next(pr.vaddr for st in run.steps if st.step == 2 for pr in st.pages
                        if pr.proc == "a")
        assert row.address == a_page_1  # si_addr: where a maps the poisoned page
        assert row.pid == next(p.pid for p in run.steps[1].processes if p.proc == "a")


def test_df_kernel_messages_of_the_hwpoison_run(hwpoison_runs):
    frame = tl.df_kernel_messages(hwpoison_runs)
    assert set(frame["step"]) == {HWPOISON_STEP}
    assert list(frame["kind"]) == ["memory-failure"] * 4
    assert frame["text"].str.contains("recovery action for dax page: Recovered").sum() == 2
    assert len(tl.df_complaints(hwpoison_runs)) == 0


def test_df_processes_of_the_hwpoison_run(hwpoison_runs):
    """MM_FILEPAGES of a and b on both kernels, step by step: 6.12's
    insert_pfn() never counts a device page, 7.2's insert_page_into_pte_locked()
    counts each write-faulted page in MM_FILEPAGES, the memory failure's zap
    takes it out of a and b, the re-fault puts it back in a."""
    frame = tl.df_processes(hwpoison_runs)
    assert dict(frame.dtypes.astype(str)) == tl.PROCESS_COLUMNS
    file_pages = {(k, s, p): v for k, s, p, v in
                  frame[["kernel", "step", "proc", "file_pages"]].itertuples(index=False)}
    expected_after = {1: {"a": 0}, 2: {"a": 1}, 3: {"a": 1, "b": 0}, 4: {"a": 1, "b": 1},
                      5: {"a": 0, "b": 0}, 6: {"a": 1, "b": 0}, 7: {"a": 1}, 8: {"a": 0}}
    for step, procs in expected_after.items():
        for proc, n in procs.items():
            assert file_pages[("after", step, proc)] == n, (step, proc)
            assert file_pages[("before", step, proc)] == 0, (step, proc)
    assert not frame[frame["step"] == 0].size  # no process before the first mmap
    assert set(frame[frame["step"] == 7]["proc"]) == {"a"}  # b exited
    # device entries: a maps page 1 by a PTE after steps 2-4 and 6-7, b after step 4
    pte = {(k, s, p): v for k, s, p, v in
           frame[["kernel", "step", "proc", "device_pte"]].itertuples(index=False)}
    for kernel in ("before", "after"):
        assert [pte[(kernel, s, "a")] for s in range(1, 9)] == [0, 1, 1, 1, 0, 1, 1, 0]
        assert [pte[(kernel, s, "b")] for s in (3, 4, 5, 6)] == [0, 1, 0, 0]
    assert (frame["device_pmd"] == 0).all() and (frame["device_pud"] == 0).all()


# -- frames and the runner's bookkeeping on hand-made records -------------------


def _pte(level: str) -> PteState:
    return PteState(level=level, raw=0, present=True, write=True, dirty=True, young=True,
                    huge=level != "PTE", special=False, devmap=None, pfn=1)


def _step(n: int, pages=(), signals=(), processes=()) -> StepRecord:
    folio = FolioState(pfn=1, folio_pfn=1, order=9, flags=(), counters={"refcount": 2})
    pgmap = PgmapState(address=0, type="MEMORY_DEVICE_GENERIC", ranges=((0, 1),),
                       vmemmap_shift=9, ops=0, flags=0, ref=PercpuRefState(1, "percpu"))
    prs = tuple(PageRecord(map="m", page=page, pfn=1 + page, folio=folio, proc=proc,
                           vaddr=vaddr, pte=_pte(level), pagemap_pfn=None)
                for proc, page, vaddr, level in pages)
    empty = np.zeros(0, dtype=np.int64)
    return StepRecord(step=n, action="touch", proc="a", label="", detail="", errno=None,
                      error=None, seconds=0.0, pages=prs, pgmap=pgmap, device_refcount=empty,
                      device_mapcount=empty, signals=tuple(signals), processes=tuple(processes))


def _run(*steps: StepRecord) -> RunResult:
    return RunResult(scenario=None, kernel="k", kernel_spelling="k", release="r", accel="tcg",
                     device={}, steps=list(steps))


def test_df_processes_counts_entries_not_pages():
    """Two watched pages of one 2M folio under one PMD are one entry; a PTE
    in another process is counted there."""
    base = 0x7F0000000000
    st = _step(1, pages=[("a", 0, base, "PMD"), ("a", 3, base + 3 * 4096, "PMD"),
                         ("a", 512, base + (2 << 20), "PMD"), ("b", 0, base + 4096, "PTE")],
               processes=[ProcessRecord("a", 10, 1024, 5, 0), ProcessRecord("b", 11, 1, 5, 0)])
    run = _run(st)
    frame = tl.df_processes([run])
    got = {r.proc: (r.file_pages, r.device_pte, r.device_pmd, r.device_pud)
           for r in frame.itertuples()}
    assert got == {"a": (1024, 0, 2, 0), "b": (1, 1, 0, 0)}


def test_df_signals_of_a_killed_process():
    st = _step(3, signals=[SignalRecord("b", 12, signal.SIGKILL, None, None, None, False)])
    run = _run(st)
    (row,) = tl.df_signals([run]).itertuples()
    assert (row.proc, row.signal, row.survived, row.text) == ("b", "SIGKILL", False,
                                                             "killed by SIGKILL")
    assert tl.df_signals([run])["si_code"].isna().all()  # a wait status has no si_code


def test_empty_runs_give_typed_empty_frames():
    run = _run(_step(0))
    assert list(tl.df_signals([run]).columns) == list(tl.SIGNAL_COLUMNS)
    assert list(tl.df_processes([run]).columns) == list(tl.PROCESS_COLUMNS)
    assert len(tl.df_kernel_messages([run])) == 0


def test_a_worker_the_kernel_killed_is_marked_exited_with_the_reason():
    model = GuestModel(4096)
    model.procs["a"] = Proc("a", 1)
    model.procs["b"] = Proc("b", 3)
    model.procs["c"] = Proc("c", 1, exited_at=2)
    exited = [{"name": "b", "pid": 12, "status": None, "signal": 9, "core": False},
              {"name": "c", "pid": 13, "status": 0, "signal": None, "core": False}]
    signals, ended = _deaths(model, exited, step=4)
    assert ended == [("b", "killed by SIGKILL")]  # c's exit step was already applied
    assert signals == [SignalRecord("b", 12, 9, None, None, None, False)]
    assert (model.procs["b"].exited_at, model.procs["c"].exited_at) == (4, 2)
    with pytest.raises(StepError) as info:
        model.live_proc(Where("lab", "step 5 (touch)"), "proc", "b")
    assert str(info.value) == 'lab: step 5 (touch): proc: process "b" exited at step 4 ' \
                              '(killed by SIGKILL)'
    assert _deaths(model, exited, step=5) == ([], [])  # told once


def test_signal_records_from_agent_reports():
    reported = [{"proc": "a", "cmd": "madvise", "signal": 7, "code": 4, "addr": 0x7F0000001000,
                 "addr_lsb": 12, "sender": 0},
                {"proc": "a", "cmd": "signals", "signal": 10, "code": 0, "addr": 0,
                 "addr_lsb": 0, "sender": 99}]
    assert _signal_records(reported, {"a": 5}) == [
        SignalRecord("a", 5, 7, 4, 0x7F0000001000, 12, True, "madvise", None),
        SignalRecord("a", 5, 10, 0, None, None, True, "signals", 99)]
