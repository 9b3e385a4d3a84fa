"""What a device folio says about the file it belongs to: ``folio->mapping``
and ``folio->index``, which device-dax's ``dax_set_mapping()`` sets at the
first fault and nothing clears for MEMORY_DEVICE_GENERIC
(docs/glossary.md, "folio->mapping and ->index")."""

from __future__ import annotations

from dataclasses import dataclass

import drgn
from drgn.helpers.linux.mm import pfn_to_page

from ..drgn_helpers import page_folio

__all__ = ["FolioMapping", "folio_mapping"]

PAGE_MAPPING_ANON = 0x1  # include/linux/page-flags.h: low bit of ->mapping


@dataclass(frozen=True)
class FolioMapping:
    """``folio->mapping`` (the address, 0 for none; *anon* when its low bit
    says anon_vma) and ``folio->index`` (the page offset in the mapping)."""

    mapping: int
    anon: bool
    index: int


def folio_mapping(prog: drgn.Program, pfn: int) -> FolioMapping:
    """The mapping and index of the folio holding *pfn*. ``struct folio``
    has ``mapping`` and ``index`` on 6.12 and 7.x alike (on 7.x the page's
    own field became ``__folio_index``, the folio's kept its name).

    :param pfn: a page frame number whose ``struct page`` exists.
    """
    folio = page_folio(pfn_to_page(prog, pfn))
    raw = folio.mapping.value_()
    return FolioMapping(mapping=raw & ~PAGE_MAPPING_ANON, anon=bool(raw & PAGE_MAPPING_ANON),
                        index=folio.index.value_())
