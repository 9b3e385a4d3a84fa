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
# # devdax-lab quickstart
#
# This notebook boots the `after` kernel (Debian 7.2, which has Linux 6.15's
# "device/dax: properly refcount device dax pages when mapping") in QEMU with
# two device-dax namespaces (a 4K-aligned `dax0.0` and a 2M-aligned `dax1.0`),
# maps 64K of the 4K device into a guest process and write-faults one page.
# After every step, drgn reads the page's `struct folio`, its `dev_pagemap`
# and the process's page-table entry while the guest is stopped.
#
# Booting takes about 4 s under TCG; each step about 50 ms.

# %%
from lab import Lab

lab = Lab.boot("after")
print(lab.kernel, lab.release)

# %% [markdown]
# Map 16 pages of the 4K device into guest process `a` (created on demand),
# then write one byte to page 0: the fault maps the page.

# %%
m = lab.mmap("4K", length="64K")
lab.touch(m, pages=[0], write=True)
print(m)

# %% [markdown]
# `lab.timeline` has one row per (step, watched page, process). Look at
# `refcount` (2: one reference at rest plus one for the mapping), `mapcount`
# (the raw `_mapcount`: -1 = unmapped, 0 = mapped once) and `pt_level` /
# `pt_devmap` (a PTE; this kernel has no devmap bit at all, hence null). The
# kernel code behind each of these is in the [glossary](../docs/glossary.md).

# %%
lab.timeline[["step", "action", "proc", "map", "page", "pfn", "refcount", "mapcount",
              "pgmap_ref", "pt_level", "pt_write", "pt_dirty", "pt_devmap"]]

# %% [markdown]
# Refcount (top) and mapcount (bottom) of every watched folio per step:

# %%
lab.plot()

# %% [markdown]
# ## The control panel
#
# Pick an action, fill in its arguments (choices come from the processes
# and mappings that exist) and click **Run**: the chart and the state table
# below it update after each step. Mistakes (a page outside the mapping, a
# process that does not exist) show as one red line; the panel stays usable.
# The VM stops when this notebook's kernel shuts down.

# %%
lab.panel()
