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
# folio:
#
# - `refcount` +1,
# - `entire_mapcount` (raw, -1 = none) from -1 to 0,
# - `large_mapcount` (all mappings of the folio, raw) from -1 to 0,
# - each page's own `_mapcount` stays -1: no page is mapped by a PTE,
# - `nr_pages_mapped` shows the ENTIRELY_MAPPED bit (0x800000 = 8388608).
#
# On `before` (Debian 6.12) none of these move: see `01-before-vs-after`.

# %%
from pathlib import Path

from lab import Lab
from lab.experiment import run_experiment
from lab.model import UserError
from lab.plots import plot_counts, plot_page_table

ROOT = Path.cwd() if (Path.cwd() / "scenarios").exists() else Path.cwd().parent
COLUMNS = ["step", "label", "proc", "page", "pfn", "folio_pfn", "order", "refcount", "mapcount",
           "large_mapcount", "entire_mapcount", "nr_pages_mapped", "pt_level"]

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
# ## Taking part of a huge mapping away
#
# A 2M device-dax mapping cannot be split at a 4K boundary: munmap of one
# page fails with EINVAL (`dev_dax_may_split`). The lab records the failed
# step and raises a `UserError`:

# %%
try:
    lab.munmap(m, offset="4K", length="4K")
except UserError as e:
    print(e)

# %% [markdown]
# What can take 4K out of a PMD is `MADV_DONTNEED`: zapping part of a huge
# PMD splits it, and for a device mapping the split clears the *whole* PMD
# (no PTEs are installed). The first folio loses its reference and its
# entire mapping; the second keeps its own. Then unmap the second 2M half:
# a partial munmap at a 2M boundary works and drops the second folio's
# reference and mapping.

# %%
lab.madvise(m, "DONTNEED", offset="1M", length="4K", label="zap 4K in folio 1")
lab.munmap(m, offset="2M", length="2M", label="munmap 2nd half")
lab.timeline[lab.timeline["step"] >= 4][COLUMNS]

# %%
lab.plot()

# %%
lab.close()

# %% [markdown]
# ## 1G: one PUD, an order-18 folio (`scenarios/fault-1g.toml`)
#
# The 1G-aligned device is booted on request (it needs a CPU with 1 GiB
# pages). The scenario write-faults page 1000, a tail far from the head:
# the PUD maps the whole 1G folio, and head (page 0) and tail (page 1000)
# both show the folio's counters.

# %%
pud = run_experiment(ROOT / "scenarios/fault-1g.toml", ["after"])
pud.frames["timeline"][COLUMNS]

# %%
plot_counts(pud.frames["timeline"], pud.frames["complaints"])

# %%
plot_page_table(pud.frames["timeline"])
