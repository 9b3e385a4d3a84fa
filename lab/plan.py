"""The boot plan: how a guest is started, as a pure function of what was
found on this machine (:class:`BootInputs`) and what was asked for (events,
a shell, extra kernel arguments).

`devdax-lab boot`, the interactive shell, `run`, `compare`, the notebook's
``Lab.boot`` / ``Session.boot`` and every ``--show-command`` start from
:func:`plan`, and :class:`lab.vm.Vm` launches exactly
:func:`lab.vm.launch_command` of the spec it returns: what ``--show-command``
prints is what runs. The I/O that finds the inputs (kernel, image,
accelerator, prepared NVDIMM files) is :mod:`lab.launch`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .model import DaxSpec, KernelArtifacts, VmSpec, format_size

__all__ = ["RUN_DIR", "KernelChoice", "BootInputs", "plan", "prepare_arg"]

# What a plan calls the run directory until `Vm.launch` makes the real one.
RUN_DIR = Path("RUN_DIR")


@dataclass(frozen=True)
class KernelChoice:
    """A kernel as the user spelled it and as it was resolved, once per run.

    ``spelling`` is what was typed (``after``, a name from `devdax-lab kernel
    build`, or a PATH to a tree built in place); it goes into the run record
    and meta.json as typed, because a tree's directory name is not a kernel
    name anything else could look up."""

    spelling: str
    artifacts: KernelArtifacts
    source: str  # the catalog entry's apt source, "built" or "tree"

    @property
    def name(self) -> str:
        return self.artifacts.name


@dataclass(frozen=True)
class BootInputs:
    """What a boot of one kernel with one device layout needs from this
    machine, found (and made, once) by :func:`lab.launch.boot_inputs`."""

    kernel: KernelArtifacts
    initrd: Path
    accel: str
    dax: tuple[DaxSpec, ...]
    nvdimms: tuple[Path, ...]  # prepared (cached) NVDIMM files, one per device
    boot_file: Path  # what -kernel loads (vmlinux by PVH when it can)
    firmware: Path | None = None
    qemu: str = "qemu-system-x86_64"


def prepare_arg(dax: Sequence[DaxSpec]) -> str:
    """``devdax_lab.prepare=`` value: one ``ALIGN[:SIZE]`` per region, in order."""
    parts = []
    for d in dax:
        part = format_size(d.align)
        if d.namespace_size:
            part += ":" + format_size(d.namespace_size)
        parts.append(part)
    return ",".join(parts)


def plan(inputs: BootInputs, *, events: bool = False, shell: bool = False,
         cmdline_extra: Sequence[str] = (), cpus: int | None = None,
         prepare: bool = False) -> VmSpec:
    """The VmSpec of one boot.

    :param events: QEMU also serves a gdbstub (watchpoints), and the guest
        gets one CPU unless *cpus* says otherwise: QEMU reports one
        watchpoint per stop, so two CPUs hitting at once lose one hit
        (BENCHMARKS.md, "Events").
    :param shell: the guest console on this terminal, with a shell on it.
    :param prepare: the throw-away boot that writes NVDIMM labels into
        ``inputs.nvdimms`` themselves (not private copies) and powers off.
    """
    extra = list(cmdline_extra)
    if shell:
        extra.append("devdax_lab.shell=1")
    if prepare:
        extra.append(f"devdax_lab.prepare={prepare_arg(inputs.dax)}")
    return VmSpec(
        kernel=inputs.kernel, initrd=inputs.initrd, run_dir=RUN_DIR,
        nvdimm_sources=inputs.nvdimms, nvdimms_in_place=prepare, dax=inputs.dax,
        cpus=cpus or (1 if events else 2), accel=inputs.accel, qemu=inputs.qemu,
        cmdline_extra=tuple(extra), gdbstub=events, boot_file=inputs.boot_file,
        firmware=inputs.firmware, shell=shell,
    )
