"""A sweep: every scenario on every kernel, one *cell* each, judged like
``devdax-lab run --check``. This module is the sweep's logic without its
processes: which cells there are and where they write, the command a cell
runs, what its exit status means, the summary of a finished cell read from
its run directory, the partitioned dataset and the kernel × scenario matrix.
The Dask side (the cluster, the task that owns a cell's process) is
:mod:`lab.sweep_cluster`; nothing here imports Dask.

A sweep directory::

    DIR/SCENARIO/KERNEL/     one cell: the run directory `run` writes, plus
                             cell.log (the run's stdout and stderr) and, in
                             meta.json, "sweep" (the worker that ran it)
    DIR/data/FRAME/kernel=K/scenario=S/part-0.parquet
                             the frames of every cell as one hive-partitioned
                             dataset per frame (timeline, steps, violations,
                             expectations, cells)
    DIR/sweep.json           the summaries, kernels, scenarios, when, where
    DIR/sweep.html           the verdict matrix and the differences
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .errors import EXIT_FAILURE, EXIT_UNTESTABLE, EXIT_USAGE, UserError
from .kernels.lookup import is_path

__all__ = [
    "CELL_LOG",
    "DATASET_FRAMES",
    "SUMMARY_NAME",
    "VM_SLOT_BYTES",
    "Cell",
    "cell_command",
    "cell_dir",
    "check_kernels",
    "check_out_dir",
    "differences_by_scenario",
    "error_line",
    "find_scenarios",
    "kernel_label",
    "local_slots",
    "plan_cells",
    "read_dataset",
    "read_sweep",
    "retry_worth",
    "summarize",
    "verdict_matrix",
    "verdict_name",
    "with_worker",
    "write_dataset",
    "write_summaries",
]

CELL_LOG = "cell.log"
SUMMARY_NAME = "sweep.json"
# The run directory's frames that go into the dataset (DIR/data/<frame>/),
# besides "cells", the summaries themselves.
DATASET_FRAMES = ("timeline", "steps", "violations", "expectations")
# What one VM slot needs on the host, measured on `run --check` of fault-4k,
# fork-share and fault-2m (warm start, TCG): 220-258 MB private memory at the
# peak (RssAnon + RssShmem of the run's Python with drgn and of QEMU; the
# saved state's files are shared page cache), plus up to ~140 MB in /dev/shm
# for a cold boot's copies of guest RAM data and NVDIMM files, plus ~110 MB
# for the Dask worker process that owns the cell.
VM_SLOT_BYTES = 512 << 20
TAIL_LINES = 25

VERDICTS = {0: "holds", EXIT_FAILURE: "fails", EXIT_UNTESTABLE: "untestable"}


@dataclass(frozen=True)
class Cell:
    """One scenario on one kernel: one task, one run directory.

    ``kernel`` is the kernel as the user spelled it (a name, or the PATH of
    a tree built in place), passed to ``run --kernel`` as it is; ``label``
    is how the run names it (a tree by its directory's name): the cell's
    directory and the dataset's ``kernel=`` partition."""

    scenario: str
    path: Path
    kernel: str
    cold: bool = False  # boot from scratch, not from the saved state (run --cold)

    @property
    def label(self) -> str:
        return kernel_label(self.kernel)

    @property
    def key(self) -> str:
        return f"{self.scenario}/{self.label}"


def kernel_label(kernel: str) -> str:
    """A kernel as runs name it: a tree given by path is its directory's name."""
    return Path(kernel).expanduser().name if is_path(kernel) else kernel


def find_scenarios(patterns: Sequence[str]) -> list[Path]:
    """Scenario files matching *patterns* (shell globs, or files), in the
    order given, each once. A pattern that matches no .toml file is a
    UserError naming it."""
    found: dict[Path, None] = {}
    for pattern in patterns:
        matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern))
                         if p.endswith(".toml") and Path(p).is_file())
        if not matches:
            raise UserError(f"--scenarios {pattern!r} matches no scenario file (.toml); "
                            "try scenarios/*.toml")
        for m in matches:
            found.setdefault(m.resolve(), None)
    return list(found)


def check_kernels(kernels: Sequence[str], known: Iterable[str]) -> list[str]:
    """The kernels of ``--kernels``, each once, checked against *known*
    (the catalog and the built kernels, lab.kernels.known_kernels); a tree
    given by path must be a directory."""
    names = list(dict.fromkeys(k for k in kernels if k))
    if not names:
        raise UserError("--kernels needs at least one kernel, e.g. --kernels before,after")
    known = list(known)
    for name in names:
        if is_path(name):
            if not Path(name).expanduser().is_dir():
                raise UserError(f"--kernels: {name}: no such directory (a kernel tree built "
                                "in place is given by its path)")
        elif name not in known:
            raise UserError(f"--kernels: unknown kernel {name!r}: known kernels are "
                            f"{', '.join(known)} (see devdax-lab kernels), or a path to a "
                            "built tree")
    labels = [kernel_label(k) for k in names]
    if len(set(labels)) != len(labels):
        raise UserError(f"--kernels: two kernels would share a directory: {', '.join(names)}")
    return names


def plan_cells(scenarios: Sequence[Path], kernels: Sequence[str], *, cold: bool = False
               ) -> list[Cell]:
    """Every scenario on every kernel, scenario by scenario in the order
    given (each booted from scratch if *cold*). Two scenario files of the
    same name would share a directory: a UserError."""
    names: dict[str, Path] = {}
    for path in scenarios:
        if path.stem in names and names[path.stem] != path:
            raise UserError(f"two scenarios are called {path.stem!r} ({names[path.stem]} and "
                            f"{path}): their cells would share DIR/{path.stem}/")
        names[path.stem] = path
    return [Cell(path.stem, path, k, cold) for path in scenarios for k in kernels]


def check_out_dir(out: Path) -> None:
    """--out must be a new or empty directory, or an earlier sweep's (its
    cells are then run again); nothing is made here."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / SUMMARY_NAME).exists():
        raise UserError(f"--out {out}: not empty and not a sweep directory (no {SUMMARY_NAME}); "
                        "choose a new directory")
    if (driver := running_driver(out)) is not None:
        raise UserError(f"--out {out}: another sweep (pid {driver}) is writing it now: wait for "
                        "it to finish, or choose another directory")
    parent = out.parent if not out.exists() else out
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise UserError(f"--out {out}: {parent} is not writable")


def running_driver(out: Path) -> int | None:
    """The pid of the live sweep on this machine still writing *out* (its
    sweep.json says ``running`` with that driver), or None."""
    import socket

    from .procs import pid_alive

    try:
        about = json.loads((Path(out) / SUMMARY_NAME).read_text())
        driver = about["driver"]
        pid = int(driver["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    mine = driver.get("host") == socket.gethostname() and pid != os.getpid()
    return pid if about.get("state") == "running" and mine and pid_alive(pid) else None


def cell_dir(out: Path, cell: Cell) -> Path:
    return Path(out) / cell.scenario / cell.label


def cell_command(cell: Cell, out: Path, python: str) -> list[str]:
    """What a cell runs: ``run --check`` of its scenario and kernel into its
    directory (the verdict as the exit status: 0, 1, 125)."""
    return [python, "-m", "lab.cli", "run", str(cell.path), "--kernel", cell.kernel,
            "--out", str(cell_dir(out, cell)), "--check", *(["--cold"] if cell.cold else [])]


def verdict_name(status: int | None) -> str:
    """``holds`` (0), ``fails`` (1), ``untestable`` (125), ``stopped``
    (128 + a signal: SIGTERM, Ctrl-C), ``error`` for anything else (2 bad
    input, a crash of the run, a timeout)."""
    if status in VERDICTS:
        return VERDICTS[status]
    if status is not None and 128 < status < 160:
        return "stopped"
    return "error"


def retry_worth(status: int | None) -> bool:
    """Whether another attempt may give a verdict: the kernel could not be
    tested (125: a boot that failed) or the run crashed (killed by a signal,
    an unexpected status). Never a verdict (0, 1), bad input (2) or a stop
    that was asked for (128 + N)."""
    return status not in (0, EXIT_FAILURE, EXIT_USAGE) and verdict_name(status) in (
        "untestable", "error")


def error_line(log_lines: Sequence[str]) -> str | None:
    """The run's one-line reason, as ``lab.cli.main`` prints it
    (``devdax-lab: ...``, its last such line), or the last line of a
    traceback (a bug); None when there is neither."""
    lines = [line.rstrip() for line in log_lines if line.strip()]
    if any(line.startswith("Traceback (most recent call last)") for line in lines):
        return lines[-1]
    for line in reversed(lines):
        if line.startswith("devdax-lab: ") and not line.startswith(
                ("devdax-lab: wrote ", "devdax-lab: verdict: ")):
            return line.removeprefix("devdax-lab: ")
    return None


def _read_frame(run_dir: Path, name: str) -> pd.DataFrame | None:
    path = run_dir / f"{name}.parquet"
    return pd.read_parquet(path) if path.exists() else None


def summarize(cell: Cell, run_dir: Path, status: int | None, log_lines: Sequence[str], *,
              seconds: float, worker: str | None = None, host: str | None = None,
              attempts: int = 1, reason: str | None = None) -> dict:
    """The small summary of one finished cell: scenario, kernel, verdict,
    exit status, number of violations and of failed expectations, the first
    failure, timings (``seconds``: the run; ``boot_seconds``: QEMU start to
    ready, boot or restore, from meta.json; ``steps_seconds``: the steps' own
    time from the steps frame; ``setup_seconds``: the rest: Python start,
    kernel, drgn, writing the run directory), release, worker, attempts;
    for a cell that does not hold, the reason and the tail of its log.
    *reason* overrides the one read from the log (a timeout)."""
    verdict = verdict_name(status)
    steps = _read_frame(run_dir, "steps")
    violations = _read_frame(run_dir, "violations")
    expectations = _read_frame(run_dir, "expectations")
    failed = (int((~expectations["passed"].fillna(False).astype(bool)).sum())
              if expectations is not None else 0)
    meta = _read_meta(run_dir)
    release = boot_seconds = None
    for info in (meta.get("kernels") or {}).values():
        release, boot_seconds = info.get("release"), info.get("ready_seconds")
    steps_seconds = float(steps["seconds"].sum()) if steps is not None else None
    line = reason or error_line(log_lines)
    summary = {
        "scenario": cell.scenario, "kernel": cell.label, "spelling": cell.kernel,
        "verdict": verdict, "status": status,
        "violations": len(violations) if violations is not None else None,
        "failed_expectations": failed if expectations is not None else None,
        "expectations": len(expectations) if expectations is not None else None,
        "first_failure": line if verdict == "fails" else None,
        "reason": line if verdict != "holds" else None,
        "console_tail": ([line.rstrip("\n") for line in log_lines[-TAIL_LINES:]]
                         if verdict != "holds" else []),
        "seconds": round(seconds, 3),
        "boot_seconds": boot_seconds,
        "steps_seconds": None if steps_seconds is None else round(steps_seconds, 3),
        "setup_seconds": None if steps_seconds is None else round(
            seconds - steps_seconds - (boot_seconds or 0), 3),
        "release": release, "worker": worker, "host": host, "attempts": attempts,
        "report": (f"{cell.scenario}/{cell.label}/report.html"
                   if (run_dir / "report.html").exists() else None),
    }
    return summary


def _read_meta(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "meta.json").read_text())
    except (OSError, ValueError):
        return {}


def with_worker(meta: Mapping, *, worker: str | None, host: str | None, attempts: int,
                scheduler: str | None) -> dict:
    """meta.json of a cell with what only the sweep knows: the Dask worker
    (address and host) that ran it, how many attempts, the scheduler."""
    return {**meta, "sweep": {"worker": worker, "host": host, "attempts": attempts,
                              "scheduler": scheduler}}


def local_slots(cores: int, available_bytes: int, asked: int | None = None) -> int:
    """VM slots of a local sweep: *asked* (--workers), else one per core as
    far as memory allows (:data:`VM_SLOT_BYTES` each), at least one."""
    if asked is not None:
        if asked < 1:
            raise UserError(f"--workers {asked}: needs at least 1")
        return asked
    return max(1, min(cores, available_bytes // VM_SLOT_BYTES))


# -- outputs ---------------------------------------------------------------------------------


def write_summaries(out: Path, summaries: Sequence[Mapping], **about) -> Path:
    """sweep.json: the cells' summaries (scenario by scenario, kernels in
    the order asked) and *about* the sweep (kernels, scenarios, scheduler,
    workers, seconds)."""
    path = Path(out) / SUMMARY_NAME
    path.write_text(json.dumps({**about, "cells": list(summaries)}, indent=2, default=str)
                    + "\n")
    return path


def write_dataset(out: Path, summaries: Sequence[Mapping]) -> list[Path]:
    """DIR/data/<frame>/kernel=K/scenario=S/part-0.parquet for the frames of
    every cell that wrote a run directory, and DIR/data/cells/ (the
    summaries, one row a cell): each frame one table to
    ``pd.read_parquet(DIR/"data/timeline")`` and
    ``dask.dataframe.read_parquet``. A frame has one schema across cells (a
    column all null in one cell takes its type from the others), and a cell
    whose frame is empty (no violations) still writes its part, so that
    every frame a run writes is there to read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .report import parquet_safe

    data = Path(out) / "data"
    parts: dict[str, dict[tuple[str, str], pa.Table]] = {
        name: {} for name in (*DATASET_FRAMES, "cells")}
    for s in summaries:
        where = (str(s["kernel"]), str(s["scenario"]))
        run_dir = Path(out) / s["scenario"] / s["kernel"]
        for name in DATASET_FRAMES:
            frame = _read_frame(run_dir, name)
            if frame is not None:
                frame = parquet_safe(frame.drop(columns=["kernel", "scenario"], errors="ignore"))
                parts[name][where] = pa.Table.from_pandas(frame, preserve_index=False)
        row = {k: v for k, v in s.items() if k not in ("kernel", "scenario", "console_tail")}
        row["console_tail"] = "\n".join(s.get("console_tail") or [])
        parts["cells"][where] = pa.Table.from_pandas(pd.DataFrame([row]), preserve_index=False)
    written = []
    for name, tables in parts.items():
        if not tables:
            continue
        schema = pa.concat_tables(list(tables.values()), promote_options="permissive").schema
        for (kernel, scenario), table in tables.items():
            path = data / name / f"kernel={kernel}" / f"scenario={scenario}" / "part-0.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(_conform(table, schema), path)
            written.append(path)
    return written


def _conform(table, schema):
    """*table* with *schema*'s columns, in its order and types (a missing
    column all null)."""
    import pyarrow as pa

    columns = [table.column(f.name).cast(f.type) if f.name in table.column_names
               else pa.nulls(len(table), f.type) for f in schema]
    return pa.Table.from_arrays(columns, schema=schema.remove_metadata())


def read_dataset(out: Path, name: str) -> pd.DataFrame:
    """One frame of the sweep's dataset as one table (``kernel`` and
    ``scenario`` as strings, as in a run directory's frames)."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    # the partition names as strings, whatever they look like (a kernel
    # named 007 would otherwise come back as the integer 7)
    partitioning = ds.partitioning(pa.schema([("kernel", pa.string()),
                                              ("scenario", pa.string())]), flavor="hive")
    frame = pd.read_parquet(Path(out) / "data" / name, partitioning=partitioning)
    return frame.astype({c: str for c in ("kernel", "scenario") if c in frame.columns})


def read_sweep(out: Path) -> dict:
    """sweep.json of a sweep directory."""
    return json.loads((Path(out) / SUMMARY_NAME).read_text())


def verdict_matrix(summaries: Sequence[Mapping]) -> pd.DataFrame:
    """Verdicts as a scenario × kernel table (rows and columns in the
    sweep's order); a cell not run is null."""
    frame = pd.DataFrame(summaries, columns=["scenario", "kernel", "verdict"])
    matrix = frame.pivot(index="scenario", columns="kernel", values="verdict")
    rows = list(dict.fromkeys(frame["scenario"]))
    cols = list(dict.fromkeys(frame["kernel"]))
    return matrix.reindex(index=rows, columns=cols)


def differences_by_scenario(timelines: Mapping[str, Mapping[str, pd.DataFrame]]
                            ) -> dict[str, list[str]]:
    """Per scenario, what differs between its kernels, in the words of
    ``compare`` (`lab.timeline.df_diff` and `describe_differences`):
    *timelines* maps scenario → kernel → that cell's timeline. A scenario
    with fewer than two timelines gets none."""
    from . import timeline as tl

    out = {}
    for scenario, by_kernel in timelines.items():
        if len(by_kernel) < 2:
            continue
        joined = pd.concat(list(by_kernel.values()), ignore_index=True)
        out[scenario] = tl.describe_differences(tl.df_diff(joined), list(by_kernel))
    return out
