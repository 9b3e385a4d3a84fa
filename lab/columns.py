"""The timeline's columns, each declared once: name, dtype, where its value
comes from, what it means, and which views show it.

Everything that lists columns derives the list from here: the timeline's
dtypes and row builder (`lab.timeline`), the kernel-vs-kernel diff, the
plots' hover text and event colors (`lab.plots`), the panel's state table
(`lab.widgets`), the report's compact table (`lab.report`) and, for the
folio counters, the drgn reader and the watchpoints (`lab.inspect.folio`).
Adding a counter is one :class:`Column` with a ``member`` here (and, when the
kernel keeps it somewhere new, the reader); adding any other column is one
:class:`Column` whose ``source`` and ``attr`` name a field of the records in
`lab.model`.

Pure data: no I/O, no imports beyond the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "Column",
    "TIMELINE",
    "COUNTERS",
    "LARGE_COUNTERS",
    "dtypes",
    "names",
    "by_name",
]

# Where a value is read, relative to one timeline row (one watched page as
# one process sees it after one step; see `lab.model`):
SOURCES = (
    "run",      # the RunResult: kernel, release
    "step",     # the StepRecord: step, action, label, ...
    "page",     # the PageRecord: map, page, proc, vaddr, pinned, ...
    "folio",    # FolioState fields that are not counters (pfn, order, flags)
    "counter",  # FolioState.counters: a kernel counter the reader reads
    "pte",      # PteState of the row's process (null without one)
    "pgmap",    # PgmapState of the device
)


@dataclass(frozen=True)
class Column:
    """One timeline column.

    ``attr`` is the (dotted) attribute of the ``source`` record holding the
    value (default: ``name``). For ``source="counter"``, ``member`` is the
    ``struct page``/``struct folio`` member the reader reads and ``scope``
    says where: ``page`` (this page), ``folio`` (the head) or ``large`` (a
    large folio's first tail page: null for order 0 and on kernels without
    the member). The booleans say which views show the column.
    """

    name: str
    dtype: str
    source: str
    doc: str
    attr: str | None = None
    member: str | None = None
    scope: str | None = None
    diff: bool = False    # compared between kernels (df_diff)
    hover: bool = False   # in the plots' hover text
    panel: bool = False   # in the notebook panel's state table
    report: bool = False  # in the report's compact timeline table
    color: str | None = None  # a counter's color in the events waterfall

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"column {self.name}: unknown source {self.source!r}")
        if (self.source == "counter") != (self.member is not None):
            raise ValueError(f"column {self.name}: counters (and only they) name a member")


TIMELINE: tuple[Column, ...] = (
    Column("kernel", "string", "run", "kernel name as given (before, after, a built kernel)",
           report=True),
    Column("kernel_release", "string", "run", "uname -r of the booted kernel", attr="release"),
    Column("step", "Int64", "step", "step index; 0 is the state before the first step",
           report=True),
    Column("action", "string", "step", "the step's action", report=True),
    Column("label", "string", "step", "the step's label from the scenario"),
    Column("detail", "string", "step", "what the step did, in words"),
    Column("step_errno", "Int64", "step", "errno of a step the guest refused, else null",
           attr="errno"),
    Column("proc", "string", "page", "guest process whose page tables this row describes "
           "(null: no process maps the page)", panel=True, report=True),
    Column("map", "string", "page", "the scenario's mapping name", panel=True, report=True),
    Column("page", "Int64", "page", "4K page index within the mapping", panel=True, report=True),
    Column("vaddr", "UInt64", "page", "user virtual address in that process"),
    Column("pfn", "Int64", "folio", "page frame number", hover=True, panel=True, report=True),
    Column("folio_pfn", "Int64", "folio", "PFN of the folio's head page", hover=True,
           panel=True, report=True),
    Column("order", "Int64", "folio", "folio order (0: 4K, 9: 2M, 18: 1G)", hover=True,
           panel=True, report=True),
    Column("refcount", "Int64", "counter", "the folio's _refcount", member="_refcount",
           scope="folio", diff=True, hover=True, panel=True, report=True, color="#d62728"),
    Column("mapcount", "Int64", "counter", "the page's raw _mapcount (-1 = no PTE maps it)",
           member="_mapcount", scope="page", diff=True, hover=True, panel=True, report=True,
           color="#1f77b4"),
    Column("large_mapcount", "Int64", "counter",
           "a large folio's raw _large_mapcount (-1 = unmapped)", member="_large_mapcount",
           scope="large", diff=True, hover=True, panel=True, color="#17becf"),
    Column("entire_mapcount", "Int64", "counter",
           "a large folio's raw _entire_mapcount: PMD/PUD mappings (-1 = none)",
           member="_entire_mapcount", scope="large", diff=True, hover=True, panel=True,
           report=True, color="#9467bd"),
    Column("nr_pages_mapped", "Int64", "counter",
           "a large folio's _nr_pages_mapped (starts at 0; maintained only with "
           "CONFIG_PAGE_MAPCOUNT)", member="_nr_pages_mapped", scope="large", hover=True,
           color="#8c564b"),
    Column("pincount", "Int64", "counter", "a large folio's _pincount (starts at 0)",
           member="_pincount", scope="large", diff=True, hover=True, panel=True, report=True,
           color="#ff7f0e"),
    Column("flags", "string", "folio", "the head page's flags, |-separated",
           attr="flags_text", hover=True),
    Column("pgmap_type", "string", "pgmap", "dev_pagemap type (MEMORY_DEVICE_GENERIC, ...)",
           attr="type", panel=True),
    Column("pgmap_ref", "Int64", "pgmap", "the dev_pagemap's percpu_ref, summed",
           attr="ref.count", diff=True, hover=True, panel=True),
    Column("pt_level", "string", "pte", "level of the entry that maps the address "
           "(PTE, PMD, PUD)", attr="level", diff=True, panel=True, report=True),
    Column("pt_present", "boolean", "pte", "the entry's present bit", attr="present"),
    Column("pt_write", "boolean", "pte", "the entry's RW bit", attr="write", panel=True,
           report=True),
    Column("pt_dirty", "boolean", "pte", "the entry's dirty bit", attr="dirty", panel=True),
    Column("pt_young", "boolean", "pte", "the entry's accessed bit", attr="young"),
    Column("pt_special", "boolean", "pte", "the entry's special bit (x86 SOFTW1)",
           attr="special", diff=True, report=True),
    Column("pt_devmap", "boolean", "pte", "the entry's devmap bit (x86 SOFTW4; null on "
           "kernels without ARCH_HAS_PTE_DEVMAP)", attr="devmap", diff=True, panel=True,
           report=True),
    Column("pagemap_pfn", "Int64", "page", "PFN the guest's /proc/PID/pagemap reports"),
    Column("pinned", "boolean", "page", "inside a long-term pin the scenario holds",
           panel=True, report=True),
    Column("in_pipe", "boolean", "page", "inside a spliced range not yet drained",
           panel=True, report=True),
    Column("pins", "Int64", "page", "live long-term pins covering this page"),
    Column("folio_pins", "Int64", "page",
           "live pins of this page's folio (one per large folio a pin covers: io_uring "
           "keeps one pin per folio)"),
    Column("folio_pipe_refs", "Int64", "page",
           "pages of this page's folio held by live pipes, summed over the pipes"),
)

COUNTERS: tuple[Column, ...] = tuple(c for c in TIMELINE if c.source == "counter")
LARGE_COUNTERS: tuple[Column, ...] = tuple(c for c in COUNTERS if c.scope == "large")
by_name: dict[str, Column] = {c.name: c for c in TIMELINE}


def names(flag: str | None = None) -> tuple[str, ...]:
    """Column names in timeline order; with *flag* ("diff", "hover", "panel",
    "report"), only the columns that view shows."""
    return tuple(c.name for c in TIMELINE if flag is None or getattr(c, flag))


def dtypes() -> dict[str, str]:
    """{column: pandas dtype} of the timeline frame."""
    return {c.name: c.dtype for c in TIMELINE}
