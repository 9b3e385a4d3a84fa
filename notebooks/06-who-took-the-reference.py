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
# # Who took the reference?
#
# Snapshots show where a folio's counters ended after each step. To chase a
# leak you want to know **who** changed them. Distribution kernels have no
# `CONFIG_DEBUG_PAGE_REF` (no page_ref tracepoints), but QEMU's gdbstub can
# put a write watchpoint on any guest address: under TCG it fires on every
# write, with no limit of four. The lab arms one on each counter of a
# watched folio (`_refcount`, `_mapcount`; for a large folio also
# `_large_mapcount`, `_entire_mapcount`, `_pincount`, and `_nr_pages_mapped`
# where the kernel maintains it: only with `CONFIG_PAGE_MAPCOUNT`,
# [glossary](../docs/glossary.md#mapcount)),
# with addresses and widths read from the running kernel's types, and at
# every hit records the change, the task, the writing function (pc - 1,
# inlining resolved) and, if asked, the kernel stack unwound by drgn.
#
# Below: the same fault, fork, pin, munmap and unpin of one 4K page on
# `before` (Debian 6.12) and `after` (Debian 7.2), as event lists. Then a
# PMD mapping of a 2M folio.
#
# What to expect: on `after`, mapping takes a reference
# (`insert_page_into_pte_locked` / `insert_pmd`) and a mapcount
# (`__folio_add_rmap`), unmapping gives them back (`__folio_remove_rmap`,
# `folios_put_refs`). On `before` the mappings leave no trace: only the GUP
# pin moves the refcount (`try_grab_folio`, `gup_put_folio`).

# %%
import pandas as pd

from lab import Lab

COLUMNS = ["kernel", "step", "label", "field", "old", "new", "delta", "writer", "comm"]

events, accounting = {}, {}
for kernel in ("before", "after"):
    # one 4K page through a fault, a fork, a pin, munmap and unpin, watched
    # with stacks from before the first fault
    with Lab.boot(kernel, events=True) as lab:
        m = lab.mmap("4K", length="32K", label="mmap 8 pages")
        lab.watch(m, 0, stacks=True)
        lab.touch(m, 0, write=True, label="a: write-fault page 0")
        lab.fork("a", "b", label="a forks b")
        lab.touch(m, 0, proc="b", write=True, label="b: write-fault page 0")
        pin = lab.pin(m, length="4K", label="a: pin page 0 (io_uring)")
        lab.exit("b", label="b exits")
        lab.munmap(m, label="a: munmap (pin held)")
        lab.unpin(pin, label="unpin")
        events[kernel], accounting[kernel] = lab.events, lab.accounting
events = pd.concat(events.values(), ignore_index=True)
accounting = pd.concat(accounting.values(), ignore_index=True)

# %% [markdown]
# ## `after`: every mapping is accounted

# %%
events[events["kernel"] == "after"][COLUMNS]

# %% [markdown]
# ## `before`: the mappings are invisible, the pin is not

# %%
events[events["kernel"] == "before"][COLUMNS]

# %% [markdown]
# The distinct call paths, counted (the stack from the writer outwards):

# %%
from lab.timeline import df_call_paths  # noqa: E402

pd.set_option("display.max_colwidth", 200)
df_call_paths(events)

# %% [markdown]
# Hover the bars for the task and the whole stack:

# %%
from lab.plots import plot_events  # noqa: E402

plot_events(events)

# %% [markdown]
# ## Nothing was missed
#
# For every watched counter after every step, the value at the previous
# snapshot plus the recorded changes equals the value read now. A change
# no watchpoint reported would show as `lost` here and as a `lost` event.

# %%
assert accounting["lost"].eq(0).all(), accounting[accounting["lost"] != 0]
accounting.groupby("kernel")[["recorded", "lost"]].agg(lambda s: s.abs().sum())

# %% [markdown]
# The expectations above, checked:

# %%
after = events[events["kernel"] == "after"]
before = events[events["kernel"] == "before"]
assert {"insert_page_into_pte_locked", "__folio_add_rmap", "__folio_remove_rmap",
        "folios_put_refs"} <= set(after["writer"])
assert after["stack"].str.contains("dev_dax_huge_fault").any()
assert not before[before["step"].isin([2, 4, 6, 7])].shape[0], "a mapping changed a counter on before"
assert set(before["writer"]) <= {"try_grab_folio", "try_grab_folio_fast", "try_get_folio",
                                 "gup_put_folio", "unpin_user_page", "unpin_user_pages"}
print("after:", len(after), "changes; before:", len(before), "changes (GUP only)")

# %% [markdown]
# ## A PMD mapping of a 2M folio
#
# `scenarios/fault-2m.toml` with every watched page's folio watched: on
# `after`, `insert_pmd` takes the reference and `folio_add_file_rmap_pmd`
# sets the large folio's `_entire_mapcount` and `_large_mapcount` (and, on a
# kernel with `CONFIG_PAGE_MAPCOUNT` such as Debian's, `_nr_pages_mapped`
# gains the ENTIRELY_MAPPED bit, 0x800000); `before` records nothing.

# %%
from lab.experiment import run_experiment  # noqa: E402
from lab.paths import scenario_path  # noqa: E402

exp = run_experiment(scenario_path("fault-2m"), ["before", "after"], events="stacks")
pmd = exp.frames["events"]
assert exp.frames["accounting"]["lost"].eq(0).all()
assert "insert_pmd" in set(pmd["writer"]) and not (pmd["kernel"] == "before").any()
pmd[["kernel", "step", "label", "pages", "field", "old", "new", "writer", "function"]]
