"""Errors of fetching and unpacking kernels (failures, exit 1; bad input is a
:class:`lab.errors.UserError`)."""

from __future__ import annotations

from collections.abc import Sequence

from lab.errors import LabFailure

__all__ = ["CommandError", "KernelError"]


class KernelError(LabFailure):
    """Fetching or unpacking a kernel failed for a reason other than bad input."""


class CommandError(KernelError):
    """A subprocess failed: carries the command and the tail of its stderr."""

    def __init__(self, cmd: Sequence[str], returncode: int, stderr: str) -> None:
        self.cmd = list(cmd)
        self.returncode = returncode
        self.stderr = stderr
        tail = "\n".join(stderr.strip().splitlines()[-12:])
        super().__init__(
            f"`{' '.join(self.cmd)}` failed with exit status {returncode}"
            + (f":\n{tail}" if tail else " (no stderr)")
        )
