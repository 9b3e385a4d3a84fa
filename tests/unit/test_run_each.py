"""lab.experiment.run_each: kernels side by side in threads, results in
kernel order, the first failure raised and every VM of the job stopped
(lab.vm.VmGroup); lab.progress.for_slot: a progress line per job."""

from __future__ import annotations

import io
import subprocess
import threading
import time
from types import SimpleNamespace

import pytest

from lab import progress as lp
from lab.experiment import default_jobs, run_each
from lab.vm import VmGroup, VmStopped


def _choices(*names):
    return [SimpleNamespace(spelling=n) for n in names]


def test_results_keep_kernel_order_whatever_finishes_first():
    delays = {"before": 0.3, "after": 0.0, "fixed": 0.1}

    def run_on(choice, progress):
        time.sleep(delays[choice.spelling])
        return choice.spelling, threading.current_thread().name

    got = run_each(run_on, _choices("before", "after", "fixed"), jobs=3)
    assert [k for k, _ in got] == ["before", "after", "fixed"]
    assert [t for _, t in got] == [f"devdax-run-{k}" for k in ("before", "after", "fixed")]


def test_jobs_bounds_how_many_run_at_once():
    running, most = [0], [0]
    lock = threading.Lock()

    def run_on(choice, progress):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.1)
        with lock:
            running[0] -= 1
        return choice.spelling

    assert run_each(run_on, _choices("a", "b", "c", "d"), jobs=2) == ["a", "b", "c", "d"]
    assert most[0] == 2


def test_one_job_runs_in_the_calling_thread():
    got = run_each(lambda c, p: threading.current_thread() is threading.main_thread(),
                   _choices("a", "b"), jobs=1)
    assert got == [True, True]


def test_the_first_failure_is_raised_and_stops_the_others():
    started = threading.Event()
    seen_stop = []

    def run_on(choice, progress):
        if choice.spelling == "bad":
            assert started.wait(5)
            raise RuntimeError("bad did not boot")
        started.set()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                _current_group().check()
            except VmStopped:
                seen_stop.append(choice.spelling)
                raise
            time.sleep(0.01)
        return choice.spelling

    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="bad did not boot"):
        run_each(run_on, _choices("good", "bad"), jobs=2)
    assert time.monotonic() - t0 < 5  # "good" did not run to its end
    assert seen_stop == ["good"]


class _FakeOwner:
    """What VmGroup reads of a Vm: its process."""

    def __init__(self, proc):
        self.proc = proc


def _current_group() -> VmGroup:
    from lab import vm

    return vm._thread.group


def test_a_stopped_group_terminates_its_processes_and_refuses_new_ones():
    group = VmGroup()
    proc = subprocess.Popen(["sleep", "60"])
    try:
        member = _FakeOwner(proc)
        group._add(member)
        group.stop("interrupted")
        assert proc.wait(timeout=5) == -15  # SIGTERM; its owner reaps it
        with pytest.raises(VmStopped, match="stopped: interrupted"):
            group._add(_FakeOwner(None))
        with group.member():
            assert _current_group() is group
    finally:
        proc.kill()
        proc.wait()


def test_default_jobs_is_one_a_core(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert default_jobs(1) == 1 and default_jobs(2) == 2 and default_jobs(5) == 2


def test_each_slot_gets_bars_of_its_own():
    bars = lp.Bars(io.StringIO(), tty=True, notebook=False)
    slot = lp.for_slot(bars, 1)
    assert isinstance(slot, lp.Bars) and slot is not bars and slot.position == 1
    assert lp.for_slot(lp.silent, 1) is lp.silent and lp.for_slot(None, 0) is None
    seen = []
    serial = lp.for_slot(lambda *a, **k: seen.append(a), 2)
    serial("boot after", 1, 1, unit="boot")
    assert seen == [("boot after", 1, 1)]


def test_two_slots_off_a_terminal_write_plain_lines():
    """Off a terminal two bars open at once must not move the cursor (tqdm
    would give the second a line of its own with escape sequences)."""
    out = io.StringIO()
    bars = lp.Bars(out, tty=False, notebook=False)
    a, b = lp.for_slot(bars, 0), lp.for_slot(bars, 1)
    a("fork-share on before", 0, 6, unit="step")
    b("fork-share on after", 0, 6, unit="step")
    a("fork-share on before", 6, 6, unit="step")
    b("fork-share on after", 6, 6, unit="step")
    text = out.getvalue()
    assert "\x1b" not in text
    assert "fork-share on before: 100%" in text and "fork-share on after: 100%" in text


class _Stop(Exception):
    """What a signal handler raises in the main thread (like Terminated)."""


def test_an_interrupted_wait_stops_the_job_and_waits_for_every_thread():
    """A signal's exception in the waiting (main) thread stops the group, and
    the threads are waited for until they have cleaned up (Thread.join,
    interrupted, would call a running thread stopped: bpo-45274)."""
    import signal

    cleaned = []

    def run_on(choice, progress):
        try:
            while True:
                _current_group().check()
                time.sleep(0.01)
        finally:
            time.sleep(0.3)  # an owner stopping its VM, removing its run dir
            cleaned.append(choice.spelling)

    def interrupt(signum, frame):
        raise _Stop

    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        with pytest.raises(_Stop):
            run_each(run_on, _choices("before", "after"), jobs=2)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert sorted(cleaned) == ["after", "before"]
