"""A running guest and drgn attached to it, owned together.

The session is what scenarios and notebooks drive: it boots the VM, attaches
a drgn Program over QEMU's second QMP socket, and takes consistent snapshots
by stopping the guest's CPUs (QMP ``stop``/``cont``) while it reads
(:meth:`Session.stopped`; what is read is the runner's one snapshot,
`lab.runner.Recorder`).
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator, Sequence

import drgn

from . import inspect
from .agent import AgentClient
from .model import DEFAULT_DAX, DaxSpec, KernelArtifacts
from .vm import Vm, boot

__all__ = ["Session"]


class Session:
    """One booted kernel with drgn attached. Use as a context manager."""

    def __init__(self, vm: Vm, kernel: KernelArtifacts, prog: drgn.Program):
        self.vm = vm
        self.kernel = kernel
        self.prog = prog
        self._watcher = None

    @classmethod
    def boot(cls, kernel: str | KernelArtifacts, *, dax: Sequence[DaxSpec] = DEFAULT_DAX,
             say=print, progress=None, ready_timeout: float = 120.0,
             events: bool = False) -> Session:
        """Boot *kernel*, wait until its devices are ready and attach drgn.
        With *events*, QEMU also serves a gdbstub for :attr:`watcher`, and
        the guest gets one CPU: QEMU reports one watchpoint per stop, so two
        CPUs hitting at once lose one hit (BENCHMARKS.md, "Events")."""
        from . import kernels

        artifacts = kernel if isinstance(kernel, KernelArtifacts) else kernels.resolve(
            kernel, progress=progress)
        vm = boot(artifacts, dax=dax, say=say, ready_timeout=ready_timeout, gdbstub=events,
                  cpus=1 if events else 2)
        try:
            prog = inspect.attach(vm.spec.run_dir / "drgn-qmp.sock", artifacts)
        except BaseException:
            vm.close()
            raise
        return cls(vm, artifacts, prog)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove any watchpoints, drop the Program (its QMP connection) and
        stop the VM."""
        try:
            if self._watcher is not None:
                self._watcher.close()
        finally:
            self.detach()
            self.vm.close()

    @property
    def events_enabled(self) -> bool:
        return self.vm.spec.gdbstub

    @property
    def armed_watcher(self):
        """The watcher if one was made (watches asked for), else None."""
        return self._watcher

    @property
    def watcher(self):
        """The :class:`lab.events.Watcher` of this guest (needs ``events=True``
        at boot: QEMU serves a gdbstub only then)."""
        if self._watcher is None:
            from .model import UserError

            if not self.events_enabled:
                raise UserError("this VM was booted without events: boot it with events=True "
                                "(Lab.boot(..., events=True), devdax-lab run --watch)")
            from .events import Watcher

            self._watcher = Watcher(self.vm.spec.run_dir / "gdb.sock", self.prog)
        return self._watcher

    def detach(self) -> None:
        """Drop the drgn Program: drgn closes its QMP connection when the
        Program is freed, and QEMU serves one QMP client per socket. Watches
        end first: the watcher reads with the same Program."""
        if self._watcher is not None:
            self._watcher.close()
            self._watcher.prog = None
        self.prog = None
        gc.collect()

    def attach(self, kernel: KernelArtifacts | None = None) -> drgn.Program:
        """(Re)attach drgn, with *kernel*'s debug info (default: the booted one)."""
        self.detach()
        self.prog = inspect.attach(self.vm.spec.run_dir / "drgn-qmp.sock", kernel or self.kernel)
        if self._watcher is not None:
            self._watcher.prog = self.prog
        return self.prog

    @property
    def agent(self) -> AgentClient:
        assert self.vm.agent is not None
        return self.vm.agent

    def pid(self, proc: str) -> int:
        """Guest pid of the agent's process named *proc*."""
        procs = self.agent.procs()
        if proc not in procs:
            from .model import UserError

            raise UserError(f"no guest process named {proc!r} (have: {', '.join(procs) or 'none'})")
        return procs[proc]

    @contextlib.contextmanager
    def stopped(self) -> Iterator[None]:
        """Stop the guest's CPUs for the duration (a consistent view): with
        QMP, or through the gdbstub while watchpoints are armed (a stop the
        lab asks for must not look like, or hide, a watchpoint hit)."""
        if self._watcher is not None and self._watcher.connected:
            with self._watcher.paused():
                yield
            return
        self.vm.qmp.cmd("stop")
        try:
            yield
        finally:
            self.vm.qmp.cmd("cont")
