"""Whether a process still runs, as every owner of a process here must ask,
and how an owner stops one.

A zombie does not run: on machines whose PID 1 does not reap, a killed
process stays a zombie for good, and ``kill(pid, 0)`` or ``/proc/PID``
existing would call it alive.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

__all__ = ["pid_alive", "terminate", "wait_gone"]


def pid_alive(pid: int) -> bool:
    """Whether *pid* exists and is not a zombie."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat_line.rsplit(")", 1)[-1].split()[0] != "Z"


def wait_gone(pid: int, timeout: float, poll: float = 0.05) -> bool:
    """Wait up to *timeout* seconds for *pid* to stop running; whether it did."""
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(poll)
    return True


def terminate(proc: subprocess.Popen, grace: float) -> int:
    """Stop *proc* as its owner does: SIGTERM (time to clean up), SIGKILL
    after *grace* seconds; always reaped. The exit status, 128 + N for a
    signal (as a shell reports it)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()
    return proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
