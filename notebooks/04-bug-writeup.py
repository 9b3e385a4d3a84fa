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
# # Bug write-up template
#
# A reproducible write-up: a scenario file and a list of kernels in, a
# directory out with the data (`timeline.parquet`, `timeline.csv`, every
# other frame), `meta.json` (kernel packages, QEMU, drgn, Python, the
# scenario's text and sha256, the date) and a self-contained `report.html`,
# the same as `devdax-lab compare` writes.
#
# Change the parameters in the next cell, or run it with papermill:
#
#     papermill notebooks/04-bug-writeup.ipynb out.ipynb \
#         -p scenario scenarios/pin-longterm.toml -p kernels before,after -p out out/pin
#
# Relative paths are relative to the repository root.

# %% tags=["parameters"]
scenario = "scenarios/fork-share.toml"
kernels = "before,after"
out = "out/bug-writeup"

# %%
from pathlib import Path

import pandas as pd
from IPython.display import JSON

from lab.experiment import run_experiment, write_experiment
from lab.plots import plot_counts, plot_page_table

ROOT = Path.cwd() if (Path.cwd() / "scenarios").exists() else Path.cwd().parent
scenario_path = ROOT / scenario
out_dir = ROOT / out
kernel_names = [k.strip() for k in kernels.split(",") if k.strip()]

exp = run_experiment(scenario_path, kernel_names)
print(exp.scenario.title)
print(exp.scenario.description)

# %% [markdown]
# ## What differs between the kernels

# %%
for line in exp.differences:
    print("-", line)

# %%
plot_counts(exp.frames["timeline"], exp.frames["complaints"])

# %%
plot_page_table(exp.frames["timeline"])

# %% [markdown]
# ## Invariants broken
#
# On fork-share, `refcount>=mappings` is broken on `before` by design: two
# processes map the same device page while the mappings hold no reference.

# %%
pd.DataFrame(exp.violations, columns=["invariant", "kernel", "step", "map", "page", "message"])

# %% [markdown]
# ## The environment (meta.json)

# %%
JSON(exp.meta, expanded=True)

# %% [markdown]
# ## Write the data and the report

# %%
report_path = write_experiment(exp, out_dir)
sorted(p.name for p in out_dir.iterdir()), report_path
