"""Crash dumps of the lab's guests: write one through QMP
``dump-guest-memory`` (ELF, with the VMCOREINFO note QEMU's vmcoreinfo
device provides, so drgn needs nothing else), and open one with the same
debug info and readers as a live guest, no VM."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import drgn

from ..errors import UserError
from ..model import KernelArtifacts
from .attach import InspectError, _load_matching_debug_info

__all__ = ["Core", "DumpInfo", "dump_guest_memory", "open_core", "parse_dump_at", "dump_due"]


@dataclass(frozen=True)
class DumpInfo:
    """Where a dump went, its size in bytes and how long QEMU took."""

    path: Path
    size: int
    seconds: float


def _check_target(path: str | Path) -> Path:
    path = Path(path).resolve()
    if not path.parent.is_dir():
        raise UserError(f"cannot write a dump to {path}: {path.parent} is not a directory "
                        f"(create it first)")
    if path.is_dir():
        raise UserError(f"{path} is a directory: give the dump's file name")
    return path


def dump_guest_memory(qmp, path: str | Path, *, timeout: float = 600.0,
                      poll: float = 0.2) -> DumpInfo:
    """Write the guest's memory (RAM and NVDIMMs) to *path* as an ELF vmcore.

    *qmp* is the VM's QMP client (``Vm.qmp``). The dump runs detached and is
    polled with ``query-dump``, so the client's own timeout does not bound
    it; QEMU stops the guest's CPUs while it writes and resumes them after.

    :raises UserError: if *path* cannot be written.
    :raises InspectError: if QEMU reports the dump failed or it takes longer
        than *timeout* seconds.
    """
    from qemu.qmp import ExecuteError

    path = _check_target(path)
    started = time.monotonic()
    while True:
        try:
            qmp.cmd("dump-guest-memory", paging=False, protocol=f"file:{path}", detach=True,
                    format="elf")
            break
        except ExecuteError as exc:
            # A guest restored from its saved state (lab.warm) is an incoming
            # migration that QEMU takes a moment to call finished; a dump
            # refuses to start until then ("migration/snapshot in progress").
            if "migration" not in str(exc) or time.monotonic() - started > 30:
                raise InspectError(f"QEMU refused to dump the guest's memory: {exc}") from exc
            time.sleep(poll)
    while True:
        status = qmp.cmd("query-dump")
        if status["status"] == "completed":
            break
        if status["status"] == "failed":
            path.unlink(missing_ok=True)
            raise InspectError(f"QEMU could not dump the guest's memory to {path}")
        if time.monotonic() - started > timeout:
            raise InspectError(f"dumping the guest's memory to {path} took over {timeout:.0f} s "
                               f"({status.get('completed', 0)} of {status.get('total', '?')} bytes)")
        time.sleep(poll)
    return DumpInfo(path=path, size=path.stat().st_size, seconds=time.monotonic() - started)


def open_core(vmcore: str | Path, kernel: KernelArtifacts) -> drgn.Program:
    """A Program reading the guest memory in *vmcore* with *kernel*'s debug
    info: what :func:`lab.inspect.attach` gives for a live guest.

    :raises UserError: if *vmcore* is missing or not a core dump.
    :raises InspectError: if the debug info does not match the dumped kernel.
    """
    vmcore = Path(vmcore)
    if not vmcore.is_file():
        raise UserError(f"no core dump at {vmcore} (write one with `devdax-lab run "
                        f"--dump-at STEP` or Lab.dump)")
    prog = drgn.Program()
    try:
        prog.set_core_dump(str(vmcore))
    except (ValueError, OSError) as exc:
        raise UserError(f"{vmcore} is not a kernel core dump drgn can read: {exc}") from exc
    problem = _load_matching_debug_info(prog, kernel)
    if problem:
        raise InspectError(f"{vmcore}: {problem}")
    return prog


def parse_dump_at(text: str) -> int | str:
    """``--dump-at``'s value: a step index, or ``complaint`` (the first step
    after which the kernel complained: an Oops, WARNING, BUG, Bad page...).

    :raises UserError: for anything else.
    """
    if text == "complaint":
        return text
    try:
        step = int(text)
    except ValueError:
        step = -1
    if step < 0:
        raise UserError(f"--dump-at {text}: give a step number (0 is before the first step) "
                        f"or 'complaint'")
    return step


def dump_due(dump_at: int | str | None, step: int, complaints: int, already: bool) -> bool:
    """Whether to dump after *step*, which left *complaints* kernel
    complaints, given ``--dump-at`` *dump_at* and whether a dump was taken."""
    if dump_at is None or already:
        return False
    if dump_at == "complaint":
        return complaints > 0
    return step == dump_at


class Core:
    """A vmcore opened with a kernel's debug info: the lab's readers and the
    drgn plugin's reports on the dumped state, with no VM."""

    def __init__(self, prog: drgn.Program, path: Path, kernel: KernelArtifacts):
        self.prog = prog
        self.path = path
        self.kernel = kernel

    @classmethod
    def open(cls, vmcore: str | Path, kernel: KernelArtifacts) -> Core:
        return cls(open_core(vmcore, kernel), Path(vmcore), kernel)

    def folio(self, pfn: int):
        """:func:`lab.inspect.folio_state` of *pfn* (any PFN)."""
        from .folio import folio_state

        return folio_state(self.prog, pfn, zone_device_only=False)

    def pgmap(self, pfn: int):
        """:func:`lab.inspect.pgmap_state` of the dev_pagemap covering *pfn*."""
        from .pgmap import find_dev_pagemap, pgmap_state

        return pgmap_state(self.prog, find_dev_pagemap(self.prog, pfn))

    def pte(self, pid: int, address: int):
        """:func:`lab.inspect.pte_state` of *address* in process *pid*."""
        from .pgtable import pte_state

        return pte_state(self.prog, pid, address)

    def report(self, command: str, *args: int) -> str:
        """The text the drgn plugin's *command* (``folio``, ``pgmap``,
        ``pte``, ``devdax``) prints."""
        from ..drgn_helpers import plugin

        return getattr(plugin, f"{command}_report")(self.prog, *args)
