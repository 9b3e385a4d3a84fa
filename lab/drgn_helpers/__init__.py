"""drgn helpers for who holds a page: folio reference, map and pin counts,
``struct dev_pagemap`` and its ``percpu_ref``, and x86-64 page-table walks.

Written in drgn's helper style (a ``Program`` or an ``Object`` in, the
kernel's own names) and importable with nothing but drgn installed: use them
from ``drgn -k``, ``drgn -c vmcore`` or the lab. Differences between kernel
versions are found by probing the types, never by comparing versions; each
probe names the commit that moved the field.

    >>> from lab.drgn_helpers import *
    >>> folio = page_folio(pfn_to_page(prog, 0x240000))
    >>> folio_ref_count(folio), folio_mapcount(folio), folio_maybe_dma_pinned(folio)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import drgn
from drgn import IntegerLike, Object, Program, cast
from drgn.helpers.linux.cpumask import for_each_possible_cpu
from drgn.helpers.linux.mm import compound_head, compound_nr, compound_order, phys_to_virt
from drgn.helpers.linux.percpu import per_cpu_ptr
from drgn.helpers.linux.xarray import xa_for_each, xa_load

from ..errors import LabFailure  # standard library only: no lab machinery

__all__ = [
    "UnsupportedKernelError",
    "has_member",
    "page_folio",
    "page_ref_count",
    "folio_ref_count",
    "page_mapcount_raw",
    "folio_mapcount",
    "folio_entire_mapcount",
    "folio_large_mapcount",
    "folio_nr_pages_mapped",
    "folio_pincount",
    "folio_maybe_dma_pinned",
    "GUP_PIN_COUNTING_BIAS",
    "page_pgmap",
    "find_dev_pagemap",
    "for_each_dev_pagemap",
    "dev_pagemap_pfn_ranges",
    "percpu_ref_mode",
    "percpu_ref_sum",
    "PageTableEntry",
    "X86_PTE_BITS",
    "decode_pte_bits",
    "pte_devmap_supported",
    "page_table_walk",
]


class UnsupportedKernelError(LabFailure):
    """The kernel being debugged lacks what a helper needs (a config option
    or a structure member). Deliberately not a LookupError: a missing symbol
    here is an answer about the kernel, not a lookup to retry. (A lab error,
    so ``devdax-lab`` prints it as one line.)"""


def has_member(prog: Program, type_name: str, member: str) -> bool:
    """Whether the type named *type_name* has *member* (cached per program)."""
    key = ("drgn_helpers.has_member", type_name, member)
    try:
        return prog.cache[key]
    except KeyError:
        pass
    try:
        found = prog.type(type_name).has_member(member)
    except LookupError:
        found = False
    prog.cache[key] = found
    return found


def page_folio(page: Object) -> Object:
    """
    Get the folio containing a page.

    :param page: ``struct page *``
    :return: ``struct folio *``
    """
    return cast("struct folio *", compound_head(page))


def _as_folio(obj: Object) -> Object:
    """A ``struct folio *`` from a ``struct folio *`` or ``struct page *``."""
    if obj.type_.type.type_name() == "struct folio":
        return obj
    return page_folio(obj)


def _is_large(folio: Object) -> bool:
    return compound_order(cast("struct page *", folio)).value_() > 0


def page_ref_count(page: Object) -> int:
    """
    Get the raw ``_refcount`` of one page (0 for a tail page: the kernel
    keeps a folio's count in its head).

    :param page: ``struct page *``
    """
    return page._refcount.counter.value_()


def folio_ref_count(folio: Object) -> int:
    """
    Get the reference count of a folio, as ``folio_ref_count()`` does.

    :param folio: ``struct folio *`` (a ``struct page *`` means its folio)
    """
    return _as_folio(folio)._refcount.counter.value_()


def page_mapcount_raw(page: Object) -> int:
    """
    Get the raw ``_mapcount`` of one page: -1 when no page-table entry maps
    it (on kernels with CONFIG_NO_PAGE_MAPCOUNT, a large folio's pages keep
    -1 and only the folio's counters move).

    :param page: ``struct page *``
    """
    return page._mapcount.counter.value_()


def folio_entire_mapcount(folio: Object) -> int:
    """
    Get how many times a large folio is mapped as a whole (by PMD or PUD),
    as ``folio_entire_mapcount()`` does.

    Kernels before the folio rmap rework of Linux 6.3 kept it as
    ``compound_mapcount`` of the first tail page (``struct page``); the
    member is probed and either is read.

    :param folio: ``struct folio *`` (or ``struct page *``) of a large folio
    :raises ValueError: if the folio is not large
    """
    folio = _as_folio(folio)
    if not _is_large(folio):
        raise ValueError("folio_entire_mapcount() of an order-0 folio: it has no entire mapcount")
    if has_member(folio.prog_, "struct folio", "_entire_mapcount"):
        return folio._entire_mapcount.counter.value_() + 1
    return cast("struct page *", folio)[1].compound_mapcount.counter.value_() + 1


def folio_large_mapcount(folio: Object) -> int:
    """
    Get the total mapcount of a large folio, as ``folio_large_mapcount()`` does.

    ``_large_mapcount`` came with "mm: track mapcount of large folios in
    single value" (05c5323b2a34, Linux 6.11).

    :param folio: ``struct folio *`` (or ``struct page *``) of a large folio
    :raises ValueError: if the folio is not large
    :raises UnsupportedKernelError: on kernels before 6.11
    """
    folio = _as_folio(folio)
    if not _is_large(folio):
        raise ValueError("folio_large_mapcount() of an order-0 folio: it has no large mapcount")
    if not has_member(folio.prog_, "struct folio", "_large_mapcount"):
        raise UnsupportedKernelError(
            "struct folio has no _large_mapcount (added in Linux 6.11 by 05c5323b2a34); "
            "use folio_mapcount()")
    return folio._large_mapcount.counter.value_() + 1


def folio_nr_pages_mapped(folio: Object) -> int:
    """
    Get ``_nr_pages_mapped`` of a large folio (maintained only with
    CONFIG_PAGE_MAPCOUNT since "mm: CONFIG_NO_PAGE_MAPCOUNT to prepare for
    not maintain per-page mapcounts in large folios", Linux 6.15).

    :param folio: ``struct folio *`` (or ``struct page *``) of a large folio
    :raises UnsupportedKernelError: if the member is gone
    """
    folio = _as_folio(folio)
    if not has_member(folio.prog_, "struct folio", "_nr_pages_mapped"):
        raise UnsupportedKernelError("struct folio has no _nr_pages_mapped on this kernel")
    return folio._nr_pages_mapped.counter.value_()


def folio_mapcount(folio: Object) -> int:
    """
    Get how many page-table entries map a folio, as ``folio_mapcount()`` does.

    For a large folio this is ``_large_mapcount`` + 1 where it exists (Linux
    6.11+); before, the entire mapcount plus every page's mapcount.

    :param folio: ``struct folio *`` (a ``struct page *`` means its folio)
    """
    folio = _as_folio(folio)
    if not _is_large(folio):
        return folio._mapcount.counter.value_() + 1
    if has_member(folio.prog_, "struct folio", "_large_mapcount"):
        return folio._large_mapcount.counter.value_() + 1
    page = cast("struct page *", folio)
    total = folio_entire_mapcount(folio)
    for i in range(compound_nr(page).value_()):
        total += page[i]._mapcount.counter.value_() + 1
    return total


# include/linux/mm.h: #define GUP_PIN_COUNTING_BIAS (1U << 10)
GUP_PIN_COUNTING_BIAS = 1 << 10


def folio_pincount(folio: Object) -> int | None:
    """
    Get a large folio's ``_pincount`` (FOLL_PIN pins), or None for an
    order-0 folio, whose pins are counted in ``_refcount`` in steps of
    :data:`GUP_PIN_COUNTING_BIAS`.

    ``compound_pincount`` in the first tail page became ``folio->_pincount``
    in Linux 6.3 ("mm: remove folio_pincount_ptr() and
    head_compound_pincount()", 94688e8eb453); both are probed.

    :param folio: ``struct folio *`` (or ``struct page *``)
    """
    folio = _as_folio(folio)
    if not _is_large(folio):
        return None
    if has_member(folio.prog_, "struct folio", "_pincount"):
        return folio._pincount.counter.value_()
    page = cast("struct page *", folio)
    return page[1].compound_pincount.counter.value_()


def folio_maybe_dma_pinned(folio: Object) -> bool:
    """
    Whether a folio may be pinned for DMA, as ``folio_maybe_dma_pinned()``
    decides it: a large folio's ``_pincount``, else ``_refcount`` at or above
    :data:`GUP_PIN_COUNTING_BIAS`.

    :param folio: ``struct folio *`` (or ``struct page *``)
    """
    folio = _as_folio(folio)
    pins = folio_pincount(folio)
    if pins is not None:
        return pins > 0
    return folio_ref_count(folio) >= GUP_PIN_COUNTING_BIAS


def page_pgmap(page: Object) -> Object:
    """
    Get the ``struct dev_pagemap *`` of a ZONE_DEVICE page, as
    ``page_pgmap()`` does.

    ``pgmap`` moved from ``struct page`` to ``struct folio`` in Linux 6.15
    ("mm: allow compound zone device pages", Alistair Popple's ZONE_DEVICE
    refcount series): the member is probed.

    :param page: ``struct page *`` (ZONE_DEVICE; for other pages the field
        means something else: check with :func:`find_dev_pagemap`)
    :return: ``struct dev_pagemap *``
    """
    prog = page.prog_
    if has_member(prog, "struct page", "pgmap"):
        return page.pgmap
    if has_member(prog, "struct folio", "pgmap"):
        return page_folio(page).pgmap
    raise UnsupportedKernelError(
        "neither struct page nor struct folio has pgmap: this kernel has no ZONE_DEVICE")


def _pgmap_array(prog: Program) -> Object:
    try:
        return prog["pgmap_array"].address_of_()
    except KeyError:
        raise UnsupportedKernelError(
            "this kernel has no pgmap_array (built without CONFIG_ZONE_DEVICE, or "
            "mm/memremap.c's symbols are missing from the debug info)") from None


def find_dev_pagemap(prog: Program, pfn: IntegerLike) -> Object:
    """
    Find the ``struct dev_pagemap`` covering a PFN, as ``get_dev_pagemap()``
    looks it up (in ``pgmap_array``), without taking a reference.

    :param pfn: ``unsigned long``, any PFN
    :return: ``struct dev_pagemap *`` (NULL if no device covers *pfn*)
    :raises UnsupportedKernelError: on a kernel without ``pgmap_array``
    """
    entry = xa_load(_pgmap_array(prog), pfn)
    return cast("struct dev_pagemap *", entry)


def for_each_dev_pagemap(prog: Program) -> Iterator[Object]:
    """
    Iterate over every ``struct dev_pagemap`` registered in ``pgmap_array``
    (once each, in PFN order of their first range).

    :return: Iterator of ``struct dev_pagemap *`` objects.
    :raises UnsupportedKernelError: on a kernel without ``pgmap_array``
    """
    seen: set[int] = set()
    for _, entry in xa_for_each(_pgmap_array(prog)):
        address = entry.value_()
        if address and address not in seen:
            seen.add(address)
            yield cast("struct dev_pagemap *", entry)


# include/linux/memremap.h: PGMAP_ALTMAP_VALID = 1 << 0
_PGMAP_ALTMAP_VALID = 1


def dev_pagemap_pfn_ranges(pgmap: Object) -> list[tuple[int, int]]:
    """
    Get the PFNs of a ``dev_pagemap`` that hold device memory, as
    ``pfn_first()``/``pfn_end()`` in mm/memremap.c compute them: the first
    range starts after the pages an altmap reserves for the memmap itself
    (their struct pages are never initialized).

    :param pgmap: ``struct dev_pagemap *``
    :return: [(first PFN, end PFN exclusive)] per range
    """
    out = []
    for i in range(pgmap.nr_range.value_()):
        first = pgmap.ranges[i].start.value_() >> 12
        end = (pgmap.ranges[i].end.value_() + 1) >> 12
        if i == 0 and pgmap.flags.value_() & _PGMAP_ALTMAP_VALID:
            first += pgmap.altmap.reserve.value_() + pgmap.altmap.free.value_()
        out.append((first, end))
    return out


# include/linux/percpu-refcount.h: __PERCPU_REF_ATOMIC = 1 << 0,
# __PERCPU_REF_DEAD = 1 << 1, kept in the low bits of percpu_count_ptr.
_PERCPU_REF_ATOMIC = 1
_PERCPU_REF_DEAD = 2


def percpu_ref_mode(ref: Object) -> str:
    """
    Get the mode of a ``percpu_ref``: ``"percpu"``, ``"atomic"`` or ``"dead"``.

    :param ref: ``struct percpu_ref`` (or a pointer to one)
    """
    ptr = ref.percpu_count_ptr.value_()
    if ptr & _PERCPU_REF_DEAD:
        return "dead"
    if ptr & _PERCPU_REF_ATOMIC:
        return "atomic"
    return "percpu"


def percpu_ref_sum(ref: Object) -> int:
    """
    Get the count of a ``percpu_ref``, as ``percpu_ref_is_zero()`` would sum it.

    In per-CPU mode the count is the atomic part plus every possible CPU's
    counter, minus PERCPU_COUNT_BIAS (``1 << (BITS_PER_LONG - 1)``), which
    the atomic part carries while per-CPU counting is on. Only the sum means
    anything: a get and its put may land on different CPUs. A negative sum
    (a bug) is returned as such.

    :param ref: ``struct percpu_ref`` (or a pointer to one)
    """
    prog = ref.prog_
    atomic = ref.data.count.counter.value_()
    if percpu_ref_mode(ref) != "percpu":
        return atomic
    bits = 8 * prog.type("unsigned long").size
    counters = Object(prog, "unsigned long *", ref.percpu_count_ptr.value_() & ~3)
    total = sum(per_cpu_ptr(counters, cpu)[0].value_() for cpu in for_each_possible_cpu(prog))
    count = (atomic + total - (1 << (bits - 1))) % (1 << bits)
    if count >= 1 << (bits - 1):
        count -= 1 << bits
    return count


# arch/x86/include/asm/pgtable_types.h. Macros, absent from DWARF: the
# x86-64 page-table format itself, not a kernel version detail.
X86_PTE_BITS = {
    "present": 0,   # _PAGE_BIT_PRESENT
    "write": 1,     # _PAGE_BIT_RW
    "user": 2,      # _PAGE_BIT_USER
    "young": 5,     # _PAGE_BIT_ACCESSED
    "dirty": 6,     # _PAGE_BIT_DIRTY
    "huge": 7,      # _PAGE_BIT_PSE (in a PMD or PUD)
    "global": 8,    # _PAGE_BIT_GLOBAL
    "special": 9,   # _PAGE_BIT_SPECIAL = _PAGE_BIT_SOFTW1
    "devmap": 57,   # _PAGE_BIT_DEVMAP = _PAGE_BIT_SOFTW4, where the kernel has it
    "nx": 63,       # _PAGE_BIT_NX
}
_PFN_MASK = ((1 << 52) - 1) & ~0xFFF  # PTE_PFN_MASK with 52 physical bits
_SHIFTS = {"PGD": 39, "P4D": 39, "PUD": 30, "PMD": 21, "PTE": 12}

# Functions that exist only in kernels with a devmap page-table bit
# (ARCH_HAS_PTE_DEVMAP; removed in Linux 6.17 by "mm: remove devmap related
# functions and page table bits"): the GUP-fast devmap leaf walkers (renamed
# from __gup_device_huge in 6.10) and follow_devmap_pmd (until 6.13).
_DEVMAP_SYMBOLS = ("gup_fast_devmap_leaf", "__gup_device_huge", "follow_devmap_pmd")


def pte_devmap_supported(prog: Program) -> bool:
    """Whether this kernel's page tables have a devmap bit (x86 SOFTW4)."""
    key = "drgn_helpers.devmap"
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


def decode_pte_bits(raw: int, *, devmap: bool = True) -> dict[str, bool]:
    """The x86-64 bits of a page-table entry by name (:data:`X86_PTE_BITS`);
    without *devmap* (a kernel without the bit) ``devmap`` is left out."""
    bits = {name: bool(raw >> bit & 1) for name, bit in X86_PTE_BITS.items()}
    if not devmap:
        del bits["devmap"]
    return bits


@dataclass(frozen=True)
class PageTableEntry:
    """One level of a page-table walk: where the entry is, its raw value,
    its bits by name and the PFN it points at (the next table's, or the
    mapped page's when ``leaf``)."""

    level: str
    address: int
    raw: int
    bits: dict
    pfn: int | None
    leaf: bool


def page_table_walk(mm: Object, address: IntegerLike) -> list[PageTableEntry]:
    """
    Walk an x86-64 page table down to *address*, returning every level's
    entry, top first. The walk stops at a non-present entry or at a leaf (a
    PTE, or a PUD/PMD with the PSE bit).

    :param mm: ``struct mm_struct *``
    :param address: user virtual address
    """
    prog = mm.prog_
    address = int(address)
    try:
        five_level = bool(prog["__pgtable_l5_enabled"].value_())
    except KeyError:
        five_level = False
    levels = ("PGD", "P4D", "PUD", "PMD", "PTE") if five_level else ("PGD", "PUD", "PMD", "PTE")
    devmap = pte_devmap_supported(prog)
    table = mm.pgd.value_()
    out = []
    for level in levels:
        shift = 48 if (level == "PGD" and five_level) else _SHIFTS[level]
        entry_address = table + 8 * ((address >> shift) & 511)
        raw = prog.read_u64(entry_address)
        bits = decode_pte_bits(raw, devmap=devmap)
        leaf = bits["present"] and (level == "PTE" or (level in ("PUD", "PMD") and bits["huge"]))
        pfn = (raw & _PFN_MASK) >> 12 if bits["present"] else None
        out.append(PageTableEntry(level, entry_address, raw, bits, pfn, leaf))
        if not bits["present"] or leaf:
            break
        table = phys_to_virt(prog, raw & _PFN_MASK).value_()
    return out
