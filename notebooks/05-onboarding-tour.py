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
# A guided walk on the `after` kernel (Debian 7.2), one step at a time.
# Before each step, **write your prediction** into the `predict_*` variables
# (they hold the right answers, so the notebook also runs unattended: change
# them to your own guess first). The check cell after the step compares your
# prediction with what drgn read from the live kernel.
#
# Background, in three sentences:
#
# 1. Device-dax memory (here an emulated NVDIMM) gets `struct page`s like RAM,
#    in `ZONE_DEVICE`: `memremap_pages()` creates them and ties them to one
#    `struct dev_pagemap` (*pgmap*) of type `MEMORY_DEVICE_GENERIC`.
# 2. The pgmap has a `percpu_ref`; the kernel takes one reference on it per
#    device folio (and holds one more of its own) for as long as the pages
#    exist.
# 3. A device folio that nobody uses rests at refcount 1 with raw
#    `_mapcount` -1 ("not mapped"); what a mapping does to these two numbers
#    is what Linux 6.15 changed.

# %%
import pandas as pd

from lab import Lab


def check(**predictions):
    """Print, for each name=(predicted, actual), whether the prediction held."""
    for name, (predicted, actual) in predictions.items():
        if actual is None or pd.isna(actual):
            actual = None
        elif hasattr(actual, "item"):  # a numpy scalar: the plain Python value
            actual = actual.item()
        if predicted == actual:
            print(f"prediction held: {name} = {actual!r}")
        else:
            print(f"prediction missed: {name} is {actual!r}, you predicted {predicted!r}")


def page_row(lab, page=0, proc="a"):
    """The latest snapshot of *page* as *proc* sees it (lab.current())."""
    now = lab.current()
    rows = now[(now["page"] == page) & (now["proc"].fillna("") == proc)]
    return rows.iloc[0] if len(rows) else now[now["page"] == page].iloc[0]


# %%
lab = Lab.boot("after")
print(lab.kernel, lab.release)

# %% [markdown]
# ## Step 1: map the device
#
# Map 64K (16 pages) of the 4K-aligned device `dax0.0` into guest process
# `a`. The device has 1070 MiB: 273,920 pages, each its own order-0 folio.
#
# Predict the pgmap's reference count (one per device folio plus the
# pgmap's own) and whether mmap alone changes it.

# %%
predict_pgmap_ref = 273_920 + 1

# %%
m = lab.mmap("4K", length="64K")
check(pgmap_ref=(predict_pgmap_ref, lab.steps.iloc[-1]["pgmap_ref"]))

# %% [markdown]
# ## Step 2: the first fault
#
# Write one byte to page 0. On this kernel the fault maps the folio for
# real (`vmf_insert_page_mkwrite()`): predict its refcount, its raw
# `_mapcount` (-1 = unmapped, 0 = mapped once), the page-table level of the
# entry and its devmap bit (`None`: this kernel has no devmap bit at all).

# %%
predict_refcount = 2
predict_mapcount = 0
predict_pt_level = "PTE"
predict_pt_devmap = None

# %%
lab.touch(m, [0], write=True)
row = page_row(lab, 0)
check(refcount=(predict_refcount, row["refcount"]), mapcount=(predict_mapcount, row["mapcount"]),
      pt_level=(predict_pt_level, row["pt_level"]), pt_devmap=(predict_pt_devmap, row["pt_devmap"]))

# %% [markdown]
# ## Step 3: fork
#
# `a` forks `b`. A shared device mapping is not copied into the child's page
# tables at fork (there is nothing anonymous to copy): does the fork change
# page 0's refcount? Then `b` touches page 0 itself: predict refcount and
# raw mapcount once two processes map it.

# %%
predict_refcount_after_fork = 2
predict_refcount_two_mappings = 3
predict_mapcount_two_mappings = 1

# %%
lab.fork("a", "b")
after_fork = page_row(lab, 0)["refcount"]
lab.touch(m, [0], proc="b")
row = page_row(lab, 0, "b")
check(refcount_after_fork=(predict_refcount_after_fork, after_fork),
      refcount_two_mappings=(predict_refcount_two_mappings, row["refcount"]),
      mapcount_two_mappings=(predict_mapcount_two_mappings, row["mapcount"]))

# %% [markdown]
# ## Step 4: a long-term pin
#
# Register page 0 as an io_uring fixed buffer: `pin_user_pages(FOLL_LONGTERM)`.
# An order-0 folio has no `_pincount`; a pin adds `GUP_PIN_COUNTING_BIAS`
# (1024) to the refcount instead. Predict the refcount while pinned, and
# whether the pgmap's reference count moves.

# %%
predict_refcount_pinned = 3 + 1024
predict_pgmap_ref_pinned = 273_921

# %%
pin = lab.pin(m, length="4K")
row = page_row(lab, 0)
check(refcount_pinned=(predict_refcount_pinned, row["refcount"]),
      pgmap_ref_pinned=(predict_pgmap_ref_pinned, row["pgmap_ref"]))

# %% [markdown]
# ## Step 5: tear it all down
#
# Unpin, let `b` exit, then unmap in `a`. Predict page 0's refcount after
# each, and its raw mapcount at the end.

# %%
predict_refcount_unpinned = 3
predict_refcount_b_exited = 2
predict_refcount_unmapped = 1
predict_mapcount_unmapped = -1

# %%
lab.unpin(pin)
unpinned = page_row(lab, 0)["refcount"]
lab.exit("b")
b_exited = page_row(lab, 0)["refcount"]
lab.munmap(m)
row = page_row(lab, 0)
check(refcount_unpinned=(predict_refcount_unpinned, unpinned),
      refcount_b_exited=(predict_refcount_b_exited, b_exited),
      refcount_unmapped=(predict_refcount_unmapped, row["refcount"]),
      mapcount_unmapped=(predict_mapcount_unmapped, row["mapcount"]))

# %% [markdown]
# The whole walk, per step (refcount on top, raw mapcount below):

# %%
lab.plot()

# %%
lab.close()

# %% [markdown]
# ## A glance at `before` (Debian 6.12)
#
# The same first fault on the kernel without the change. There the fault
# inserts a *devmap* PTE (bit 57) and takes neither a reference nor a
# mapcount. Predict refcount, raw mapcount and the devmap bit.

# %%
predict_before_refcount = 1
predict_before_mapcount = -1
predict_before_pt_devmap = True

# %%
with Lab.boot("before") as old:
    mb = old.mmap("4K", length="64K")
    old.touch(mb, [0], write=True)
    row = page_row(old, 0)
    check(refcount=(predict_before_refcount, row["refcount"]),
          mapcount=(predict_before_mapcount, row["mapcount"]),
          pt_devmap=(predict_before_pt_devmap, row["pt_devmap"]))

# %% [markdown]
# Where next: `01-before-vs-after` for PMD and PUD mappings,
# `03-gup-pinning` for pins, and `00-quickstart`'s panel to try your own
# steps.
