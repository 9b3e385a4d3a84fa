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
# | page-table entry | devmap PTE/PMD/PUD (bit 57 set) | normal entry, no devmap bit (the bit is gone) |
# | folio refcount | unchanged | +1 per mapping |
# | mapcount | unchanged (-1, "unmapped") | counts the mapping (`_mapcount`, or `_entire_mapcount` / `_large_mapcount` for a PMD/PUD) |
#
# Each section runs one shipped scenario on both kernels with
# `run_experiment` (one boot per kernel, about 4 s each under TCG) and shows
# the lab's own account of the differences, then the counters per step and
# the page-table entries per step.

# %%
from pathlib import Path

from lab.experiment import run_experiment
from lab.plots import plot_counts, plot_page_table

ROOT = Path.cwd() if (Path.cwd() / "scenarios").exists() else Path.cwd().parent
KERNELS = ["before", "after"]

# %% [markdown]
# ## PTE: 4K faults (`scenarios/fault-4k.toml`)
#
# Four write faults and one read fault on order-0 folios. On `before` the
# counters stay flat while the PTEs appear (purple: devmap entries); on
# `after` each touched folio goes to refcount 2 and `_mapcount` 0 (teal:
# normal entries), and munmap takes both back.

# %%
pte = run_experiment(ROOT / "scenarios/fault-4k.toml", KERNELS)
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
pmd = run_experiment(ROOT / "scenarios/fault-2m.toml", KERNELS)
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
pud = run_experiment(ROOT / "scenarios/fault-1g.toml", KERNELS)
for line in pud.differences:
    print("-", line)

# %%
plot_counts(pud.frames["timeline"], pud.frames["complaints"])

# %%
plot_page_table(pud.frames["timeline"])

# %% [markdown]
# ## Invariants
#
# The lab checks named invariants on every run (`lab.timeline.INVARIANTS`);
# none of these three scenarios breaks one on either kernel.

# %%
{name: len(exp.violations) for name, exp in (("fault-4k", pte), ("fault-2m", pmd),
                                              ("fault-1g", pud))}
