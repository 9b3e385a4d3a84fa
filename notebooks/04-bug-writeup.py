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
# # Bug write-up
#
# A write-up for people who will never install the lab: a scenario file and
# a list of kernels in; out comes a directory with what `devdax-lab compare
# --watch stacks --writeup` writes:
#
# - `report.txt`: the message for the mailing list (plain text, 80 columns):
#   send it inline;
# - `repro.c`: a standalone C reproducer of the same steps in the same
#   processes (`gcc -Wall -Wextra -Werror -O2 -static`); attach it;
# - `report.html`, `meta.json` and the data (`timeline.parquet`, ...).
#
# The sections below are those of the write-up: Summary, Expected vs
# actual, Steps, Evidence, Reproducer, Environment. Change the parameters in
# the next cell (the cell is tagged `parameters`, so papermill's `-p` works
# too, if you install it). The same files without a notebook:
#
#     devdax-lab compare scenarios/pin-longterm.toml --kernels before,after \
#         --out out/pin --writeup
#
# Relative paths are relative to the repository root.

# %% tags=["parameters"]
scenario = "scenarios/fork-share.toml"
kernels = "before,after"
out = "out/bug-writeup"

# %%
from IPython.display import JSON

from lab.experiment import run_experiment, write_experiment
from lab.paths import repo_root
from lab.plots import plot_counts, plot_events, plot_page_table
from lab.writeup import WRITERS, read_run, report_sections, write_writeup

out_dir = repo_root() / out
kernel_names = [k.strip() for k in kernels.split(",") if k.strip()]

# every change of the watched counters, with its writer's stack
exp = run_experiment(repo_root() / scenario, kernel_names, events="stacks")
write_experiment(exp, out_dir)
written = write_writeup(out_dir, out_dir)
run = read_run(out_dir)
sections = report_sections(run)


def show(heading: str) -> None:
    """One section of report.txt, as the mailing list will read it."""
    print("\n".join(sections.get(heading, [])))


# %% [markdown]
# ## Summary
#
# The subject line, what ran where, and the verdict.

# %%
show("")
print()
show("Verdict")

# %% [markdown]
# ## Expected vs actual
#
# The scenario's own expectations (`[[expect]]`: wanted, actual, why) and
# the invariants the lab checks on every run; a violation says what was
# expected and what the kernel did, at which step. The differences between
# the kernels follow.

# %%
if exp.expectations is not None:
    display(exp.expectations[["expect", "kernel", "step", "object", "field", "wanted",  # noqa: F821
                              "actual", "passed", "why"]])
display(exp.violations_frame)  # noqa: F821

# %%
for line in exp.differences:
    print("-", line)

# %% [markdown]
# ## Steps

# %%
show("Steps")

# %% [markdown]
# ## Evidence
#
# The watched folios' counters at every step, the page-table entries that
# map them, the counters at the steps where they moved (as report.txt has
# them), the kernel's own complaints, and who wrote each change.

# %%
plot_counts(exp.frames["timeline"], exp.frames["complaints"])

# %%
plot_page_table(exp.frames["timeline"])

# %%
show("Counters of the watched pages")

# %%
show("Kernel messages")

# %%
if "events" in exp.frames:
    display(plot_events(exp.frames["events"], exp.frames["steps"]))  # noqa: F821
show(WRITERS)

# %% [markdown]
# ## Reproducer
#
# `repro.c` replays the steps without the lab and exits 0 when every step
# did what it did here. Its first lines:

# %%
show("How to reproduce")
print()
print("\n".join((out_dir / "repro.c").read_text().splitlines()[:24]))

# %% [markdown]
# ## Environment (meta.json)

# %%
JSON(exp.meta, expanded=True)

# %%
sorted(p.name for p in out_dir.iterdir())
