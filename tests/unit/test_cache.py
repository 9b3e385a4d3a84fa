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
