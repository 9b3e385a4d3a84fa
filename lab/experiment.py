"""One scenario on one or more kernels, from the file to the output
directory: validate, boot each kernel, run, build the frames, compare, check
invariants, write the report. The CLI's `run` and `compare` call this.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import platform
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pandas as pd

from . import timeline as tl
from .model import DEFAULT_DAX, PUD_DAX, PUD_LAYOUT, RunResult, UserError
from .runner import run_scenario
from .scenario import Scenario, load_scenario

__all__ = ["Experiment", "run_experiment", "frames_of", "provenance", "write_experiment"]


@dataclass
class Experiment:
    """Everything a report is made of. ``scenario`` is None for a notebook
    session (`Lab.save`), whose ``title`` then says what it was."""

    scenario: Scenario | None
    runs: list[RunResult]
    frames: dict[str, pd.DataFrame]
    differences: list[str]
    violations: list[tl.Violation]
    meta: dict
    session_title: str = "notebook session"

    @property
    def title(self) -> str:
        if self.scenario is None:
            return self.session_title
        return self.scenario.title or self.scenario.name

    @property
    def scenario_text(self) -> str:
        return self.scenario.text if self.scenario is not None else ""

    @property
    def violations_frame(self) -> pd.DataFrame:
        """The violations as a table: invariant, kernel, step, map, page,
        message (no rows when every invariant holds)."""
        columns = [f.name for f in dataclasses.fields(tl.Violation)]
        return pd.DataFrame([dataclasses.astuple(v) for v in self.violations], columns=columns)


def frames_of(runs: Sequence[RunResult]) -> dict[str, pd.DataFrame]:
    """The DataFrames of `lab.timeline` for *runs*, by output name."""
    timeline = tl.df_timeline(runs)
    frames = {
        "timeline": timeline,
        "steps": tl.df_steps(runs),
        "device": tl.df_device(runs),
        "device_pages": tl.df_device_pages(runs),
        "complaints": tl.df_complaints(runs),
    }
    if len(runs) > 1:
        frames["diff"] = tl.df_diff(timeline)
    if any(run.accounting for run in runs):  # watches were armed
        frames["events"] = tl.df_events(runs)
        frames["accounting"] = tl.df_accounting(runs)
        frames["call_paths"] = tl.df_call_paths(frames["events"])
    return frames


def provenance(scenario: Scenario, runs: Sequence[RunResult]) -> dict:
    """meta.json: kernels and their packages, tool versions, accelerator,
    the scenario text and its hash, and the date."""
    from . import kernels
    from .vm import qemu_version

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "unknown"

    kernel_meta = {}
    for run in runs:
        st = kernels.status(run.kernel)
        kernel_meta[run.kernel] = {"release": run.release, "packages": dict(st.packages or {}),
                                   "source": st.source}
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "scenario": {"name": scenario.name, "title": scenario.title, "sha256": scenario.sha256,
                     "text": scenario.text, "path": str(scenario.path) if scenario.path else None},
        "kernels": kernel_meta,
        "accelerator": runs[0].accel if runs else None,
        "qemu": qemu_version(),
        "drgn": version("drgn"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "devdax_lab": version("devdax-lab"),
        "pandas": version("pandas"),
        "plotly": version("plotly"),
    }


def run_experiment(scenario_path: Path, kernel_names: Sequence[str], *,
                   progress: Callable | None = None, say=print,
                   events: str | None = None) -> Experiment:
    """Validate *scenario_path* (nothing boots if it is bad), then run it on
    each kernel in turn. *events* ("counts" or "stacks") watches every
    watched page's folio counters (else only the entries that ask)."""
    from .session import Session

    scenario = load_scenario(scenario_path)
    if not kernel_names:
        raise UserError("name at least one kernel")
    from . import kernels

    for name in kernel_names:  # a bad name fails here, before anything boots
        kernels.resolve(name, progress=progress)
    dax = PUD_LAYOUT if scenario.device >= PUD_DAX.align else DEFAULT_DAX
    runs = []
    for name in kernel_names:
        say(f"devdax-lab: {scenario.name} on {name}: booting")
        wants_events = bool(events) or any(w.events for w in scenario.watch_list)
        with Session.boot(name, dax=dax, say=say, progress=progress,
                          events=wants_events) as session:
            runs.append(run_scenario(session, scenario, progress=progress, events=events))
    frames = frames_of(runs)
    differences = tl.describe_differences(frames["diff"], kernel_names) if "diff" in frames else []
    violations = tl.check_invariants(frames["timeline"], frames["steps"])
    return Experiment(scenario, runs, frames, differences, violations, provenance(scenario, runs))


def write_experiment(exp: Experiment, out: str | Path) -> Path:
    """Write a run directory: every frame as parquet (the timeline also as
    CSV), meta.json and report.html (events, accounting and call paths
    included when the run watched counters). The one writer of run
    directories, for the CLI, `Lab.save` and notebook 04; returns the
    report's path."""
    from . import report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report.write_outputs(out, exp.frames, exp.meta)
    f = exp.frames
    return report.build_report(
        out, title=exp.title, scenario_text=exp.scenario_text, meta=exp.meta,
        timeline=f["timeline"], steps=f["steps"], device=f["device"],
        device_pages=f["device_pages"], complaints=f["complaints"], diff=f.get("diff"),
        differences=exp.differences, violations=exp.violations, events=f.get("events"),
        accounting=f.get("accounting"), call_paths=f.get("call_paths"))
