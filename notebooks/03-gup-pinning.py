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
# buffer) pins the folios behind a user range. An order-0 folio records a
# pin by adding `GUP_PIN_COUNTING_BIAS` (1024) to its refcount; a large folio
# has a separate `_pincount`.
#
# `scenarios/pin-longterm.toml` maps 16 pages of the 4K device, touches
# pages 0-7, pins pages 0-3, unmaps everything *while the pin is held*, then
# unpins. What to look at:
#
# - pinned pages 0-3 against touched-only pages 4-7,
# - on `after` the mapping holds its own reference (refcount 2, then 1026
#   with the pin) that munmap drops, leaving the pin's 1024 on top of the
#   resting 1; on `before` the mapping never held one (1, then 1025),
# - `pgmap_ref`: the `dev_pagemap`'s percpu_ref count (one reference per
#   device folio plus the initial one). The lab checks that mapping,
#   touching and unmapping leave it unchanged (`pgmap-ref-stable`); here it
#   also stays put across pin and unpin on both kernels: no lasting pgmap
#   reference is taken for a pin.

# %%
from pathlib import Path

import pandas as pd

from lab.experiment import run_experiment
from lab.plots import plot_counts

ROOT = Path.cwd() if (Path.cwd() / "scenarios").exists() else Path.cwd().parent

exp = run_experiment(ROOT / "scenarios/pin-longterm.toml", ["before", "after"])
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
# order-0 folio shows refcount >= 1024 while the pin lasts):

# %%
pd.DataFrame(exp.violations, columns=["invariant", "kernel", "step", "map", "page", "message"])
