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
from .plan import KernelChoice
from .launch import boot_spec, start
from .vm import Vm

__all__ = ["Session"]


class Session:
    """One booted kernel with drgn attached. Use as a context manager."""

    def __init__(self, vm: Vm, kernel: KernelChoice, prog: drgn.Program):
        self.vm = vm
        self.choice = kernel
        self.kernel: KernelArtifacts = kernel.artifacts
        self.prog = prog
        self._watcher = None

    @property
    def kernel_spelling(self) -> str:
        """The kernel as the user named it (a name or a PATH)."""
        return self.choice.spelling

    @classmethod
    def boot(cls, kernel: str | KernelChoice | KernelArtifacts, *,
             dax: Sequence[DaxSpec] = DEFAULT_DAX, say=print, progress=None,
             ready_timeout: float = 120.0, events: bool = False, cold: bool = False,
             kernel_args: Sequence[str] = ()) -> Session:
        """Boot *kernel* (a name, a PATH to a tree built in place, or a
        choice already resolved), wait until its devices are ready and
        attach drgn. With *events*, QEMU also serves a gdbstub for
        :attr:`watcher` (and the plan gives the guest one CPU). Unless
        *cold*, the guest starts from a saved post-boot state where it can
        (:mod:`lab.warm`). *kernel_args* go on the guest kernel's command
        line (a restore then needs a state saved with them)."""
        from .launch import resolve_kernel

        choice = resolve_kernel(kernel, progress=progress)
        spec = cls.plan(choice, dax=dax, say=say, progress=progress, events=events, cold=cold,
                        kernel_args=kernel_args)
        attached = {}

        def attach(vm: Vm) -> None:
            attached["prog"] = inspect.attach(vm.spec.run_dir / "drgn-qmp.sock", choice.artifacts)

        vm = start(spec, say=say, ready_timeout=ready_timeout, alongside=attach,
                   progress=progress)
        return cls(vm, choice, attached.pop("prog"))

    @staticmethod
    def plan(kernel: str | KernelChoice | KernelArtifacts, *, dax: Sequence[DaxSpec] = DEFAULT_DAX,
             say=print, progress=None, events: bool = False, cold: bool = False,
             kernel_args: Sequence[str] = ()):
        """The VmSpec :meth:`boot` starts, with the same arguments (what
        ``--show-command`` prints)."""
        return boot_spec(kernel, dax=dax, events=events, cold=cold, say=say, progress=progress,
                         cmdline_extra=kernel_args)

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
