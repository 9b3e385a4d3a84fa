"""One scenario on one or more kernels, from the file to the output
directory: validate, boot each kernel, run, build the frames, compare, check
invariants, write the report. The CLI's `run` and `compare` call this.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import platform
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pandas as pd

from . import timeline as tl
from .expect import check_expectations
from .vm import GuestCrashed
from .model import DEFAULT_DAX, PUD_DAX, PUD_LAYOUT, RunResult, UserError
from .runner import run_scenario
from .scenario import Scenario, load_scenario

__all__ = ["Experiment", "run_experiment", "run_each", "default_jobs", "frames_of", "provenance",
           "write_experiment", "boot_options", "resolve_kernels", "verdict"]


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
    expectations: pd.DataFrame | None = None

    @property
    def failures(self) -> list[str]:
        """One line per violation and failed expectation, the earliest
        step first: the verdict is "holds" when there are none."""
        from .expect import failed

        lines = [(v.step, f"{v.invariant} at step {v.step} on {v.kernel}: {v.message}"
                  + (f" ({v.field}: expected {v.expected}, actual {v.actual})" if v.field
                     else "")) for v in self.violations]
        if self.expectations is not None:
            lines += [(int(r["step"]), r["message"])
                      for _, r in failed(self.expectations).iterrows()]
        return [text for _, text in sorted(lines, key=lambda x: x[0])]

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
        "kernel_messages": tl.df_kernel_messages(runs),
        "signals": tl.df_signals(runs),
        "processes": tl.df_processes(runs),
    }
    if len(runs) > 1:
        frames["diff"] = tl.df_diff(timeline)
    if any(run.accounting for run in runs):  # watches were armed
        frames["events"] = tl.df_events(runs)
        frames["accounting"] = tl.df_accounting(runs)
        frames["call_paths"] = tl.df_call_paths(frames["events"])
    return frames


def provenance(scenario: Scenario, runs: Sequence[RunResult], choices: Sequence) -> dict:
    """meta.json: kernels (as the user named them, and what they resolved
    to: release, packages, source, files), tool versions, accelerator, the
    scenario text and its hash, and the date. *choices* are the
    :class:`lab.plan.KernelChoice` of each run, in order: nothing is looked
    up again."""
    from .vm import qemu_version

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "unknown"

    kernel_meta = {}
    for run, choice in zip(runs, choices, strict=True):
        k = choice.artifacts
        kernel_meta[run.kernel] = {
            "spelling": choice.spelling, "release": run.release, "packages": dict(k.packages),
            "source": choice.source, "root": str(k.root) if k.root else None,
            # does a device-dax fault map the folio? probed from the fault
            # handler's calls (lab.inspect.probes)
            "counts_device_dax_mappings": run.counts_mappings,
            "dax_fault_calls": list(run.dax_fault_calls),
            "ready_seconds": run.ready_seconds}
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
                   events: str | None = None, cold: bool = False,
                   verdict_reads: bool = True, dump_at: int | str | None = None,
                   dump_dir: Path | None = None, jobs: int | None = None,
                   kernel_args: Sequence[str] = ()) -> Experiment:
    """Validate *scenario_path* (nothing boots if it is bad), then run it on
    each kernel, *jobs* kernels at once (default: every kernel, at most one
    a core; 1 runs them in turn: :func:`run_each`). *events* ("counts" or
    "stacks") watches every watched page's folio counters (else only the
    entries that ask). *cold* boots each kernel instead of starting from its
    saved state. *dump_at* (a step or ``"complaint"``) writes a vmcore of each
    guest to *dump_dir* (`lab.runner.run_scenario`). *kernel_args* go on each
    guest kernel's command line. The result does not depend on *jobs*: each
    run is its kernel's alone, kept in kernel order."""
    from .session import Session

    scenario = load_scenario(scenario_path)
    choices = resolve_kernels(kernel_names, progress=progress)

    def run_on(choice, progress) -> RunResult:
        say(f"devdax-lab: {scenario.name} on {choice.spelling}: booting")
        with Session.boot(choice, say=say, progress=progress, cold=cold,
                          kernel_args=kernel_args, **boot_options(scenario, events)) as session:
            try:
                return run_scenario(session, scenario, progress=progress, events=events,
                                    verdict_reads=verdict_reads, dump_at=dump_at,
                                    dump_dir=dump_dir)
            except GuestCrashed as exc:  # it booted; the scenario crashed it: the kernel is bad
                exc.during_scenario = True
                raise

    runs = run_each(run_on, choices, jobs=default_jobs(len(choices)) if jobs is None else jobs,
                    progress=progress)
    frames = frames_of(runs)
    names = [r.kernel for r in runs]  # the diff's columns: the kernels as runs name them
    differences = tl.describe_differences(frames["diff"], names) if "diff" in frames else []
    violations = tl.check_invariants(frames["timeline"], frames["steps"],
                                     frames.get("processes"), frames.get("kernel_messages"))
    frames["violations"] = tl.df_violations(violations)
    expectations = check_expectations(scenario.expect, frames, [r.kernel for r in runs])
    if scenario.expect:
        frames["expectations"] = expectations
    return Experiment(scenario, runs, frames, differences, violations,
                      provenance(scenario, runs, choices), expectations=expectations)


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
        accounting=f.get("accounting"), call_paths=f.get("call_paths"),
        signals=f.get("signals"), kernel_messages=f.get("kernel_messages"),
        processes=f.get("processes"), expectations=exp.expectations)


def default_jobs(kernels: int) -> int:
    """How many kernels run at once by default: all of them, at most one per
    core (under TCG a VM keeps one core busy)."""
    return max(1, min(kernels, os.cpu_count() or 1))


#: How long a stopped job's threads get to stop their VMs and remove their
#: run directories (drgn may be loading a kernel's debug info).
STOP_WAIT = 60.0


def run_each(run_on: Callable, choices: Sequence, *, jobs: int,
             progress: Callable | None = None) -> list:
    """``[run_on(choice, progress) for choice in choices]``, *jobs* at once.

    With more than one job each runs in a thread of its own with its own
    progress line (`lab.progress.for_slot`) and its VMs in one
    :class:`lab.vm.VmGroup`; the calling thread (the main thread, where
    Ctrl-C and SIGTERM arrive) waits. On the first failure, or when the
    wait is interrupted, the group is stopped: every VM of the job ends, its
    owner removes its run directory, and the calling thread raises that
    first failure (or the interruption) once the threads are done. The
    threads are daemons: one stuck waiting for another process's cache lock
    cannot keep the process alive, and it holds no VM.
    """
    from .progress import for_slot
    from .vm import VmGroup

    if jobs <= 1 or len(choices) <= 1:
        return [run_on(choice, progress) for choice in choices]
    group = VmGroup()
    slots = threading.BoundedSemaphore(jobs)
    results: list = [None] * len(choices)
    failures: list[BaseException] = []  # in the order they happened

    # Each thread says it is done with an Event: Thread.join interrupted by a
    # signal can mark a thread that still runs as stopped (CPython bpo-45274's
    # fix releases the thread's own lock), and then nobody waits for it.
    done = [threading.Event() for _ in choices]

    def work(i: int, choice) -> None:
        try:
            with slots, group.member():
                group.check()
                results[i] = run_on(choice, for_slot(progress, i))
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
            failures.append(exc)
            group.stop(f"{choice.spelling} failed")
        finally:
            done[i].set()

    threads = [threading.Thread(target=work, args=(i, c), daemon=True,
                                name=f"devdax-run-{c.spelling}") for i, c in enumerate(choices)]
    try:
        for t in threads:
            t.start()
        for finished in done:
            while not finished.wait(0.2):  # short waits: a signal's exception comes between
                pass
    except BaseException as exc:
        group.stop(f"interrupted ({type(exc).__name__})")
        deadline = time.monotonic() + STOP_WAIT
        for finished in done:
            finished.wait(max(0.0, deadline - time.monotonic()))
        raise
    if failures:
        raise failures[0]  # the others followed from stopping the group
    return results


def resolve_kernels(kernel_names: Sequence[str], *, progress: Callable | None = None) -> list:
    """Each kernel resolved once, before anything boots (a bad name fails
    here): the :class:`lab.plan.KernelChoice` a run carries to its end."""
    from .launch import resolve_kernel

    if not kernel_names:
        raise UserError("name at least one kernel")
    return [resolve_kernel(name, progress=progress) for name in kernel_names]


def boot_options(scenario: Scenario, events: str | None = None) -> dict:
    """How *scenario* needs its guests booted (``Session.boot`` /
    ``Session.plan`` keywords): the 1G device layout when it uses one, and
    events when asked or when a watch entry asks."""
    return {"dax": PUD_LAYOUT if scenario.device >= PUD_DAX.align else DEFAULT_DAX,
            "events": bool(events) or any(w.events for w in scenario.watch_list)}


def verdict(run: Callable[[], Experiment]) -> Experiment:
    """*run* (an experiment) judged with ``git bisect run``'s codes: a
    kernel that cannot be tested (build, boot, agent: a LabFailure before or
    outside the steps, or a kernel whose kind the probe cannot tell) raises
    Untestable (125); a kernel the scenario crashed raises VerdictFailed
    (1); else the experiment is returned, and the caller raises VerdictFailed
    when :attr:`Experiment.failures` is not empty."""
    from .errors import LabFailure, Untestable, VerdictFailed

    try:
        exp = run()
    except LabFailure as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        if getattr(exc, "during_scenario", False):  # the scenario crashed the kernel: bad
            raise VerdictFailed(f"the kernel crashed during the scenario: {first}") from exc
        raise Untestable(f"the kernel could not be tested: {first}") from exc
    unknown = [r.kernel for r in exp.runs if r.counts_mappings is None]
    if unknown:  # without it rmap, refs, flat and rss cannot judge
        raise Untestable(f"could not tell whether {', '.join(unknown)} counts device-dax "
                         "mappings: its device-dax fault handler calls no known insert "
                         "function (lab.inspect.probes)")
    return exp
