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
# # Onboarding tour: ZONE_DEVICE, dev_pagemap and folio refcounts
#
# A guided walk on the `after` kernel (Debian 7.2), one step at a time. After
# each step a question appears: **type your prediction and click Check**. The
# check reads the value drgn took from the live kernel, says whether your
# prediction held and why, in two lines, with a link to the kernel code in
# the [glossary](../docs/glossary.md). The answers are in the library
# (`lab.tour`), not in this notebook.
#
# Background, in three sentences:
#
# 1. Device-dax memory (here an emulated NVDIMM) gets `struct page`s like RAM,
#    in `ZONE_DEVICE`: `memremap_pages()` creates them and ties them to one
#    `struct dev_pagemap` (*pgmap*) of type `MEMORY_DEVICE_GENERIC`.
# 2. The pgmap has a `percpu_ref`. When the pages are created,
#    `pagemap_range()` takes references on it in bulk, one per device folio
#    whose memmap is not on the device; `memunmap_pages()` drops them in bulk.
#    Nothing tracks a single folio's use through it
#    ([glossary](../docs/glossary.md#pgmap-references)).
# 3. A device folio that nobody uses rests at refcount 1 with raw
#    `_mapcount` -1 ("not mapped"); what a mapping does to these two numbers
#    is what Linux 6.15 changed ([glossary](../docs/glossary.md#refcount-series)).

# %% tags=["parameters"]
# Predictions given up front ({question: value}) are checked without a
# reader, e.g. `papermill ... -p predictions '{"refcount": 2}'`; leave it
# empty to answer in the widgets.
predictions = {}

# %%
from lab import Lab
from lab.tour import Tour

tour = Tour(predictions)
lab = Lab.boot("after")
print(lab.kernel, lab.release)

# %% [markdown]
# ## Step 1: map the device
#
# Map 64K (16 pages) of the 4K-aligned device `dax0.0` into guest process
# `a`. Every page of this device is its own order-0 folio. Predict the pgmap's
# reference count once mmap has returned.

# %%
m = lab.mmap("4K", length="64K")
tour.ask(lab, "pgmap_ref")

# %% [markdown]
# ## Step 2: the first fault
#
# Write one byte to page 0. Predict the folio's refcount and raw `_mapcount`
# (-1 = unmapped, 0 = mapped once), the level of the page-table entry, its
# devmap bit (`None` if this kernel has no such bit), and how much the fault
# adds to the process's RssFile (what `/proc/PID/status` shows; the lab reads
# it from the process's `mm_struct`).

# %%
tour.mark(lab)  # RssFile before the fault
lab.touch(m, [0], write=True)
tour.ask(lab, "refcount", "mapcount", "pt_level", "pt_devmap", "rss_file_change")

# %% [markdown]
# ## Step 3: fork
#
# `a` forks `b`. Does fork copy `a`'s entry for page 0 into `b`'s page
# tables, and so change the refcount? Then `b` touches page 0 itself:
# predict refcount and raw mapcount once two processes map it.

# %%
lab.fork("a", "b")
tour.ask(lab, "refcount_after_fork")

# %%
lab.touch(m, [0], proc="b", write=True)
tour.ask(lab, "refcount_two_mappings", "mapcount_two_mappings")

# %% [markdown]
# ## Step 4: a long-term pin
#
# Register page 0 as an io_uring fixed buffer: `pin_user_pages(FOLL_LONGTERM)`.
# Predict the refcount while pinned, and the pgmap's reference count.

# %%
pin = lab.pin(m, length="4K")
tour.ask(lab, "refcount_pinned", "pgmap_ref_pinned")

# %% [markdown]
# ## Step 5: tear it all down
#
# Unpin, let `b` exit, then unmap in `a`: predict page 0's refcount after
# each, its raw mapcount at the end, and whether the folio still names the
# file it was mapped from (`folio->mapping`, read with drgn).

# %%
lab.unpin(pin)
tour.ask(lab, "refcount_unpinned")

# %%
lab.exit("b")
tour.ask(lab, "refcount_b_exited")

# %%
lab.munmap(m)
tour.ask(lab, "refcount_unmapped", "mapcount_unmapped", "mapping_kept")

# %% [markdown]
# The whole walk, per step (refcount on top, raw mapcount below):

# %%
lab.plot()

# %%
lab.close()

# %% [markdown]
# ## A glance at `before` (Debian 6.12)
#
# The same first fault on the kernel without the change: predict refcount,
# raw mapcount, the PTE's devmap and special bits, and the RssFile change.

# %%
old = Lab.boot("before")
mb = old.mmap("4K", length="64K")
tour.mark(old)
old.touch(mb, [0], write=True)
tour.ask(old, "before_refcount", "before_mapcount", "before_pt_devmap", "before_pt_special",
         "before_rss_file_change")

# %%
old.close()

# %% [markdown]
# Your predictions so far:

# %%
tour.results()

# %% [markdown]
# Where next: `01-before-vs-after` for PMD and PUD mappings,
# `02-huge-pages` for large folios, `03-gup-pinning` for pins, the
# [glossary](../docs/glossary.md) for the code behind every answer, and
# `00-quickstart`'s panel to try your own steps.
