"""Boot both kernels for real: release, namespaces, a fault whose PFN (from the
guest's own /proc/PID/pagemap) lies on the device, clean shutdown, and no
QEMU left behind when the Python side is killed with SIGKILL."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lab import launch, vm
from lab.model import DEFAULT_DAX
from lab.procs import pid_alive

pytestmark = pytest.mark.live


def test_release_and_namespaces(session):
    v = session.vm
    assert v.release == session.kernel.release
    by_align = {d["align"]: d for d in v.devices}
    assert sorted(by_align) == sorted(d.align for d in DEFAULT_DAX)
    for spec in DEFAULT_DAX:
        dev = by_align[spec.align]
        # The namespace keeps most of its NVDIMM: only labels, info block,
        # struct pages (memmap on the device) and alignment padding are lost.
        assert 0.9 * spec.size < dev["size"] <= spec.size
        assert dev["size"] % spec.align == 0 and dev["start"] % spec.align == 0


def test_touched_page_is_on_the_device(session):
    agent = session.agent
    dev = session.vm.device("4K")
    addr = agent.mmap("boot-a", dev["name"], 8 * 4096)
    try:
        agent.touch("boot-a", [addr + 3 * 4096], write=True)
        entry = agent.pagemap("boot-a", [addr + 3 * 4096])[0]
        assert entry["present"]
        phys = entry["pfn"] << 12
        assert dev["start"] <= phys < dev["start"] + dev["size"]
    finally:
        agent.exit("boot-a")


def test_clean_shutdown_removes_everything():
    v = launch.boot("before", say=lambda *_: None)
    run_dir, proc = v.spec.run_dir, v.proc
    v.close()
    assert proc.returncode == 0  # powered off by the agent, not killed
    assert not run_dir.exists()


SCRIPT = textwrap.dedent("""
    import sys, time
    from lab import launch
    with launch.boot("before", say=lambda *_: None) as v:
        print(v.proc.pid, v.spec.run_dir, flush=True)
        time.sleep(600)
""")


def test_no_qemu_left_after_sigkill_of_python():
    child = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()
        # setpriv execs QEMU, so this is QEMU's pid.
        qemu_pids, run_dir = [int(line.split()[0])], Path(line.split()[1])
        assert pid_alive(qemu_pids[0])
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        deadline = time.monotonic() + 10
        while any(pid_alive(p) for p in qemu_pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(pid_alive(p) for p in qemu_pids), "QEMU outlived its Python parent"
        # The next start sweeps what a killed process could not clean up.
        vm.sweep_stale_run_dirs()
        assert not run_dir.exists()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()




def _run_dirs_of(pid: int) -> list[Path]:
    """Run directories made by process *pid* (others may be booting too)."""
    mine = []
    for d in vm.run_parent().glob(vm.RUN_PREFIX + "*"):
        try:
            if int((d / "owner.pid").read_text()) == pid:
                mine.append(d)
        except (OSError, ValueError):
            pass
    return mine


def test_guest_panic_is_a_clear_error_and_leaves_nothing():
    before = set(_run_dirs_of(os.getpid()))  # the module's sessions have theirs
    with pytest.raises(vm.GuestCrashed) as info:
        launch.boot("before", say=lambda *_: None, cmdline_extra=["devdax_lab.crash=1"], ready_timeout=60)
    message = str(info.value)
    assert message.startswith("the guest kernel crashed: Kernel panic - not syncing: sysrq triggered crash")
    assert "last lines of the guest console" in message
    assert set(_run_dirs_of(os.getpid())) <= before


def test_ctrl_c_stops_qemu_and_cleans_up():
    """SIGINT (what Ctrl-C sends to the foreground process) during a session:
    the CLI-style handler exits, QEMU is reaped and the run dir is gone."""
    child = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()
        qemu_pid, run_dir = int(line.split()[0]), Path(line.split()[1])
        child.send_signal(signal.SIGINT)
        assert child.wait(timeout=30) != 0  # KeyboardInterrupt ended it
        assert not pid_alive(qemu_pid)
        assert not run_dir.exists()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lab.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, **kw)


def test_shell_with_stdin_at_end_returns_and_stops_qemu():
    """A script's `devdax-lab boot --shell </dev/null`: the guest's shell gets
    the end of input, /init powers off, the command returns."""
    proc = subprocess.Popen([sys.executable, "-m", "lab.cli", "boot", "--kernel", "after",
                             "--shell"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-2000:]
    assert "reboot: Power down" in out  # the guest powered off, QEMU was not killed
    assert not _run_dirs_of(proc.pid)


def test_shell_runs_piped_commands_then_ends():
    proc = subprocess.run([sys.executable, "-m", "lab.cli", "boot", "--kernel", "before", "--shell"],
                          input="cat /sys/bus/dax/devices/dax1.0/align\nuname -r\n",
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line.strip() for line in proc.stdout.splitlines()]
    assert "2097152" in lines and any(line.startswith("6.12.") for line in lines), proc.stdout


def _shown(stdout: str) -> list[list[str]]:
    """The command lines a --show-command printed (comments left out)."""
    return [shlex.split(line) for line in stdout.splitlines() if line and not line.startswith("#")]


def _as_started(v: vm.Vm) -> list[str]:
    """What Vm really started, with its run directory called as a plan calls it."""
    run = str(v.spec.run_dir)
    return [a.replace(run, "RUN_DIR") for a in v.proc.args]


def test_show_command_prints_what_boot_run_and_notebook_start():
    from lab.api import Lab
    from lab.experiment import boot_options, resolve_kernels
    from lab.scenario import load_scenario
    from lab.session import Session

    shown = _cli("boot", "--kernel", "before", "--show-command", timeout=300)
    assert shown.returncode == 0, shown.stderr
    with launch.boot("before", say=lambda *_: None) as v:
        assert _shown(shown.stdout) == [_as_started(v)]

    # run with watches: events on, one CPU, a gdbstub
    scenario = ROOT / "scenarios" / "fork-share.toml"
    shown = _cli("run", str(scenario), "--kernel", "after", "--out", "/nonexistent", "--watch",
                 "--show-command", timeout=300)
    assert shown.returncode == 0, shown.stderr
    [choice] = resolve_kernels(["after"])
    options = boot_options(load_scenario(scenario), "counts")
    with Session.boot(choice, say=lambda *_: None, **options) as s:
        assert _shown(shown.stdout) == [_as_started(s.vm)]
        assert "-gdb" in s.vm.argv
    assert not Path("/nonexistent").exists()

    shown = _cli("notebook", "--show-command", "--kernel", "before", timeout=300)
    assert shown.returncode == 0, shown.stderr
    jupyter, qemu = _shown(shown.stdout)
    assert "jupyterlab" in jupyter
    with Lab.boot("before", say=lambda *_: None) as lab:
        assert qemu == _as_started(lab._session.vm)
