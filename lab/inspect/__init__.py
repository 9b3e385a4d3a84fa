"""drgn's view of the live guest: attach to it, then read folio, dev_pagemap,
page-table and VMA state, page by page or a whole device at once.

Readers take a :class:`drgn.Program`, use the kernel's names and handle
differences between kernel versions by probing which fields exist.
"""

from .attach import InspectError, attach, debug_files_for
from .bulk import PageArray, read_pages
from .folio import folio_counters, folio_state
from .pgmap import find_dev_pagemap, pgmap_state, percpu_ref_state
from .pgtable import devmap_supported, pte_state, vma_state
from .rss import RssState, mm_rss

__all__ = [
    "InspectError",
    "attach",
    "debug_files_for",
    "folio_state",
    "folio_counters",
    "pgmap_state",
    "find_dev_pagemap",
    "percpu_ref_state",
    "pte_state",
    "vma_state",
    "devmap_supported",
    "read_pages",
    "PageArray",
    "mm_rss",
    "RssState",
]
