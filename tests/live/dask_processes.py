"""A Dask scheduler and workers as separate processes on 127.0.0.1, started
the way docs/sweeps.md tells a user to start them on two machines, and
stopped with everything they started.

Every process gets a marker in its environment; children (cell runs, QEMU)
inherit it, so :meth:`DaskProcesses.leftovers` finds anything still alive
after the stop, whoever started it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

DASK = str(Path(sys.executable).with_name("dask"))


def processes_with(marker: str) -> list[tuple[int, str]]:
    """(pid, command line) of every process whose environment holds *marker*."""
    found = []
    needle = marker.encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if needle not in (proc / "environ").read_bytes():
                continue
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cmd:  # zombies have none
            found.append((int(proc.name), cmd.strip()))
    return found


class DaskProcesses:
    """``dask scheduler`` and ``dask worker --resources vm=1`` processes, each
    in its own process group so a stop reaches their children too."""

    def __init__(self, workdir: Path, env: dict[str, str] | None = None):
        self.workdir = workdir
        self.marker_value = uuid.uuid4().hex
        self.env = {**os.environ, **(env or {}), "DEVDAX_LAB_TEST_MARK": self.marker_value}
        self.procs: list[subprocess.Popen] = []
        self.scheduler_file = workdir / "scheduler.json"

    @property
    def marker(self) -> str:
        return f"DEVDAX_LAB_TEST_MARK={self.marker_value}"

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "w")  # noqa: SIM115 (kept for the process)
        proc = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self.procs.append(proc)
        return proc

    def start_scheduler(self, timeout: float = 60.0) -> str:
        self._spawn("scheduler", [DASK, "scheduler", "--host", "127.0.0.1", "--port", "0",
                                  "--no-dashboard", "--scheduler-file", str(self.scheduler_file)])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.scheduler_file.exists():
                try:
                    return json.loads(self.scheduler_file.read_text())["address"]
                except (ValueError, KeyError):
                    pass
            if self.procs[0].poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError("dask scheduler did not start:\n" + self.log("scheduler"))

    def start_worker(self, name: str, vm_slots: int = 1) -> None:
        self._spawn(name, [DASK, "worker", "--scheduler-file", str(self.scheduler_file),
                           "--host", "127.0.0.1", "--name", name, "--nthreads", str(vm_slots),
                           "--nworkers", "1", "--resources", f"vm={vm_slots}",
                           "--no-dashboard", "--local-directory", str(self.workdir / name)])

    def wait_for_workers(self, address: str, n: int, timeout: float = 120.0) -> None:
        from distributed import Client

        with Client(address, timeout=timeout) as client:
            client.wait_for_workers(n, timeout=timeout)

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def stop(self, timeout: float = 30.0) -> list[tuple[int, str]]:
        """SIGTERM each process group (workers first), then SIGKILL what is
        left after *timeout*: nothing started here outlives the test.

        :return: the processes that had to be killed (none, when everything
            ends on SIGTERM as it should)."""
        killed = []
        for proc in reversed(self.procs):
            if proc.poll() is None:
                with _gone():
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                killed.append((proc.pid, " ".join(map(str, proc.args))))
                with _gone():
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        # a child that left its group (QEMU under a cell) still carries the marker
        deadline = time.monotonic() + timeout
        while processes_with(self.marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid, cmd in processes_with(self.marker):
            killed.append((pid, cmd))
            with _gone():
                os.kill(pid, signal.SIGKILL)
        return killed

    def leftovers(self) -> list[tuple[int, str]]:
        return processes_with(self.marker)


class _gone:
    """Ignore ProcessLookupError: the process ended on its own meanwhile."""

    def __enter__(self):
        return self

    def __exit__(self, kind, *_):
        return kind is ProcessLookupError
