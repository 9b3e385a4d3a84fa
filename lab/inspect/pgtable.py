"""Page-table entry and VMA of a user address in a guest process (x86-64)."""

from __future__ import annotations

import drgn
from drgn import Object
from drgn.helpers.linux.mm import vma_find
from drgn.helpers.linux.pid import find_task

from .. import drgn_helpers as helpers
from ..model import PteState, VmaState
from .attach import InspectError

__all__ = ["pte_state", "vma_state", "devmap_supported", "walk", "decode_entry", "X86_BITS"]

# The x86-64 entry format and the devmap probe are `lab.drgn_helpers`'.
X86_BITS = {name: bit for name, bit in helpers.X86_PTE_BITS.items()
            if name in ("present", "write", "young", "dirty", "huge", "special", "devmap")}
devmap_supported = helpers.pte_devmap_supported
_PFN_MASK = ((1 << 52) - 1) & ~0xFFF  # PTE_PFN_MASK with 52 physical bits


def decode_entry(level: str, raw: int, devmap: bool) -> PteState:
    """Decode one x86-64 page-table entry found at *level*."""
    bit = helpers.decode_pte_bits(raw)
    return PteState(
        level=level,
        raw=raw,
        present=bit["present"],
        write=bit["write"],
        dirty=bit["dirty"],
        young=bit["young"],
        huge=level in ("PMD", "PUD") and bit["huge"],
        special=bit["special"],
        devmap=bit["devmap"] if devmap else None,
        pfn=((raw & _PFN_MASK) >> 12) if bit["present"] else None,
    )


def _mm_of(prog: drgn.Program, pid: int) -> Object:
    task = find_task(prog, pid)
    if not task:
        raise InspectError(f"no process with pid {pid} in the guest (has it exited?)")
    if not task.mm:
        raise InspectError(f"pid {pid} has no user address space (a kernel thread, or exiting)")
    return task.mm


def walk(prog: drgn.Program, mm: Object, address: int) -> tuple[str, int] | None:
    """The (level, raw entry) that maps *address* in *mm*, or None if
    unmapped: the last entry of `lab.drgn_helpers.page_table_walk`, a leaf,
    or a non-present but non-empty lower-level entry (a swap or migration
    entry)."""
    last = helpers.page_table_walk(mm, address)[-1]
    if last.leaf:
        return last.level, last.raw
    if last.level in ("PUD", "PMD", "PTE") and last.raw and not last.bits["present"]:
        return last.level, last.raw
    return None


def pte_state(prog: drgn.Program, pid: int, address: int) -> PteState:
    """The entry mapping *address* in process *pid*, at whatever level it is.

    :raises InspectError: if the process is gone or nothing maps *address*.
    """
    mm = _mm_of(prog, pid)
    found = walk(prog, mm, address)
    if found is None:
        raise InspectError(f"no page-table entry maps {address:#x} in pid {pid}")
    level, raw = found
    return decode_entry(level, raw, devmap_supported(prog))


def _vm_flag_names(flags: int) -> tuple[str, ...]:
    """Names of the VM_* bits set in *flags* (include/linux/mm.h, x86-64:
    macros, absent from DWARF; their values have not moved since 6.12)."""
    return tuple(name for name, mask in _VM_FLAGS.items() if flags & mask)


_VM_FLAGS = {
    "VM_READ": 0x1, "VM_WRITE": 0x2, "VM_EXEC": 0x4, "VM_SHARED": 0x8,
    "VM_MAYREAD": 0x10, "VM_MAYWRITE": 0x20, "VM_MAYEXEC": 0x40, "VM_MAYSHARE": 0x80,
    "VM_GROWSDOWN": 0x100, "VM_UFFD_MISSING": 0x200, "VM_PFNMAP": 0x400,
    "VM_LOCKED": 0x2000, "VM_IO": 0x4000, "VM_SEQ_READ": 0x8000, "VM_RAND_READ": 0x10000,
    "VM_DONTCOPY": 0x20000, "VM_DONTEXPAND": 0x40000, "VM_LOCKONFAULT": 0x80000,
    "VM_ACCOUNT": 0x100000, "VM_NORESERVE": 0x200000, "VM_HUGETLB": 0x400000,
    "VM_SYNC": 0x800000, "VM_ARCH_1": 0x1000000, "VM_WIPEONFORK": 0x2000000,
    "VM_DONTDUMP": 0x4000000, "VM_SOFTDIRTY": 0x8000000, "VM_MIXEDMAP": 0x10000000,
    "VM_HUGEPAGE": 0x20000000, "VM_NOHUGEPAGE": 0x40000000, "VM_MERGEABLE": 0x80000000,
}


def vma_state(prog: drgn.Program, pid: int, address: int) -> VmaState:
    """The VMA containing *address* in process *pid*.

    :raises InspectError: if the process is gone or no VMA contains *address*.
    """
    mm = _mm_of(prog, pid)
    vma = vma_find(mm, address)
    if not vma:
        raise InspectError(f"no mapping contains {address:#x} in pid {pid}")
    flags = vma.vm_flags.value_()
    file = None
    if vma.vm_file:
        file = vma.vm_file.f_path.dentry.d_name.name.string_().decode(errors="replace")
    return VmaState(start=vma.vm_start.value_(), end=vma.vm_end.value_(), flags=flags,
                    flag_names=_vm_flag_names(flags), pgoff=vma.vm_pgoff.value_(), file=file)
