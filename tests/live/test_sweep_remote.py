"""A sweep on an existing cluster, set up as docs/sweeps.md tells a user to
set one up across machines, here on 127.0.0.1: a `dask scheduler` and two
`dask worker --resources vm=1` processes, then `devdax-lab sweep
--scheduler ADDRESS` of 2 scenarios x 2 kernels. Both workers take cells,
every cell gives its verdict, the outputs are those of a local sweep, and
when the processes are stopped nothing they started is left (no worker,
no cell run, no QEMU, no run directory)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from lab.vm import run_parent

sys.path.insert(0, str(Path(__file__).parent))
from dask_processes import DaskProcesses  # noqa: E402

pytestmark = pytest.mark.live

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = ["fault-4k", "fork-share"]
KERNELS = ["before", "after"]


def _run_dirs() -> set[Path]:
    parent = run_parent()
    return set(parent.glob("devdax-lab-run-*")) if parent.exists() else set()


def _not_anothers(run_dirs: set[Path], marker: str) -> set[Path]:
    """The run directories of *run_dirs* that no live process outside this
    test owns (runs of other users of the machine are not this test's)."""
    mine = set()
    for d in run_dirs:
        try:
            owner = int((d / "owner.pid").read_text())
            foreign = marker.encode() not in Path(f"/proc/{owner}/environ").read_bytes()
        except (OSError, ValueError):
            foreign = False  # its owner is gone: left behind
        if d.exists() and not foreign:
            mine.add(d)
    return mine


@pytest.fixture(scope="module")
def remote_sweep(tmp_path_factory):
    """The sweep's output directory, its exit status and output, the two
    workers' addresses, and what the stop had to kill."""
    work = tmp_path_factory.mktemp("cluster")
    before = _run_dirs()
    cluster = DaskProcesses(work)
    result: dict = {}
    try:
        address = cluster.start_scheduler()
        cluster.start_worker("lab-w1")
        cluster.start_worker("lab-w2")
        cluster.wait_for_workers(address, 2)
        out = work / "sweep"
        proc = subprocess.run(
            [sys.executable, "-m", "lab.cli", "sweep", "--scenarios",
             *[str(ROOT / "scenarios" / f"{s}.toml") for s in SCENARIOS],
             "--kernels", ",".join(KERNELS), "--out", str(out), "--scheduler", address],
            cwd=ROOT, capture_output=True, text=True, timeout=1800, env=cluster.env)
        result.update(out=out, proc=proc, address=address,
                      logs={n: cluster.log(n) for n in ("scheduler", "lab-w1", "lab-w2")})
    finally:
        result["killed"] = cluster.stop()
        result["leftovers"] = cluster.leftovers()
        result["new_run_dirs"] = _not_anothers(_run_dirs() - before, cluster.marker)
    yield result


def test_the_sweep_runs_every_cell_on_the_cluster(remote_sweep):
    proc = remote_sweep["proc"]
    assert proc.returncode == 0, proc.stderr[-3000:] + "\n" + remote_sweep["logs"]["lab-w1"]
    summaries = json.loads((remote_sweep["out"] / "sweep.json").read_text())["cells"]
    assert sorted((s["scenario"], s["kernel"]) for s in summaries) == sorted(
        (s, k) for s in SCENARIOS for k in KERNELS)
    assert {s["verdict"] for s in summaries} == {"holds"}, summaries
    assert f"({remote_sweep['address']})" in proc.stderr  # says where the cells ran


def test_both_workers_took_cells_and_each_cell_says_which(remote_sweep):
    out = remote_sweep["out"]
    workers = set()
    for scenario in SCENARIOS:
        for kernel in KERNELS:
            meta = json.loads((out / scenario / kernel / "meta.json").read_text())
            assert meta["sweep"]["scheduler"] == remote_sweep["address"]
            workers.add(meta["sweep"]["worker"])
            assert meta["qemu"] and meta["drgn"]
            assert (out / scenario / kernel / "report.html").stat().st_size > 10_000
    assert len(workers) == 2 and all(w.startswith("tcp://127.0.0.1:") for w in workers)


def test_the_dataset_is_one_table(remote_sweep):
    timeline = pd.read_parquet(remote_sweep["out"] / "data" / "timeline")
    assert set(timeline["kernel"].astype(str)) == set(KERNELS)
    assert set(timeline["scenario"].astype(str)) == set(SCENARIOS)


def test_nothing_is_left_behind(remote_sweep):
    assert remote_sweep["killed"] == [], "stopped only by SIGKILL"
    assert remote_sweep["leftovers"] == []
    assert remote_sweep["new_run_dirs"] == set()


def test_cells_ran_in_the_workers_scratch_and_came_back_with_their_files(remote_sweep):
    """The workers wrote each run elsewhere (what a worker on another machine
    does) and the sweep put the returned files under --out."""
    out = remote_sweep["out"]
    for scenario in SCENARIOS:
        for kernel in KERNELS:
            log = (out / scenario / kernel / "cell.log").read_text()
            assert "devdax-lab-cell-" in log and str(out) not in log
            # the scenario went with the task: the run read the worker's copy
            assert f".scenario/{scenario}.toml" in log and str(ROOT / "scenarios") not in log
    assert not list(Path(tempfile.gettempdir()).glob("devdax-lab-cell-*/" + SCENARIOS[0]))


def test_a_worker_whose_kernel_is_another_build_records_why_and_runs_nothing(tmp_path):
    """The driver's identity of `before` with another package version: the
    cell is an error naming the difference, and no run was started."""
    from lab import kernels
    from lab.sweep import Cell
    from lab.sweep_cluster import run_cell

    wanted = kernels.identity(kernels.resolve("before", fetch=False))
    package = next(iter(wanted["packages"]))
    wanted = {**wanted, "packages": {**wanted["packages"], package: "0.0-other"}}
    cell = Cell(scenario="fault-4k", path=ROOT / "scenarios" / "fault-4k.toml", kernel="before")
    summary = run_cell(cell, tmp_path, kernel_identity=wanted)
    assert summary["verdict"] == "error" and summary["attempts"] == 0
    assert summary["reason"].startswith("kernel 'before' here is not the driver's (packages:")
    assert "devdax-lab fetch --force before" in summary["reason"]
    assert not (tmp_path / "fault-4k" / "before" / "meta.json").exists()
