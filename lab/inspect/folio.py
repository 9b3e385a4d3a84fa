"""``struct folio`` state of one PFN, on kernels from 6.12 to 7.x, read with
`lab.drgn_helpers` (the member probes live there); the counters read are the
ones `lab.columns.COUNTERS` declares."""

from __future__ import annotations

from types import MappingProxyType

import drgn
from drgn import Object
from drgn.helpers.linux.mm import (
    compound_head,
    compound_order,
    decode_page_flags,
    page_flags,
    page_index,
    page_to_pfn,
    pfn_to_page,
)

from ..columns import COUNTERS
from ..drgn_helpers import has_member, page_folio, page_pgmap
from ..model import FolioState
from .attach import InspectError

__all__ = ["folio_state", "folio_counters", "page_pgmap", "has_member"]


def _atomic(obj: Object) -> int:
    return obj.counter.value_()


def _counter_object(page: Object, folio: Object, order: int, column) -> Object | None:
    """The ``atomic_t`` of counter *column* (`lab.columns.COUNTERS`), or None
    where this folio has no such counter.

    Large-folio counters live in the first tail page and exist only for
    large folios; which exist is probed (`lab.drgn_helpers.has_member`):
    ``_large_mapcount`` came with "mm: track mapcount of large folios in
    single value" (05c5323b2a34, 6.11). ``_nr_pages_mapped`` is still a member in 7.2 but is not
    maintained under CONFIG_NO_PAGE_MAPCOUNT ("mm: CONFIG_NO_PAGE_MAPCOUNT to
    prepare for not maintain per-page mapcounts in large folios"): the
    probe keeps a tree that drops the member readable.
    """
    if column.scope == "page":
        return getattr(page, column.member)
    if column.scope == "large" and (
            order == 0 or not has_member(folio.prog_, "struct folio", column.member)):
        return None
    return getattr(folio, column.member)


def folio_state(prog: drgn.Program, pfn: int, *, zone_device_only: bool = True) -> FolioState:
    """The state of the page at *pfn* and of its folio.

    :param pfn: page frame number
    :raises InspectError: if *pfn* has no struct page, or (with
        *zone_device_only*) no ``dev_pagemap`` covers it.
    """
    from .pgmap import find_dev_pagemap

    pgmap_obj = find_dev_pagemap(prog, pfn)
    if not pgmap_obj and zone_device_only:
        raise InspectError(f"PFN {pfn:#x} is not on any device (no dev_pagemap covers it)")
    page = pfn_to_page(prog, pfn)
    try:
        page_flags(page).value_()
    except drgn.FaultError as exc:
        raise InspectError(f"PFN {pfn:#x} has no struct page (outside every memory section)") from exc
    pgmap = pgmap_obj.value_() if pgmap_obj else None
    head = compound_head(page)
    folio = page_folio(page)
    order = compound_order(head).value_()
    counters = {}
    for column in COUNTERS:
        obj = _counter_object(page, folio, order, column)
        counters[column.name] = None if obj is None else _atomic(obj)
    try:
        index = page_index(page).value_()
    except (LookupError, AttributeError):
        index = None
    return FolioState(
        pfn=pfn,
        folio_pfn=page_to_pfn(head).value_(),
        order=order,
        flags=tuple(decode_page_flags(head).split("|")) if page_flags(head).value_() else (),
        counters=MappingProxyType(counters),
        mapping=folio.mapping.value_(),
        index=index,
        pgmap=pgmap,
    )


def folio_counters(prog: drgn.Program, pfn: int) -> tuple[int, int, list[tuple[str, int, int]]]:
    """(folio's head PFN, order, [(counter, address, size)]) of the folio
    holding *pfn*: the kernel virtual address and width of each counter, from
    the type info of the running kernel, for watchpoints.

    :raises InspectError: if no dev_pagemap covers *pfn*.
    """
    from .pgmap import find_dev_pagemap

    if not find_dev_pagemap(prog, pfn):
        raise InspectError(f"PFN {pfn:#x} is not on any device-dax namespace (no dev_pagemap covers it)")
    head = compound_head(pfn_to_page(prog, pfn))
    folio = page_folio(head)
    order = compound_order(head).value_()
    out = []
    # the head page's own counters: a watch follows the folio, not one page
    for column in COUNTERS:
        obj = _counter_object(head, folio, order, column)
        if obj is not None:
            out.append((column.name, obj.counter.address_, obj.counter.type_.size))
    return page_to_pfn(head).value_(), order, out
