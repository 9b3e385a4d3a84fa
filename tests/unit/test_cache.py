"""lab.cache: the one lock of shared cache entries (flock, with a timeout and
an error naming the holder) and atomic entries."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from lab import cache
from lab.errors import LabFailure

HOLD = """
import sys, time
from pathlib import Path
from lab.cache import locked
with locked(Path(sys.argv[1]), what="fetching kernel after"):
    print("held", flush=True)
    time.sleep(60)
"""


@pytest.fixture
def holder(tmp_path):
    """Another process holding the lock ``tmp_path/.x.lock``."""
    lock = tmp_path / ".x.lock"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert proc.stdout.readline() == "held\n"
        yield proc, lock
    finally:
        proc.kill()
        proc.wait()


def test_a_held_lock_times_out_naming_its_holder(holder):
    proc, lock = holder
    said = []
    t0 = time.monotonic()
    with pytest.raises(cache.CacheLocked) as info, cache.locked(lock, timeout=0.5, say=said.append):
        pytest.fail("entered a lock another process holds")
    assert time.monotonic() - t0 >= 0.5
    msg = str(info.value)
    assert f"still locked after 0.5 s by pid {proc.pid} (fetching kernel after)" in msg
    assert said == [f"waiting for pid {proc.pid} (fetching kernel after) (lock {lock})"]
    assert isinstance(info.value, LabFailure) and info.value.exit_status == 1


def test_the_lock_goes_with_a_killed_holder(holder):
    proc, lock = holder
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with cache.locked(lock, timeout=5):
        assert lock.read_text() == f"pid {os.getpid()}\n"
    assert lock.read_text() == ""  # released: nothing names a holder


def test_waiter_enters_when_the_holder_leaves(tmp_path):
    lock = tmp_path / "sub" / ".y.lock"
    with cache.locked(lock, what="first"):
        proc = subprocess.Popen(
            [sys.executable, "-c", ("import sys; from pathlib import Path; from lab.cache import locked\n"
                                    "with locked(Path(sys.argv[1]), timeout=30): print('in', flush=True)"),
             str(lock)],
            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
        time.sleep(0.5)
        assert proc.poll() is None  # still waiting
    out, _ = proc.communicate(timeout=30)
    assert out == "in\n" and proc.returncode == 0


def test_atomic_entry_leaves_nothing_on_interrupt(tmp_path):
    final = tmp_path / "entry"
    with pytest.raises(KeyboardInterrupt), cache.atomic_entry(final) as tmp:
        (tmp / "half").write_text("x")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with cache.atomic_entry(final) as tmp:
        (tmp / "whole").write_text("x")
    assert [p.name for p in final.iterdir()] == ["whole"]


# ------------------------------------------------------ cached_entry, prune_unused
# Real processes (fork) racing on real flock locks.

def _slow_build(count: Path, delay: float):
    def build(tmp: Path) -> None:
        with open(count, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(delay)
        (tmp / "data").write_text("whole")
    return build


def _race(final: Path, count: Path, start, results) -> None:
    start.wait()
    entry = cache.cached_entry(final, _slow_build(count, 0.5), what="racing")
    results.put((entry / "data").read_text())


def _results(procs, results) -> list:
    """One result from each of *procs* (started), then every one joined (or
    killed): none outlives the test."""
    try:
        return [results.get(timeout=30) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()


def _forked():
    import multiprocessing

    return multiprocessing.get_context("fork")


def test_processes_racing_for_an_entry_build_it_once(tmp_path):
    ctx = _forked()
    final, count = tmp_path / "cache" / "entry", tmp_path / "builds"
    start, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(final, count, start, results)) for _ in range(4)]
    for p in procs:
        p.start()
    start.set()
    got = _results(procs, results)
    assert got == ["whole"] * 4
    assert len(count.read_text().splitlines()) == 1  # one build, three found it made
    assert [p.exitcode for p in procs] == [0] * 4
    assert sorted(p.name for p in final.parent.iterdir()) == [".entry.lock", "entry"]


def _read_in_a_loop(final: Path, count: Path, seconds: float, results) -> None:
    failures = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        entry = cache.cached_entry(final, _slow_build(count, 0.0))
        try:
            (entry / "data").read_text()
        except OSError:
            failures += 1
    results.put(failures)


def test_a_reader_never_sees_an_entry_vanish(tmp_path):
    """A complete entry is never replaced by another builder, and pruning
    never takes one a reader has just found, even while the pruner runs flat
    out on an entry that starts out unused for days."""
    ctx = _forked()
    final, count = tmp_path / "entry", tmp_path / "builds"
    cache.cached_entry(final, _slow_build(count, 0.0))
    inode = final.stat().st_ino
    long_ago = time.time() - 3 * 86400
    os.utime(final, (long_ago, long_ago))
    results = ctx.Queue()
    readers = [ctx.Process(target=_read_in_a_loop, args=(final, count, 2.0, results))
               for _ in range(2)]
    for p in readers:
        p.start()
    removed = []
    try:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            removed += cache.prune_unused([final], unused_for=3600)
    finally:
        failures = _results(readers, results)
    assert failures == [0, 0]
    builds = len(count.read_text().splitlines())
    # Pruned at most once (before a reader first marked it), then rebuilt once.
    assert len(removed) <= 1 and builds == 1 + len(removed)
    if not removed:
        assert final.stat().st_ino == inode  # the same directory all along
    assert not list(tmp_path.glob(".entry.*-*"))  # no partial or set-aside copies


def test_a_complete_entry_is_used_as_it_is(tmp_path):
    final = tmp_path / "entry"
    cache.cached_entry(final, lambda tmp: (tmp / "data").write_text("first"))
    long_ago = time.time() - 86400
    os.utime(final, (long_ago, long_ago))
    cache.cached_entry(final, lambda tmp: pytest.fail("rebuilt a complete entry"))
    assert (final / "data").read_text() == "first"
    assert time.time() - final.stat().st_mtime < 60  # marked used


def test_an_incomplete_entry_is_replaced(tmp_path):
    final = tmp_path / "entry"
    final.mkdir()  # an older layout: no data file
    cache.cached_entry(final, lambda tmp: (tmp / "data").write_text("new"),
                       complete=lambda e: (e / "data").exists())
    assert (final / "data").read_text() == "new"


def test_a_build_that_raises_leaves_nothing_half_written(tmp_path):
    final = tmp_path / "entry"

    def broken(tmp: Path) -> None:
        (tmp / "half").write_text("x")
        raise RuntimeError("gcc failed")

    with pytest.raises(RuntimeError, match="gcc failed"):
        cache.cached_entry(final, broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".entry.lock"]
    cache.cached_entry(final, lambda tmp: (tmp / "whole").write_text("x"))
    assert [p.name for p in final.iterdir()] == ["whole"]


def _build_forever(final: Path, ready) -> None:
    def build(tmp: Path) -> None:
        (tmp / "half").write_text("x")
        ready.set()
        time.sleep(60)

    cache.cached_entry(final, build)


def test_the_next_builder_removes_what_a_killed_one_left(tmp_path):
    ctx = _forked()
    final, ready = tmp_path / "entry", ctx.Event()
    proc = ctx.Process(target=_build_forever, args=(final, ready))
    proc.start()
    try:
        assert ready.wait(30)
    finally:
        proc.kill()
        proc.join()
    assert len(list(tmp_path.glob(".entry.partial-*"))) == 1
    cache.cached_entry(final, lambda tmp: (tmp / "whole").write_text("x"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".entry.lock", "entry"]


def test_prune_spares_recent_kept_and_locked_entries(tmp_path):
    now = time.time()
    ages = {"recent": 60, "old": 2 * 86400, "older": 3 * 86400, "oldest": 4 * 86400,
            "busy": 5 * 86400}
    for name, age in ages.items():
        (tmp_path / name).mkdir()
        os.utime(tmp_path / name, (now - age, now - age))
    entries = [tmp_path / n for n in ages]
    with cache.locked(cache.entry_lock(tmp_path / "busy")):  # another process builds or finds it
        removed = cache.prune_unused(entries, keep=2, unused_for=86400)
    assert sorted(p.name for p in removed) == ["older", "oldest"]  # "old" is one of the 2 kept
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == \
        ["busy", "old", "recent"]


def test_discard_removes_under_the_lock(tmp_path):
    final = tmp_path / "entry"
    cache.cached_entry(final, lambda tmp: (tmp / "data").write_text("x"))
    cache.discard(final)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".entry.lock"]
    cache.discard(final)  # already gone: nothing to do
