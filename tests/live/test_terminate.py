"""SIGTERM and SIGHUP end a run the way Ctrl-C does: QEMU stopped, its run
directory removed, one line saying why, exit 128 + the signal."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.live

ROOT = Path(__file__).resolve().parents[2]


def _qemus_of(pid: int, count: int, timeout: float = 120.0) -> list[tuple[int, Path]]:
    """*count* QEMUs running at once under *pid*, with their run directories."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            parent = int(stat[1])
            if "qemu-system" in cmd and (parent == pid or _ancestor(parent, pid)):
                run_dir = re.search(r"(/dev/shm/devdax-lab-run-[^/ ,]+)", cmd)
                if run_dir:
                    found.append((int(proc.name), Path(run_dir.group(1))))
        if len(found) >= count:
            return found
        time.sleep(0.1)
    raise AssertionError(f"{count} QEMU did not appear under the run at once")


def _ancestor(pid: int, ancestor: int) -> bool:
    for _ in range(5):
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            return False
        if pid == ancestor:
            return True
    return False


def _signalled(argv: list[str], sig: int, vms: int) -> tuple[subprocess.Popen, str, list]:
    """Start ``devdax-lab ARGV``, wait until *vms* QEMUs of it run, send *sig*
    mid-boot; the process (ended), its stderr and its QEMUs with their run
    directories."""
    run = subprocess.Popen([sys.executable, "-m", "lab.cli", *argv], cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        qemus = _qemus_of(run.pid, vms)
        assert all(run_dir.exists() for _, run_dir in qemus)
        time.sleep(1.0)  # mid-boot
        run.send_signal(sig)
        _, err = run.communicate(timeout=90)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    return run, err, qemus


def _assert_stopped_cleanly(run: subprocess.Popen, err: str, sig: int, qemus: list,
                            out: Path) -> None:
    assert run.returncode == 128 + sig, err
    lines = [line for line in err.splitlines() if line.startswith("devdax-lab:")]
    assert lines[-1] == (f"devdax-lab: stopped by {signal.Signals(sig).name}: what it had "
                         "started is stopped and removed"), err
    assert "Traceback" not in err
    for qemu, run_dir in qemus:
        assert not run_dir.exists(), f"{run_dir} left behind"
        with pytest.raises(ProcessLookupError):
            os.kill(qemu, 0)
    assert not (out / "timeline.parquet").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_stops_the_vm_and_removes_the_run_dir(sig, tmp_path):
    out = tmp_path / "out"
    run, err, qemus = _signalled(["run", str(ROOT / "scenarios" / "fork-share.toml"), "--kernel",
                                  "after", "--out", str(out), "--cold"], sig, 1)
    _assert_stopped_cleanly(run, err, sig, qemus, out)


def test_sigterm_stops_every_vm_of_a_parallel_compare(tmp_path):
    """compare boots its kernels side by side, each VM owned by a thread of its
    own; SIGTERM reaches the main thread, which stops them all."""
    out = tmp_path / "out"
    run, err, qemus = _signalled(["compare", str(ROOT / "scenarios" / "fork-share.toml"),
                                  "--kernels", "before,after", "--jobs", "2", "--out", str(out),
                                  "--cold"], signal.SIGTERM, 2)
    assert len(qemus) == 2
    _assert_stopped_cleanly(run, err, signal.SIGTERM, qemus, out)
