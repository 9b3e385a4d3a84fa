# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Huge pages: 2M and 1G device folios
#
# A device-dax namespace with 2M (or 1G) alignment is laid out as large
# folios: order 9 (512 pages) or order 18 (262,144 pages). The first page is
# the *head*, the others are *tails*; the folio's counters live in the head
# and its first tails, so every page of a folio reports the same `refcount`,
# `large_mapcount` and `entire_mapcount`. A fault maps the whole folio with
# one PMD (2M) or PUD (1G) entry.
#
# On `after` (Debian 7.2) that mapping counts as one *entire* mapping of the
# folio (`insert_pmd()` / `insert_pud()` in mm/huge_memory.c):
#
# - `refcount` +1,
# - `entire_mapcount` (raw, -1 = none) from -1 to 0: it counts PMD and PUD
#   mappings only,
# - `large_mapcount` (raw) from -1 to 0: it counts every mapping of the folio,
#   PTE, PMD or PUD (`folio_mapcount()` = `_large_mapcount + 1`),
# - each page's own `_mapcount` stays -1: it counts PTE mappings of that page
#   only,
# - `nr_pages_mapped` (a plain count from 0, not raw) gains the
#   ENTIRELY_MAPPED bit (0x800000 = 8388608) — only on kernels built with
#   `CONFIG_PAGE_MAPCOUNT`, as Debian's are; with `CONFIG_NO_PAGE_MAPCOUNT`
#   the field is not maintained.
#
# The [glossary](../docs/glossary.md#mapcount) has the code behind each.
# On `before` (Debian 6.12) none of these move: see `01-before-vs-after`.

# %%
from lab import Lab
from lab.model import UserError

COLUMNS = ["step", "label", "proc", "page", "pfn", "folio_pfn", "order", "refcount", "mapcount",
           "large_mapcount", "entire_mapcount", "nr_pages_mapped", "pt_level", "step_errno"]

# %% [markdown]
# ## 2M: head and tail
#
# Map 4M of the 2M device (two order-9 folios) and touch page 1, a tail of
# the first folio: the fault maps the whole folio. Then touch page 0 (its
# head: already mapped by the same PMD, nothing changes) and page 512 (the
# head of the second folio).

# %%
lab = Lab.boot("after")
m = lab.mmap("2M", length="4M")
lab.touch(m, [1], write=True, label="touch page 1 (a tail)")
lab.touch(m, [0, 512], write=True, label="touch 0 (head) and 512")
lab.timeline[COLUMNS]

# %% [markdown]
# `folio_pfn` is the head's PFN: pages 0 and 1 share one folio, page 512
# starts the next. Every page of the first folio shows refcount 2 and
# `entire_mapcount` 0 as soon as any of its pages faulted.
#
# ## A second process: fork copies no PMD
#
# `a` forks `b`. fork copies a VMA's entries only when `vma_needs_copy()`
# says so (an `anon_vma`, or VM_PFNMAP/VM_MIXEDMAP/uffd-wp); a MAP_SHARED
# device-dax VMA has none, so `b` starts with no PMD, like any shared file
# mapping. Even where PMDs are copied, `copy_huge_pmd()` skips a
# non-anonymous destination ("can be re-filled on fault";
# [glossary](../docs/glossary.md#copy-huge-pmd)). `b` then faults page 0
# itself: a second entire mapping of the same folio.

# %%
lab.fork("a", "b", label="a forks b")
lab.current()[COLUMNS]

# %% [markdown]
# `b` has the VMA (a row of its own) but no entry for the folio (`pt_level`
# null). Now `b` faults page 0:

# %%
lab.touch(m, [0], proc="b", label="b: touch page 0")
lab.current()[COLUMNS]

# %% [markdown]
# Two PMDs map the first folio now: refcount 3 (1 at rest + one per
# mapping), `entire_mapcount` and `large_mapcount` 1 (raw: two mappings),
# each page's `_mapcount` still -1. `b` exits and takes its mapping with it:

# %%
lab.exit("b", label="b exits")
lab.current()[COLUMNS]

# %% [markdown]
# ## Taking part of a huge mapping away
#
# A 2M device-dax mapping cannot be split at a 4K boundary: the kernel
# refuses munmap of one page with EINVAL (`dev_dax_may_split()`). The lab
# knows the rule and refuses the step before the guest sees it, with a
# `UserError`:

# %%
try:
    lab.munmap(m, offset="4K", length="4K")
except UserError as e:
    print(e)

# %% [markdown]
# Nothing takes just 4K out of a PMD mapping. `MADV_DONTNEED` of 4K inside
# it zaps the *whole* 2M: `zap_pmd_range()` splits the PMD, and for a
# device mapping the split clears the PMD and installs no PTEs; on `after`
# it also drops the folio's entire mapping and its reference
# ([glossary](../docs/glossary.md#zap)). The second folio keeps its own.
# Then unmap the second 2M half: a partial munmap at a 2M boundary works and
# drops the second folio's reference and mapping.

# %%
lab.madvise(m, "DONTNEED", offset="1M", length="4K", label="DONTNEED 4K in folio 1")
lab.munmap(m, offset="2M", length="2M", label="munmap 2nd half")
lab.timeline[lab.timeline["label"].isin(["DONTNEED 4K in folio 1", "munmap 2nd half"])][COLUMNS]

# %% [markdown]
# ## VM_NOHUGEPAGE: the PTE fallback has nothing to map
#
# Device-dax sets VM_HUGEPAGE on every VMA (`dax_mmap`), and for DAX the
# fault path ignores the sysfs THP policy — but VM_NOHUGEPAGE,
# `PR_SET_THP_DISABLE` and hardware-disabled THP are honoured before that
# (`__thp_vma_allowable_orders()`). With `MADV_NOHUGEPAGE` no PMD fault is
# tried; the fault falls back to `__dev_dax_pte_fault()`, which refuses a
# 4K fault on a 2M device: SIGBUS
# ([glossary](../docs/glossary.md#vm-hugepage)). Live, on a new 2M mapping:

# %%
n = lab.mmap("2M", length="2M", offset="2M", label="mmap the 2nd folio again")
print("flags before:", lab.vma(n).flag_names)
lab.madvise(n, "NOHUGEPAGE", label="MADV_NOHUGEPAGE")
print("flags after: ", lab.vma(n).flag_names)
try:
    lab.touch(n, [0], label="touch under VM_NOHUGEPAGE")
except UserError as e:
    print(e)
lab.current()[COLUMNS]

# %% [markdown]
# The touch died of SIGBUS (the agent reports it as errno 14, EFAULT) and
# no entry maps the page. `MADV_HUGEPAGE` gives the mapping its PMD back:

# %%
lab.madvise(n, "HUGEPAGE", label="MADV_HUGEPAGE")
lab.touch(n, [0], label="touch again")
lab.current()[COLUMNS]

# %%
lab.plot()

# %%
lab.close()

# %% [markdown]
# ## 1G: one PUD, an order-18 folio
#
# The 1G-aligned device is booted on request (`pud=True`: it needs a CPU
# with 1 GiB pages). Write-fault page 1000, a tail far from the head: the
# PUD maps the whole 1G folio, so the touched page shows the folio's
# counters, and process `a`'s RssFile grows by the whole 1 GiB
# (`add_mm_counter(..., HPAGE_PUD_NR)`; [glossary](../docs/glossary.md#rss-file)).

# %%
big = Lab.boot("after", pud=True)
g = big.mmap("1G", length="1G")
big.touch(g, [1000], label="fault page 1000")
print("RssFile after the fault:", big.rss("a")["RssFile"], "KiB")
big.current()[COLUMNS]

# %% [markdown]
# ## Looking changes it: /proc/PID/pagemap zaps the PUD
#
# A tool that reads `/proc/PID/pagemap` over this range unmaps it:
# pagemap's page walk has no PUD callback, so `walk_pud_range()` splits the
# PUD before descending, and splitting a DAX PUD clears it (on `after` it
# also drops the mapping's reference and mapcount;
# [glossary](../docs/glossary.md#pagemap-pud)). The lab's own snapshots
# never read pagemap on the 1G device for that reason. Here the guest reads
# it once, the way a tool would:

# %%
entries = big.read_pagemap(g, [1000])
print("pagemap says present:", entries[0]["present"])
print("RssFile after reading pagemap:", big.rss("a")["RssFile"], "KiB")
big.current()[COLUMNS]

# %% [markdown]
# The PUD is gone (no entry, `pt_level` null), the folio is back at
# refcount 1 and `entire_mapcount` -1, RssFile is back to 0, and pagemap
# itself reported the page as not present: the observer removed what it
# came to observe. A later touch would fault it back in.

# %%
big.plot()

# %%
big.close()
