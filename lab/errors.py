"""The lab's errors and the exit status each one means.

Every error the lab raises on purpose derives from :class:`LabError`, which
carries the exit status ``devdax-lab`` ends with. ``lab.cli.main`` is the one
place that turns one into a line on stderr and that status, so no lab error
ever reaches the user as a traceback:

- :class:`UserError` (2): bad input. The message says what is wrong and what
  to do; nothing was started, nothing is left behind.
- :class:`LabFailure` (1): the guest, QEMU or a tool failed (a VM that does
  not boot, an agent that does not answer, apt, make, drgn). The message may
  go on with the lines that explain it (a console or log tail).
- ``KeyboardInterrupt`` (130): interrupted; the CLI says so in one line.

A verdict (``devdax-lab check``, ``run``/``compare --check``) uses ``git
bisect run``'s codes instead: 0 every expectation and invariant holds, 1 one
fails (:class:`VerdictFailed`), 125 the kernel could not be tested
(:class:`Untestable`: a build, boot or agent failure).

Domain errors keep their own names and modules (``VmError`` in ``lab.vm``,
``KernelError`` in ``lab.kernels`` ...) and derive from one of these two.
"""

from __future__ import annotations

__all__ = ["EXIT_FAILURE", "EXIT_INTERNAL", "EXIT_INTERRUPTED", "EXIT_UNTESTABLE", "EXIT_USAGE",
           "LabError", "LabFailure", "Terminated", "Untestable", "UserError", "VerdictFailed"]

EXIT_USAGE = 2
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it
EXIT_UNTESTABLE = 125  # git bisect run: skip this commit
# a bug of the lab (an exception no LabError names): EX_SOFTWARE of sysexits.h,
# so that no verdict (0, 1) is ever read from a crash of the tool
EXIT_INTERNAL = 70


class LabError(Exception):
    """Base of every error the lab raises on purpose; ``exit_status`` is what
    the CLI exits with when one reaches it."""

    exit_status: int = EXIT_FAILURE


class UserError(LabError):
    """Bad input from the person at the keyboard: the CLI prints it as one line
    and exits 2. The message says what is wrong and what to do."""

    exit_status = EXIT_USAGE


class LabFailure(LabError):
    """The guest, QEMU or a tool the lab runs failed, not the input: exit 1.
    Subclasses carry what was run and the lines that explain the failure."""

    exit_status = EXIT_FAILURE


class VerdictFailed(LabError):
    """An expectation or invariant does not hold: exit 1, the first failure
    in one line."""

    exit_status = EXIT_FAILURE


class Untestable(LabError):
    """A verdict could not be reached: the kernel did not build or boot, or
    the agent failed. Exit 125, so ``git bisect run`` skips the commit."""

    exit_status = EXIT_UNTESTABLE


class Terminated(BaseException):
    """SIGTERM or SIGHUP (timeout, systemd, a CI runner, a cancelled task):
    raised in the main thread like KeyboardInterrupt, so every owner of a
    process unwinds as it does for Ctrl-C (QEMU stopped, run directory
    removed); the CLI exits 128 + the signal's number. A BaseException, so
    that no ``except Exception`` swallows it."""

    def __init__(self, signum: int):
        import signal

        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_status = 128 + signum
