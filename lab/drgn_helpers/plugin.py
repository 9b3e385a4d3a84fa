"""drgn plugin: ``folio``, ``pgmap``, ``pte`` and ``devdax`` commands on
drgn's command line, next to its crash-style ones (``%folio 0x240000`` in
the REPL; ``run_command(prog, "folio 0x240000")`` from a script or ``-e``).

Registered as the ``devdax_lab`` entry point of the ``drgn.plugins`` group
(pyproject.toml): drgn imports this module when it starts, and the
decorators below register the commands. Built on `lab.drgn_helpers` only,
so it needs nothing but drgn.
"""

from __future__ import annotations

import argparse
import struct
from collections import Counter
from typing import Any

from drgn import Object, Program, offsetof, sizeof
from drgn.commands import argument
from drgn.commands.linux import linux_kernel_command
from drgn.helpers.linux.mm import (
    compound_head,
    compound_order,
    decode_page_flags,
    page_to_pfn,
    pfn_to_page,
    virt_to_page,
)
from drgn.helpers.linux.pid import find_task

from . import (
    UnsupportedKernelError,
    dev_pagemap_pfn_ranges,
    find_dev_pagemap,
    folio_entire_mapcount,
    folio_large_mapcount,
    folio_mapcount,
    folio_maybe_dma_pinned,
    folio_nr_pages_mapped,
    folio_pincount,
    folio_ref_count,
    for_each_dev_pagemap,
    page_folio,
    page_mapcount_raw,
    page_table_walk,
    percpu_ref_mode,
    percpu_ref_sum,
)

__all__ = ["folio_report", "pgmap_report", "pte_report", "devdax_report"]

_KERNEL_SPACE = 1 << 63


def _page_of(prog: Program, value: int) -> Object:
    """A ``struct page *`` from a PFN, a ``struct page`` address or a
    direct-map address."""
    if value < _KERNEL_SPACE:
        return pfn_to_page(prog, value)
    page_size = sizeof(prog.type("struct page"))
    base = pfn_to_page(prog, 0).value_()
    if base <= value and (value - base) % page_size == 0 and value - base < page_size << 46:
        return Object(prog, "struct page *", value)
    return virt_to_page(prog, value)


def _or_dash(fn, folio: Object) -> str:
    try:
        value = fn(folio)
    except (ValueError, UnsupportedKernelError):
        return "-"
    return "-" if value is None else str(value)


def _pgmap_type(pgmap: Object) -> str:
    text = pgmap.type.format_(type_name=False)
    return text.split(")")[-1].strip()


def folio_report(prog: Program, value: int) -> str:
    """What ``folio PFN|ADDRESS`` prints: the page's folio, its counters in
    the kernel's terms (raw where the name says so), flags and pgmap."""
    page = _page_of(prog, value)
    pfn = page_to_pfn(page).value_()
    head = compound_head(page)
    folio = page_folio(page)
    lines = [
        f"PFN {pfn:#x}  page {page.value_():#x}  folio PFN {page_to_pfn(head).value_():#x}"
        f"  order {compound_order(head).value_()}",
        f"flags: {decode_page_flags(head)}",
        f"refcount {folio_ref_count(folio)}  (folio_ref_count)",
        f"mapcount {folio_mapcount(folio)}  (folio_mapcount)",
        f"_mapcount {page_mapcount_raw(page)}  (this page, raw)",
        f"entire_mapcount {_or_dash(folio_entire_mapcount, folio)}  (folio_entire_mapcount)",
        f"large_mapcount {_or_dash(folio_large_mapcount, folio)}  (folio_large_mapcount)",
        f"nr_pages_mapped {_or_dash(folio_nr_pages_mapped, folio) if compound_order(head) else '-'}",
        f"pincount {_or_dash(folio_pincount, folio)}  (folio_pincount)",
        f"maybe_dma_pinned {'yes' if folio_maybe_dma_pinned(folio) else 'no'}",
    ]
    try:
        pgmap = find_dev_pagemap(prog, pfn)
    except UnsupportedKernelError as exc:
        lines.append(f"pgmap: - ({exc})")
    else:
        lines.append(f"pgmap {pgmap.value_():#x} {_pgmap_type(pgmap)}" if pgmap
                     else "pgmap: none (not a device page)")
    return "\n".join(lines)


def pgmap_report(prog: Program, pfn: int) -> str:
    """What ``pgmap PFN`` prints: the dev_pagemap covering *pfn*."""
    pgmap = find_dev_pagemap(prog, pfn)
    if not pgmap:
        raise ValueError(f"no dev_pagemap covers PFN {pfn:#x}")
    return _describe_pgmap(pgmap)


def _describe_pgmap(pgmap: Object) -> str:
    ranges = [(pgmap.ranges[i].start.value_(), pgmap.ranges[i].end.value_())
              for i in range(pgmap.nr_range.value_())]
    lines = [f"pgmap {pgmap.value_():#x}  type {_pgmap_type(pgmap)}",
             f"vmemmap_shift {pgmap.vmemmap_shift.value_()}"
             f"  (folio size {4096 << pgmap.vmemmap_shift.value_()})"]
    lines += [f"range {start:#x}-{end:#x}  PFN {start >> 12:#x}-{end >> 12:#x}"
              for start, end in ranges]
    lines.append(f"ref {percpu_ref_sum(pgmap.ref)}  ({percpu_ref_mode(pgmap.ref)})")
    return "\n".join(lines)


def pte_report(prog: Program, pid: int, address: int) -> str:
    """What ``pte PID ADDRESS`` prints: every level's entry and its bits."""
    task = find_task(prog, pid)
    if not task:
        raise ValueError(f"no process with pid {pid}")
    if not task.mm:
        raise ValueError(f"pid {pid} has no user address space")
    lines = []
    for entry in page_table_walk(task.mm, address):
        bits = " ".join(name for name, on in entry.bits.items() if on) or "-"
        pfn = f"pfn {entry.pfn:#x}" if entry.pfn is not None else "not present"
        leaf = "  leaf" if entry.leaf else ""
        lines.append(f"{entry.level:<4} {entry.address:#018x}  {entry.raw:#018x}  {pfn}  "
                     f"[{bits}]{leaf}")
    return "\n".join(lines)


def _page_layout(prog: Program) -> tuple[int, int, int, int]:
    """(sizeof struct page, offsets of _refcount, _mapcount and
    compound_head) from the type info."""
    page = prog.type("struct page")
    head = "compound_head" if page.has_member("compound_head") else "compound_info"
    # compound_head became compound_info in Linux 7.1 (8c846c879e22); the
    # low bit still marks a tail page.
    return (sizeof(page), offsetof(page, "_refcount"), offsetof(page, "_mapcount"),
            offsetof(page, head))


def _scan_range(prog: Program, first_pfn: int, count: int):
    """(pfn, refcount, _mapcount, is_tail) of each page, from one read of
    the vmemmap (virtually contiguous for a device's range)."""
    size, ref_off, map_off, head_off = _page_layout(prog)
    raw = prog.read(pfn_to_page(prog, first_pfn).value_(), count * size)
    for i in range(count):
        base = i * size
        refcount, = struct.unpack_from("<i", raw, base + ref_off)
        mapcount, = struct.unpack_from("<i", raw, base + map_off)
        head, = struct.unpack_from("<Q", raw, base + head_off)
        yield first_pfn + i, refcount, mapcount, bool(head & 1)


def devdax_report(prog: Program, *, limit: int = 32) -> str:
    """What ``devdax`` prints: each device-dax ``dev_pagemap``
    (MEMORY_DEVICE_GENERIC) with its ranges and the folios that are mapped,
    pinned or whose refcount differs from the device's idle count (the most
    common head refcount: 0 or 1 depending on the kernel). On kernels whose
    device-dax faults insert PFNs (before 6.15) a mapped page counts nothing
    and is not listed: the kernel does not know it is mapped."""
    generic = prog.constant("MEMORY_DEVICE_GENERIC").value_()
    out = []
    for pgmap in for_each_dev_pagemap(prog):
        if pgmap.type.value_() != generic:
            continue
        out.append(_describe_pgmap(pgmap))
        heads = []
        for start, end in dev_pagemap_pfn_ranges(pgmap):
            heads += [(pfn, ref, mc) for pfn, ref, mc, tail in _scan_range(prog, start, end - start)
                      if not tail]
        idle = Counter(ref for _, ref, _ in heads).most_common(1)[0][0] if heads else 0
        busy = []
        for pfn, ref, mapcount in heads:
            large = pgmap.vmemmap_shift.value_() > 0
            if not large and ref == idle and mapcount < 0:
                continue
            folio = page_folio(pfn_to_page(prog, pfn))
            mapped = folio_mapcount(folio)
            pinned = folio_maybe_dma_pinned(folio)
            if mapped or pinned or folio_ref_count(folio) != idle:
                busy.append(f"  PFN {pfn:#x}  refcount {folio_ref_count(folio)}  "
                            f"mapcount {mapped}  pincount {_or_dash(folio_pincount, folio)}"
                            f"{'  pinned' if pinned else ''}")
        first = dev_pagemap_pfn_ranges(pgmap)[0][0] if heads else 0
        out.append(f"data from PFN {first:#x}  folios {len(heads)}  idle refcount {idle}"
                   f"  busy {len(busy)}")
        out += busy[:limit]
        if len(busy) > limit:
            out.append(f"  ... {len(busy) - limit} more")
        out.append("")
    if not out:
        return "no device-dax dev_pagemap (MEMORY_DEVICE_GENERIC) in pgmap_array"
    return "\n".join(out).rstrip()


def _int(text: str) -> int:
    return int(text, 0)


@linux_kernel_command(
    description="show a page's folio: counters, flags, order, head, pgmap",
    arguments=(argument("where", metavar="PFN|ADDRESS", type=_int,
                        help="a PFN, a struct page address or a direct-map address"),),
)
def _cmd_folio(prog: Program, name: str, args: argparse.Namespace, **kwargs: Any) -> None:
    print(folio_report(prog, args.where))


@linux_kernel_command(
    description="show the dev_pagemap covering a PFN: type, ranges, vmemmap_shift, ref",
    arguments=(argument("pfn", metavar="PFN", type=_int, help="page frame number"),),
)
def _cmd_pgmap(prog: Program, name: str, args: argparse.Namespace, **kwargs: Any) -> None:
    print(pgmap_report(prog, args.pfn))


@linux_kernel_command(
    description="walk a process's page table to an address: each level's entry and bits",
    arguments=(argument("pid", metavar="PID", type=int, help="process id"),
               argument("address", metavar="ADDRESS", type=_int, help="user virtual address")),
)
def _cmd_pte(prog: Program, name: str, args: argparse.Namespace, **kwargs: Any) -> None:
    print(pte_report(prog, args.pid, args.address))


@linux_kernel_command(
    description="list device-dax devices with their ranges and busy folios",
    arguments=(argument("--limit", type=int, default=32, help="busy folios shown per device"),),
)
def _cmd_devdax(prog: Program, name: str, args: argparse.Namespace, **kwargs: Any) -> None:
    print(devdax_report(prog, limit=args.limit))
