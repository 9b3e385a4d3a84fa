"""Attach drgn to a running guest through QEMU's QMP socket.

Chosen over mapping the guest's RAM and NVDIMM files as physical memory
segments because it needs no knowledge of the guest's physical layout
(vmcoreinfo comes from QEMU's vmcoreinfo device) and drgn reads memory
through /proc/QEMU_PID/mem once attached over a Unix socket, which is as
fast for the bulk read (see docs/ARCHITECTURE.md).
"""

from __future__ import annotations

from pathlib import Path

import drgn

from ..model import KernelArtifacts, UserError

__all__ = ["InspectError", "attach", "debug_files_for"]


class InspectError(UserError):
    """A question about kernel state that has no answer: a PFN outside every
    device, a pid that has exited, an address with no mapping, debug info that
    does not match. The message names what was asked."""


def debug_files_for(kernel: KernelArtifacts) -> list[Path]:
    """vmlinux and the DWARF files of the modules the guest loads."""
    return [kernel.vmlinux, *kernel.module_debug]


def attach(qmp_socket: Path, kernel: KernelArtifacts) -> drgn.Program:
    """A Program reading the guest behind *qmp_socket* with *kernel*'s debug info.

    :raises InspectError: if the debug info does not match the running kernel.
    """
    prog = drgn.Program()
    prog.set_qemu_qmp(str(qmp_socket))
    try:
        prog.load_debug_info([str(p) for p in debug_files_for(kernel)])
    except drgn.MissingDebugInfoError as exc:
        # drgn matches files by build ID: a missing vmlinux means the cached
        # debug info belongs to another build than the one running.
        if "kernel" in str(exc).split("missing debugging symbols for", 1)[-1][:200]:
            raise InspectError(
                f"debug info of {kernel.name} ({kernel.vmlinux}) does not match the running "
                f"kernel: {exc}"
            ) from exc
    running = prog["init_uts_ns"].name.release.string_().decode()
    if running != kernel.release:
        raise InspectError(f"the guest runs {running}, but the debug info is for {kernel.release}")
    return prog
