"""Attach drgn to a running guest through QEMU's QMP socket.

Chosen over mapping the guest's RAM and NVDIMM files as physical memory
segments because it needs no knowledge of the guest's physical layout
(vmcoreinfo comes from QEMU's vmcoreinfo device) and drgn reads memory
through /proc/QEMU_PID/mem once attached over a Unix socket, which is as
fast for the bulk read (see docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import gc
import socket
from pathlib import Path

import drgn

from ..errors import LabFailure
from ..model import KernelArtifacts

__all__ = ["InspectError", "attach", "debug_files_for"]


class InspectError(LabFailure):
    """A question about kernel state that has no answer: a PFN outside every
    device, a pid that has exited, an address with no mapping, debug info that
    does not match. The message names what was asked."""


def debug_files_for(kernel: KernelArtifacts) -> list[Path]:
    """vmlinux and the DWARF files of the modules the guest loads."""
    return [kernel.vmlinux, *kernel.module_debug]


def _check_qmp_free(path: Path, timeout: float = 5.0) -> None:
    """Fail fast if another client holds the QMP socket.

    QEMU serves one client per QMP socket and greets it at once; a second
    client waits, silently, in the listen backlog. drgn's set_qemu_qmp() has
    no timeout, so the greeting is checked here first.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
            greeting = s.recv(4096)
        except FileNotFoundError as exc:
            raise InspectError(f"no QMP socket at {path}: is the VM running?") from exc
        except (socket.timeout, ConnectionError) as exc:
            raise InspectError(
                f"QMP socket {path} is held by another drgn Program (close it first)") from exc
    if b"QMP" not in greeting:
        raise InspectError(f"{path} did not greet like QMP: {greeting[:80]!r}")


def attach(qmp_socket: Path, kernel: KernelArtifacts) -> drgn.Program:
    """A Program reading the guest behind *qmp_socket* with *kernel*'s debug info.

    :raises InspectError: if the QMP socket is busy or missing, or the debug
        info does not match the running kernel.
    """
    _check_qmp_free(qmp_socket)
    prog = drgn.Program()
    prog.set_qemu_qmp(str(qmp_socket))
    problem = _load_matching_debug_info(prog, kernel)
    if problem:
        # Drop the Program before raising: it holds QEMU's only QMP
        # connection on this socket, and an exception's traceback would keep
        # it alive.
        del prog
        gc.collect()
        raise InspectError(problem)
    return prog


def _load_matching_debug_info(prog: drgn.Program, kernel: KernelArtifacts) -> str | None:
    """Load *kernel*'s debug info into *prog*; the reason it does not fit, if so."""
    try:
        prog.load_debug_info([str(p) for p in debug_files_for(kernel)])
    except drgn.MissingDebugInfoError:
        pass  # judged below: what matters is whether vmlinux matched
    # drgn matches files by build ID and ignores a vmlinux of another build,
    # leaving the kernel without symbols.
    try:
        running = prog["init_uts_ns"].name.release.string_().decode()
    except LookupError:
        return (f"debug info of {kernel.name} ({kernel.vmlinux}) does not match the running "
                f"kernel (build IDs differ)")
    if running != kernel.release:
        return f"the guest runs {running}, but the debug info is for {kernel.release}"
    return None
