"""Page-table entry and VMA of a user address in a guest process (x86-64)."""

from __future__ import annotations

import drgn
from drgn import Object
from drgn.helpers.linux.mm import phys_to_virt, vma_find
from drgn.helpers.linux.pid import find_task

from ..model import PteState, VmaState
from .attach import InspectError

__all__ = ["pte_state", "vma_state", "devmap_supported", "walk", "decode_entry", "X86_BITS"]

# arch/x86/include/asm/pgtable_types.h. These are macros, absent from DWARF:
# they are the x86-64 page-table format itself, not a kernel version detail.
X86_BITS = {
    "present": 0,   # _PAGE_BIT_PRESENT
    "write": 1,     # _PAGE_BIT_RW
    "young": 5,     # _PAGE_BIT_ACCESSED
    "dirty": 6,     # _PAGE_BIT_DIRTY
    "huge": 7,      # _PAGE_BIT_PSE (in a PMD or PUD)
    "special": 9,   # _PAGE_BIT_SPECIAL = _PAGE_BIT_SOFTW1
    "devmap": 57,   # _PAGE_BIT_DEVMAP = _PAGE_BIT_SOFTW4, where the kernel has it
}
_PFN_MASK = ((1 << 52) - 1) & ~0xFFF  # PTE_PFN_MASK with 52 physical bits
_LEVELS = ("PGD", "P4D", "PUD", "PMD", "PTE")
_SHIFTS = {"PGD": 39, "P4D": 39, "PUD": 30, "PMD": 21, "PTE": 12}

# Functions that exist only in kernels with a devmap page-table bit
# (ARCH_HAS_PTE_DEVMAP; removed in Linux 6.17 by "mm: remove devmap related
# functions and page table bits"): the GUP-fast devmap leaf walkers (renamed
# from __gup_device_huge in 6.10) and follow_devmap_pmd (until 6.13).
_DEVMAP_SYMBOLS = ("gup_fast_devmap_leaf", "__gup_device_huge", "follow_devmap_pmd")


def devmap_supported(prog: drgn.Program) -> bool:
    """Whether this kernel's page tables have a devmap bit."""
    key = "devdax-lab.devmap"
    if key not in prog.cache:
        found = False
        for name in _DEVMAP_SYMBOLS:
            try:
                prog.symbol(name)
                found = True
                break
            except LookupError:
                pass
        prog.cache[key] = found
    return prog.cache[key]


def decode_entry(level: str, raw: int, devmap: bool) -> PteState:
    """Decode one x86-64 page-table entry found at *level*."""
    bit = {name: bool(raw >> b & 1) for name, b in X86_BITS.items()}
    leaf_huge = level in ("PMD", "PUD") and bit["huge"]
    return PteState(
        level=level,
        raw=raw,
        present=bit["present"],
        write=bit["write"],
        dirty=bit["dirty"],
        young=bit["young"],
        huge=leaf_huge,
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
    """The (level, raw entry) that maps *address* in *mm*, or None if unmapped."""
    try:
        five_level = bool(prog["__pgtable_l5_enabled"].value_())
    except KeyError:
        five_level = False
    levels = _LEVELS if five_level else ("PGD", "PUD", "PMD", "PTE")
    table = mm.pgd.value_()
    for level in levels:
        shift = 48 if (level == "PGD" and five_level) else _SHIFTS[level]
        index = (address >> shift) & 511
        raw = prog.read_u64(table + 8 * index)
        if not raw & 1:
            return (level, raw) if level in ("PUD", "PMD", "PTE") and raw else None
        if level == "PTE" or (level in ("PUD", "PMD") and raw >> X86_BITS["huge"] & 1):
            return level, raw
        table = phys_to_virt(prog, raw & _PFN_MASK).value_()
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
