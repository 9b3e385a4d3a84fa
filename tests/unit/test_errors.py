"""Every lab error through the CLI: one line on stderr (its tail after it, for
the errors that carry one), no traceback, and the exit status its class
carries: 2 bad input, 1 a guest/QEMU/tool failure, 130 interrupted."""

from __future__ import annotations

import importlib
import inspect as pyinspect
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import lab
from lab import cli, errors
from lab.agent import AgentDisconnected, AgentError, AgentTimeout
from lab.build import BuildError
from lab.cache import CacheLocked
from lab.drgn_helpers import UnsupportedKernelError
from lab.events import EventsError, RspError, RspRefused, RspTimeout
from lab.image import ImageError
from lab.inspect import InspectError
from lab.jupyter import JupyterStartError
from lab.kernels import CommandError, KernelError
from lab.guest import StepError
from lab.pytest_plugin import ScenarioFailed
from lab.scenario import ScenarioError
from lab.vm import GuestCrashed, VmError, VmStopped, VmTimeout
from lab.warm import WarmStartError

# (error, exit status, lines on stderr): one instance of every error class the
# lab defines, as the code raises it.
CASES = [
    (errors.UserError("--kernels needs at least two kernels"), 2, 1),
    (ScenarioError("s.toml: step 2 (touch): pages: 9 is past the mapping's 4 pages"), 2, 1),
    (StepError('lab.unpin(): pin: no pin "nope" (pins so far: none)'), 2, 1),
    (errors.LabError("a lab error of no particular kind"), 1, 1),
    (errors.LabFailure("something the lab ran failed"), 1, 1),
    (errors.VerdictFailed("rmap at step 4 on after: 2 PTE(s) map the page, _mapcount says 1"), 1, 1),
    (ScenarioFailed(["rmap at step 4 on after: 2 PTE(s) map the page, _mapcount says 1"]), 1, 1),
    (errors.Untestable("the kernel could not be tested: QEMU exited with status 1"), 125, 1),
    (VmError("QEMU exited with status 1"), 1, 1),
    (VmError("QEMU exited with status 1", console_tail=["[ 0.1] a", "[ 0.2] b"]), 1, 4),
    (GuestCrashed("the guest kernel crashed: Oops"), 1, 1),
    (VmTimeout("the guest agent did not answer within 60 s"), 1, 1),
    (VmStopped("stopped: before failed"), 1, 1),
    (WarmStartError("the restored guest runs 6.12.1, the saved one 6.12.2"), 1, 1),
    (EventsError("watching stopped: the gdbstub did not answer"), 1, 1),
    (KernelError("kernel 'after': no ABI matching ... in the sid index"), 1, 1),
    (CommandError(["apt-get", "download", "x"], 100, "E: unable to locate x"), 1, 2),
    (CacheLocked("/c/kernels/.after.lock is still locked after 1800 s by pid 7 (fetching)"), 1, 1),
    (ImageError("gcc -static failed with exit 1"), 1, 1),
    (AgentError("touch", 14, "page 3: SIGBUS"), 1, 1),
    (AgentTimeout("pin", 30.0), 1, 1),
    (AgentDisconnected("the agent closed the connection"), 1, 1),
    (BuildError("`make bzImage` failed (exit status 2)", Path("/x/build.log"), ["a.c:1: error"]), 1, 3),
    (UnsupportedKernelError("this kernel has no pgmap_array (built without CONFIG_ZONE_DEVICE)"),
     1, 1),
    (InspectError("vmlinux build ID differs from the running kernel's"), 1, 1),
    (RspError("gdbstub connection lost"), 1, 1),
    (RspTimeout("the gdbstub did not answer in time"), 1, 1),
    (RspRefused("gdbstub refused m0,4: E14"), 1, 1),
    (JupyterStartError("JupyterLab did not answer /api/status within 30 s", ["jupyter"], ["x"]), 1, 4),
]


def _through_cli(monkeypatch, capsys, exc: BaseException) -> tuple[int, str]:
    def raising(args):
        raise exc

    # `kernels` takes no argument; build_parser() looks the function up at each call
    monkeypatch.setattr(cli, "cmd_kernels", raising)
    status = cli.main(["kernels"])
    return status, capsys.readouterr().err


@pytest.mark.parametrize(("exc", "status", "lines"), CASES, ids=lambda v: type(v).__name__
                         if isinstance(v, BaseException) else str(v))
def test_each_error_exits_with_its_status_and_no_traceback(monkeypatch, capsys, exc, status, lines):
    got, err = _through_cli(monkeypatch, capsys, exc)
    assert got == status == exc.exit_status
    assert "Traceback" not in err
    out = err.rstrip("\n").splitlines()
    assert len(out) == lines, err
    assert out[0] == f"devdax-lab: {str(exc).splitlines()[0]}"


def test_interrupt_exits_130_with_one_line(monkeypatch, capsys):
    got, err = _through_cli(monkeypatch, capsys, KeyboardInterrupt())
    assert got == 130
    assert err == "devdax-lab: interrupted\n"


def test_model_user_error_is_the_one_class():
    from lab import model

    assert model.UserError is errors.UserError


def _lab_modules():
    for info in pkgutil.walk_packages(lab.__path__, "lab."):
        yield importlib.import_module(info.name)


def test_every_exception_class_of_the_lab_is_a_lab_error_and_covered_here():
    """A new error class must derive from LabError (or the CLI would print its
    traceback) and be added to CASES (so its exit status is decided)."""
    defined = {obj for mod in _lab_modules() for _, obj in pyinspect.getmembers(mod, pyinspect.isclass)
               if issubclass(obj, BaseException) and obj.__module__.startswith("lab.")}
    assert defined, "found no exception classes in lab/"
    # Terminated (SIGTERM/SIGHUP) is a BaseException on purpose, as
    # KeyboardInterrupt is: no `except Exception` may swallow it
    not_lab = sorted(c.__qualname__ for c in defined
                     if not issubclass(c, errors.LabError) and c is not errors.Terminated)
    assert not_lab == [], f"exception classes outside the LabError hierarchy: {not_lab}"
    covered = {type(exc) for exc, _, _ in CASES} | {errors.Terminated}
    missing = sorted(f"{c.__module__}.{c.__qualname__}" for c in defined - covered)
    assert missing == [], f"add these to CASES: {missing}"


@pytest.mark.parametrize("signum", [15, 1])
def test_terminated_exits_128_plus_the_signal_with_one_line(monkeypatch, capsys, signum):
    import signal

    status, err = _through_cli(monkeypatch, capsys, errors.Terminated(signum))
    name = signal.Signals(signum).name
    assert status == 128 + signum
    assert err == f"devdax-lab: stopped by {name}: what it had started is stopped and removed\n"
    assert not issubclass(errors.Terminated, Exception)


def test_a_second_sigterm_does_not_abort_the_cleanup_of_the_first():
    """A Dask worker that dies while its task stops a run sends it a second
    SIGTERM: the cleanup the first started (VM stopped, run directory
    removed) must run to its end."""
    code = ("import os, signal, sys, time\n"
            "from lab import cli, errors\n"
            "cli._terminate_like_ctrl_c()\n"
            "try:\n"
            "    os.kill(os.getpid(), signal.SIGTERM); time.sleep(5)\n"
            "except errors.Terminated:\n"
            "    os.kill(os.getpid(), signal.SIGTERM)  # during the cleanup\n"
            "    os.kill(os.getpid(), signal.SIGHUP)\n"
            "    time.sleep(0.2)\n"
            "    print('cleanup done')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0 and out.stdout == "cleanup done\n", out.stderr


def test_a_bug_is_its_traceback_and_exit_70_never_a_verdict(monkeypatch, capsys):
    """An exception no LabError names (a bug of the lab) must not exit 1,
    which `check`, sweeps and bisect read as "the scenario fails"."""
    status, err = _through_cli(monkeypatch, capsys, ZeroDivisionError("division by zero"))
    assert status == errors.EXIT_INTERNAL == 70
    assert "Traceback" in err
    assert err.rstrip("\n").splitlines()[-1] == (
        "devdax-lab: internal error (ZeroDivisionError: division by zero); the traceback above "
        "is for a bug report")
