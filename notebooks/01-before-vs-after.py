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
# # Before vs after: what a device-dax fault does to the folio
#
# Linux 6.15's "device/dax: properly refcount device dax pages when mapping"
# changed what a page fault on a device-dax mapping does:
#
# | | `before` (Debian 6.12) | `after` (Debian 7.2) |
# |---|---|---|
# | PTE (4K) | devmap (bit 57) **and special**: x86's `pte_mkdevmap()` sets both | normal PTE |
# | PMD / PUD | devmap bit only (no special bit at these levels) | normal PMD / PUD |
# | folio refcount | unchanged | +1 per mapping |
# | mapcount | unchanged (-1, "unmapped") | counts the mapping (`_mapcount`, or `_entire_mapcount` / `_large_mapcount` for a PMD/PUD) |
# | process RssFile | unchanged | + the mapped size |
#
# The special bit is what makes `vm_normal_page()` return NULL, so on
# `before` zap, fork and GUP treat the page as having no struct page to
# count; the devmap bit routed GUP to the pgmap and zap/split to the huge
# paths. `after` is Debian 7.2, not 6.15: it also has the two follow-ups
# "mm/huge_memory: don't mark refcounted folios special in
# vmf_insert_folio_pmd()" and "mm: remove devmap related functions and page
# table bits", so no entry of it is special or devmap (`pt_devmap` is null:
# the bit does not exist). Every claim here, with its code:
# [glossary](../docs/glossary.md) (`refcount-series`, `vm-normal-page`,
# `devmap`).
#
# Each section runs one shipped scenario on both kernels with
# `run_experiment` (one boot per kernel, about 4 s each under TCG) and shows
# the lab's own account of the differences, then the counters per step and
# the page-table entries per step.

# %%
import pandas as pd

from lab.experiment import run_experiment
from lab.paths import scenario_path
from lab.plots import plot_counts, plot_page_table

KERNELS = ["before", "after"]

# %% [markdown]
# ## PTE: 4K faults (`scenarios/fault-4k.toml`)
#
# Four write faults and one read fault on order-0 folios. On `before` the
# counters stay flat while the PTEs appear (purple: devmap and special entries); on
# `after` each touched folio goes to refcount 2 and `_mapcount` 0 (teal:
# normal entries), and munmap takes both back.

# %%
pte = run_experiment(scenario_path("fault-4k"), KERNELS)
for line in pte.differences:
    print("-", line)

# %%
plot_counts(pte.frames["timeline"], pte.frames["complaints"])

# %%
plot_page_table(pte.frames["timeline"])

# %% [markdown]
# The same in numbers: every field where the kernels differ, per step and
# page (`lab.timeline.df_diff`).

# %%
pte.frames["diff"].head(12)

# %% [markdown]
# ## PMD: 2M faults (`scenarios/fault-2m.toml`)
#
# The 2M-aligned device is laid out as order-9 folios; a fault maps a whole
# folio with one PMD. On `after`, `vmf_insert_folio_pmd()` takes one
# reference and one *entire* mapping: `_entire_mapcount` and
# `_large_mapcount` go from -1 to 0 while each page's own `_mapcount` stays
# -1 (the dash-dot line in the bottom row is `large_mapcount`).

# %%
pmd = run_experiment(scenario_path("fault-2m"), KERNELS)
for line in pmd.differences:
    print("-", line)

# %%
plot_counts(pmd.frames["timeline"], pmd.frames["complaints"])

# %%
plot_page_table(pmd.frames["timeline"])

# %% [markdown]
# ## PUD: 1G faults (`scenarios/fault-1g.toml`)
#
# The 1G-aligned device (booted on request) holds order-18 folios mapped by
# one PUD. The touched page (1000) is a tail page: the counters live in the
# folio, so head and tail show the same refcount.

# %%
pud = run_experiment(scenario_path("fault-1g"), KERNELS)
for line in pud.differences:
    print("-", line)

# %%
plot_counts(pud.frames["timeline"], pud.frames["complaints"])

# %%
plot_page_table(pud.frames["timeline"])

# %% [markdown]
# ## Invariants, and what they cannot see
#
# The lab checks named invariants on every run (`lab.timeline.INVARIANTS`).
# The table lists every violation of the three runs (empty when all hold):

# %%
pd.concat([exp.violations_frame.assign(scenario=name)
           for name, exp in (("fault-4k", pte), ("fault-2m", pmd), ("fault-1g", pud))],
          ignore_index=True)

# %% [markdown]
# The invariants are exact (docs/scenarios.md, "Expectations and
# verdicts"): `refs` explains every reference (1 at rest, one per entry on a
# kernel whose faults map folios, pins, pipe buffers) and `rmap` every
# mapcount, while `flat` says what holds on `before` (special/devmap
# entries, no counter moves). A weaker check such as "refcount ≥ entries"
# would pass on `before` with no reference held: a `MEMORY_DEVICE_GENERIC`
# folio rests at refcount 1 (`__init_zone_device_page()`). And should an
# extra put drop such a folio to 0, `free_zone_device_folio()` sets it back
# to 1 (`folio_set_count()`): between two snapshots the mistake looks like a
# page at rest ([glossary](../docs/glossary.md#refcount-at-rest)). Exact
# accounting of every counter change (`06-who-took-the-reference`) catches
# even that.
