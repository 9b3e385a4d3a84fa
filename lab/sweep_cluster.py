"""A sweep's cells on Dask distributed: a ``LocalCluster`` sized to this
machine (one ``vm`` resource per worker, one worker per core as memory
allows) or an existing cluster (``--scheduler ADDRESS``), one task per cell.

Each task owns one child process, ``python -m lab.cli run ... --check``
(:class:`CellProcess`), rather than running the scenario in the worker's
thread: the run's clean stop on SIGTERM (``lab.errors.Terminated``: VM
stopped, run directory removed, one line) needs signal handlers, which
only a main thread has; and a run that hangs or crashes takes only its own
process with it. The child dies with the worker thread that started it
(``setpriv --pdeathsig TERM``: it then stops its VM as on any SIGTERM), and
QEMU dies with the child (lab.vm). While the child runs, the task watches
whether Dask still wants it (the worker's state of the task's key turns
``cancelled`` when the client cancels it or goes away) and then sends it
SIGTERM. The logic (cells, summaries, dataset, page) is :mod:`lab.sweep`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Self

from .errors import LabFailure, UserError
from .procs import terminate
from .sweep import (
    CELL_LOG,
    Cell,
    cell_command,
    cell_dir,
    differences_by_scenario,
    local_slots,
    read_dataset,
    retry_worth,
    summarize,
    with_worker,
    write_dataset,
    write_summaries,
)

__all__ = ["CellProcess", "open_client", "prepare_local", "run_cell", "run_sweep", "write_outputs"]

log = logging.getLogger(__name__)

STOP_TIMEOUT = 60.0  # a run stopping its VM and removing its run directory takes ~1-2 s
WATCH_INTERVAL = 0.2
PROGRESS_INTERVAL = 2.0  # seconds between two looks at what runs
# Worker states of a task that nobody wants any more (distributed 2026.8:
# client.cancel() turns an executing task "cancelled"; a task whose key was
# dropped is released or gone from worker.state.tasks).
UNWANTED = ("cancelled", "released", "forgotten")


class CellProcess:
    """The one owner of a cell's child process: started under ``setpriv
    --pdeathsig TERM`` (it stops when the thread that started it dies) with
    stdout and stderr appended to *log*; :meth:`stop` sends SIGTERM (the run
    stops its VM, removes its run directory and prints one line), then
    SIGKILL after :data:`STOP_TIMEOUT`; always reaped."""

    def __init__(self, argv: Sequence[str], log_path: Path, env: dict | None = None):
        self.argv = list(argv)
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Self:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(["setpriv", "--pdeathsig", "TERM", "--", *self.argv],
                                         stdin=subprocess.DEVNULL, stdout=log_file,
                                         stderr=subprocess.STDOUT, env=self.env)
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def wait(self, *, wanted: Callable[[], bool], timeout: float) -> tuple[int | None, str | None]:
        """Wait for the run's exit status; stop it early when no longer
        *wanted* or after *timeout* seconds. Returns (status, why it was
        stopped or None)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.proc.wait(timeout=WATCH_INTERVAL), None
            except subprocess.TimeoutExpired:
                pass
            if not wanted():
                return self.stop(), "cancelled"
            if time.monotonic() > deadline:
                return self.stop(), f"timed out after {timeout:.0f} s"

    def stop(self) -> int | None:
        """SIGTERM, wait, SIGKILL; the exit status (128 + N for a signal)."""
        return None if self.proc is None else terminate(self.proc, STOP_TIMEOUT)


def _dask_wanted() -> Callable[[], bool]:
    """Whether the Dask task running this code is still wanted (always, off
    a Dask worker: a plain loop, the benchmark's sequential run)."""
    try:
        from distributed import get_worker

        worker = get_worker()
        key = worker.get_current_task()
    except ValueError:  # not on a worker
        return lambda: True

    def wanted() -> bool:
        ts = worker.state.tasks.get(key)
        return ts is not None and ts.state not in UNWANTED

    return wanted


def _worker_address() -> str | None:
    try:
        from distributed import get_worker

        return get_worker().address
    except ValueError:
        return None


def run_cell(cell: Cell, out: str | Path, *, retries: int = 1, timeout: float = 1800.0,
             scheduler: str | None = None, ship_files: bool = False,
             kernel_identity: dict | None = None, scenario_text: str | None = None) -> dict:
    """One cell, as a Dask task (or plainly): ``run --check`` in a child
    process into DIR/SCENARIO/KERNEL/, stdout and stderr appended to its
    cell.log; attempted again (at most *retries* more times) while it
    neither gives a verdict nor was stopped; the worker that ran it added to
    its meta.json. Returns the summary (:func:`lab.sweep.summarize`); with
    *ship_files*, the run goes into a scratch directory of this machine
    instead, removed after its files were put in the summary as ``files``
    (bytes by path under *out*) for a driver on another machine. With
    *kernel_identity* (the driver's :func:`lab.kernels.identity` of the
    kernel), a kernel that resolves to something else here is an ``error``
    cell saying so, and nothing runs. With *scenario_text* (a worker that
    may not have the driver's files) the scenario is run from a copy of
    that text in the scratch directory, under its own file name.
    """
    scratch = Path(tempfile.mkdtemp(prefix="devdax-lab-cell-")) if ship_files else None
    if scratch is not None and scenario_text is not None:
        copy = scratch / ".scenario" / cell.path.name
        copy.parent.mkdir()
        copy.write_text(scenario_text)
        cell = dataclasses.replace(cell, path=copy)
    try:
        return _run_cell(cell, scratch or Path(out), retries=retries, timeout=timeout,
                         scheduler=scheduler, ship_files=ship_files,
                         kernel_identity=kernel_identity)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _last_attempt(lines: list[str]) -> list[str]:
    """The log lines of the cell's last attempt (its reason and tail are
    that attempt's, not an earlier one's)."""
    starts = [i for i, line in enumerate(lines) if line.startswith("== attempt ")]
    return lines[starts[-1]:] if starts else lines


def _kernel_mismatch(cell: Cell, wanted: dict) -> str | None:
    """How the cell's kernel as this machine resolves it (fetching a catalog
    kernel if missing) differs from the driver's *wanted* identity; None
    when it is the same, or when it does not resolve here (the run then
    meets that failure itself and records it)."""
    from . import kernels
    from .errors import LabError

    try:
        have = kernels.identity(kernels.resolve(cell.kernel))
    except LabError:
        return None
    return kernels.identity_mismatch(cell.kernel, wanted, have)


def _run_cell(cell: Cell, out: Path, *, retries: int, timeout: float, scheduler: str | None,
              ship_files: bool, kernel_identity: dict | None) -> dict:
    directory = cell_dir(out, cell)
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    log_path = directory / CELL_LOG
    wanted = _dask_wanted()
    worker, host = _worker_address(), socket.gethostname()
    attempts, status, why = 0, None, None
    t0 = started = time.monotonic()
    if kernel_identity is not None and (why := _kernel_mismatch(cell, kernel_identity)):
        with open(log_path, "a") as f:
            f.write(f"devdax-lab: {why}\n")
    while why is None:
        attempts += 1
        started = time.monotonic()
        with open(log_path, "a") as f:
            f.write(f"== attempt {attempts} on {host} ({worker or 'no worker'}): "
                    f"{' '.join(cell_command(cell, out, 'python'))}\n")
        with CellProcess(cell_command(cell, out, sys.executable), log_path,
                         env=_child_env()) as child:
            status, why = child.wait(wanted=wanted, timeout=timeout)
        if why or not retry_worth(status) or attempts > retries:
            break
    seconds = time.monotonic() - started
    lines = _last_attempt(log_path.read_text(errors="replace").splitlines())
    summary = summarize(cell, directory, status, lines, seconds=seconds, worker=worker,
                        host=host, attempts=attempts,
                        reason=why if why and why != "cancelled" else None)
    if why and why != "cancelled":
        summary["verdict"] = "error"
    summary["sweep_seconds"] = round(time.monotonic() - t0, 3)
    meta_path = directory / "meta.json"
    if meta_path.exists():
        import json

        meta = with_worker(json.loads(meta_path.read_text()), worker=worker, host=host,
                           attempts=attempts, scheduler=scheduler)
        meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
    if ship_files:
        summary["files"] = {str(p.relative_to(out)): p.read_bytes()
                            for p in sorted(directory.rglob("*")) if p.is_file()}
    return summary


def _child_env() -> dict:
    """The run's environment: this one, with progress off a terminal (the
    log gets a line per stage)."""
    env = dict(os.environ)
    env.pop("COLUMNS", None)
    return env


# -- the driver ------------------------------------------------------------------------------


def prepare_local(cells: Sequence[Cell], *, say=print, progress=None) -> None:
    """What every cell on this machine needs, made once before any starts
    (so that the cells do not all wait on the same locks): each kernel
    resolved (fetched if missing), its guest image, the prepared NVDIMM
    files and the saved warm-start state of each device layout the
    scenarios use. Scenarios are validated here too: a bad one is a
    UserError before anything starts. A kernel that fails here (a fetch, a
    boot) is left to its cells, which record the failure."""
    from . import warm
    from .experiment import boot_options
    from .launch import resolve_kernel
    from .scenario import load_scenario
    from .session import Session

    options = {}
    for cell in cells:
        scenario = load_scenario(cell.path)
        opts = boot_options(scenario)
        options[repr(sorted(opts.items()))] = opts
    for kernel in dict.fromkeys(c.kernel for c in cells):
        try:
            choice = resolve_kernel(kernel, progress=progress)
            for opts in options.values():
                spec = Session.plan(choice, say=say, progress=progress, **opts)
                if spec.restore_from is not None and not all(c.cold for c in cells):
                    warm.make_state(spec, say=say)
        except LabFailure as exc:  # its cells meet the same failure and record it
            say(f"devdax-lab: preparing {kernel} failed ({str(exc).splitlines()[0]}); "
                "its cells will say so")


@contextlib.contextmanager
def open_client(scheduler: str | None, workers: int | None, *, verbose: bool = False
                ) -> Iterator:
    """A Dask client: of a new ``LocalCluster`` (processes, one thread and
    one ``vm`` resource per worker, no dashboard) with one worker per VM
    slot (:func:`lab.sweep.local_slots`), or of the scheduler at
    *scheduler*, which must have workers with a ``vm`` resource. Closed on
    the way out, whatever happens (a local cluster's workers with it)."""
    from distributed import Client, LocalCluster

    if not verbose:
        for name in ("distributed", "tornado", "bokeh"):
            logging.getLogger(name).setLevel(logging.ERROR)
    if scheduler is None:
        import psutil

        slots = local_slots(os.cpu_count() or 1, psutil.virtual_memory().available, workers)
        with LocalCluster(n_workers=slots, threads_per_worker=1, processes=True,
                          resources={"vm": 1}, dashboard_address=None, memory_limit=0,
                          silence_logs=logging.DEBUG if verbose else logging.ERROR) as cluster, \
                Client(cluster) as client:
            yield client
        return
    try:
        client = Client(scheduler, timeout="20s")
    except (OSError, TimeoutError) as exc:
        raise UserError(f"--scheduler {scheduler}: cannot reach a Dask scheduler there "
                        f"({exc}); start one with `dask scheduler`") from exc
    with client:
        if not _vm_slots(client):
            raise UserError(f"--scheduler {scheduler}: no worker has a 'vm' resource; start "
                            f"workers with `dask worker {scheduler} --resources vm=N`")
        yield client


def run_sweep(cells: Sequence[Cell], out: Path, *, scheduler: str | None = None,
              workers: int | None = None, retries: int = 1, timeout: float = 1800.0,
              prepare: bool = True, verbose: bool = False, say=print,
              progress=None) -> list[dict]:
    """Run every cell as a Dask task and write the sweep's outputs
    (dataset, sweep.json, sweep.html); the summaries in cell order. Without
    *scheduler* the kernels, images, NVDIMM files and warm states are made
    here first (:func:`prepare_local`). An interrupt (Ctrl-C, SIGTERM)
    cancels every task (each stops its run, which stops its VM) before the
    cluster closes.

    Cells are handed to Dask as VM slots free up, as many at a time as the
    cluster has slots (Dask's ``as_completed``-style feeding, with Dask
    still choosing the worker): the scheduler places a task that needs a
    resource on a worker as soon as it is submitted, so submitting every
    cell at once split them between workers by count, not by time (20 cells
    went 10 and 10, and the worker with the shorter cells idled at the end;
    ``devdax-lab bench sweep`` of 8 cold cells: 1.49x before, 1.68x with the
    window)."""
    from distributed import wait

    from .progress import counter

    out = Path(out)
    if prepare and scheduler is None:
        prepare_local(cells, say=say, progress=progress)
    t0 = time.monotonic()
    summaries: dict[Cell, dict] = {}
    run_id = uuid.uuid4().hex[:8]
    identities = _driver_identities(cells) if scheduler is not None else {}
    with open_client(scheduler, workers, verbose=verbose) as client:
        connected = time.monotonic() - t0
        out.mkdir(parents=True, exist_ok=True)  # only now: a bad --scheduler leaves nothing
        shutil.rmtree(out / "data", ignore_errors=True)
        for cell in cells:
            shutil.rmtree(cell_dir(out, cell), ignore_errors=True)
        slots = _vm_slots(client)
        say(f"devdax-lab: sweep of {len(cells)} cell(s) on {int(slots)} VM slot(s) "
            f"({scheduler or 'local cluster'})")
        about = {"kernels": list(dict.fromkeys(c.label for c in cells)),
                 "scenarios": list(dict.fromkeys(c.scenario for c in cells)),
                 "scheduler": scheduler or "local", "vm_slots": int(slots), "retries": retries,
                 "driver": {"pid": os.getpid(), "host": socket.gethostname()}}
        # a sweep.json from the start: a stopped sweep's DIR is a sweep's, to run again
        write_summaries(out, [], state="running", **about)
        futures: dict = {}
        waiting = list(cells)

        def hand_over(free: int) -> set:
            """Submit up to *free* more cells (see the docstring: a window,
            not all at once)."""
            handed = set()
            while waiting and free > 0:
                cell = waiting.pop(0)
                future = client.submit(run_cell, cell, str(out), retries=retries,
                                       timeout=timeout, scheduler=scheduler,
                                       ship_files=scheduler is not None,
                                       kernel_identity=identities.get(cell.kernel),
                                       scenario_text=(cell.path.read_text()
                                                      if scheduler is not None else None),
                                       key=f"cell-{cell.scenario}-{cell.label}-{run_id}",
                                       resources={"vm": 1}, pure=False)
                futures[future] = cell
                handed.add(future)
                free -= 1
            return handed

        bar = counter("sweep", total=len(cells), unit="cell")
        try:
            pending = hand_over(max(1, int(slots)))
            while pending:
                try:
                    done, pending = wait(pending, timeout=PROGRESS_INTERVAL,
                                         return_when="FIRST_COMPLETED")
                except TimeoutError:
                    done = set()
                for future in done:
                    cell = futures[future]
                    summaries[cell] = _collect(future, cell, out)
                if done and waiting:  # workers may have come or gone meanwhile
                    pending |= hand_over(max(1, int(_vm_slots(client))) - len(pending))
                running = len(_executing(client) & {f.key for f in futures})
                failed = sum(s["verdict"] != "holds" for s in summaries.values())
                bar.set_postfix(done=len(summaries), running=running, failed=failed,
                                refresh=False)
                bar.update(len(done))  # drawn at most every mininterval, also with 0
        except BaseException:
            client.cancel(list(futures))
            _wait_cancelled(client, futures)
            write_summaries(out, [summaries[c] for c in cells if c in summaries],
                            state="stopped", **about)
            raise
        finally:
            bar.close()
    seconds = time.monotonic() - t0
    ordered = [summaries[c] for c in cells]
    write_outputs(out, ordered, about={**about, "state": "done", "seconds": round(seconds, 1),
                                       "cluster_start_seconds": round(connected, 1)})
    return ordered


def _vm_slots(client) -> int:
    """The ``vm`` resources of the cluster's workers, now."""
    return int(sum(w.get("resources", {}).get("vm", 0)
                   for w in client.scheduler_info(n_workers=-1)["workers"].values()))


def _driver_identities(cells: Sequence[Cell]) -> dict[str, dict]:
    """Each kernel's :func:`lab.kernels.identity` as this machine has it,
    for the workers of a cluster to check theirs against (a kernel this
    machine does not have is not checked: each worker resolves its own)."""
    from . import kernels
    from .errors import LabError

    found = {}
    for name in dict.fromkeys(c.kernel for c in cells):
        with contextlib.suppress(LabError):
            found[name] = kernels.identity(kernels.resolve(name, fetch=False))
    return found


def _wait_cancelled(client, futures, timeout: float = STOP_TIMEOUT + 10) -> None:
    """After cancelling: wait until no worker still runs one of our tasks
    (each is stopping its run), so the cluster closes on finished tasks."""
    keys = {f.key for f in futures}
    deadline = time.monotonic() + timeout
    with contextlib.suppress(Exception):
        while time.monotonic() < deadline and _executing(client, stopping=True) & keys:
            time.sleep(0.2)


def _executing(client, *, stopping: bool = False) -> set:
    """The keys the cluster's workers are running now (with *stopping*, also
    those cancelled but not yet returned)."""
    return {k for ks in client.run(_executing_keys, stopping=stopping, on_error="ignore").values() for k in ks}


def _executing_keys(dask_worker=None, stopping: bool = False) -> list:
    """The keys a worker is executing (run on each worker by client.run)."""
    states = ("executing", "long-running", "cancelled") if stopping else (
        "executing", "long-running")
    return [ts.key for ts in dask_worker.state.tasks.values() if ts.state in states]


def _collect(future, cell: Cell, out: Path) -> dict:
    """A finished task's summary; its shipped files written under *out*
    (a worker on another machine); a task that raised (a bug, a worker
    that died) becomes an ``error`` cell."""
    if future.status != "finished":
        exc = future.exception()
        return {"scenario": cell.scenario, "kernel": cell.label, "spelling": cell.kernel,
                "verdict": "error", "status": None, "reason": f"{type(exc).__name__}: {exc}",
                "first_failure": None, "console_tail": [], "attempts": None, "report": None}
    summary = future.result()
    for rel, data in summary.pop("files", {}).items():
        path = out / rel
        if not path.exists() or path.read_bytes() != data:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    return summary


def write_outputs(out: Path, summaries: Sequence[dict], *, about: dict) -> None:
    """The dataset, sweep.json and sweep.html of finished cells."""
    from .report import build_sweep_page

    write_dataset(out, summaries)
    timelines: dict[str, dict] = {}
    if (out / "data" / "timeline").exists():
        timeline = read_dataset(out, "timeline")
        kernels = list(dict.fromkeys(s["kernel"] for s in summaries))
        for scenario, frame in timeline.groupby("scenario", sort=False):
            by_kernel = {k: g.drop(columns="scenario").reset_index(drop=True)
                         for k, g in frame.groupby("kernel", sort=False)}
            timelines[scenario] = {k: by_kernel[k] for k in kernels if k in by_kernel}
    differences = differences_by_scenario(timelines)
    write_summaries(out, summaries, **about)
    build_sweep_page(out, summaries, differences, about=about)

