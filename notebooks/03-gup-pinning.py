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
# # GUP: long-term pins and dev_pagemap references
#
# `pin_user_pages(FOLL_LONGTERM)` (here: registering an io_uring fixed
# buffer) pins the folios behind a user range. `try_grab_folio()` (mm/gup.c)
# records a pin on an order-0 folio by adding `GUP_PIN_COUNTING_BIAS` (1024)
# to its refcount; on a large folio it adds 1 to the refcount **and** 1 to
# `_pincount` (a plain count from 0): the pin is a reference either way
# ([glossary](../docs/glossary.md#pins)).
#
# `scenarios/pin-longterm.toml` maps 16 pages of the 4K device, touches
# pages 0-7, pins pages 0-3, unmaps everything *while the pin is held*, then
# unpins. What to look at:
#
# - pinned pages 0-3 against touched-only pages 4-7,
# - on `after` the mapping holds its own reference (refcount 2, then 1026
#   with the pin) that munmap drops, leaving the pin's 1024 on top of the
#   resting 1; on `before` the mapping never held one (1, then 1025),
# - `pgmap_ref`: the `dev_pagemap`'s percpu_ref count. Its references are
#   taken in bulk when the device's pages are created (one per folio whose
#   memmap is not on the device, plus the initial one) and dropped in bulk
#   when they are removed. The lab checks that mapping, touching and
#   unmapping leave it unchanged (`pgmap-ref-stable`); here it also stays put
#   across pin and unpin on both kernels. On 6.12, GUP took a pgmap
#   reference only while it followed a devmap entry (`get_dev_pagemap()`,
#   then `put_dev_pagemap()` before returning); the refcount series removed
#   even that. Neither kernel keeps one for a pin's lifetime
#   ([glossary](../docs/glossary.md#pgmap-references)).

# %%
from lab.experiment import run_experiment
from lab.paths import scenario_path
from lab.plots import plot_counts

exp = run_experiment(scenario_path("pin-longterm"), ["before", "after"])
for line in exp.differences:
    print("-", line)

# %%
plot_counts(exp.frames["timeline"], exp.frames["complaints"])

# %% [markdown]
# Pages 0 (pinned) and 4 (not pinned) per step on both kernels, with the
# pin as the lab saw it (`pinned`) and the pgmap's reference count:

# %%
t = exp.frames["timeline"]
t[t["page"].isin([0, 4])][["kernel", "step", "label", "page", "refcount", "mapcount",
                           "pinned", "pgmap_ref", "pt_level"]]

# %% [markdown]
# `pgmap_ref` per step and kernel (`lab.steps`): equal at every step.

# %%
exp.frames["steps"][["kernel", "step", "action", "detail", "pgmap_ref"]]

# %% [markdown]
# The invariants hold on both kernels, `pin-visible` included (a pinned
# order-0 folio shows refcount >= 1024 while the pin lasts); the table is
# empty when they do:

# %%
exp.violations_frame
