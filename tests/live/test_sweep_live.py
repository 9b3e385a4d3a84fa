"""devdax-lab sweep on a local Dask cluster, live (TCG): one shared 3
scenarios × 2 kernels sweep (fault-4k, fork-share and a fault-4k whose
expectation is wrong on purpose) checked from several sides; an untestable
cell; a cancelled Dask task and a stopped sweep, each of which must stop its
runs' VMs and remove their run directories. No process is left behind, even
when a test fails: every test stops what it started, by PID."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest

from lab import vm
from lab.procs import pid_alive, wait_gone
from lab.sweep import CELL_LOG

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dask_processes import processes_with  # noqa: E402

pytestmark = pytest.mark.live

ROOT = Path(__file__).resolve().parents[2]
KERNELS = ["before", "after"]
STOP_LINE = "devdax-lab: stopped by SIGTERM: what it had started is stopped and removed"


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process now."""
    out = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        out[int(proc.name)] = (ppid, cmd)
    return out


def _descendants(pid: int) -> set[int]:
    procs = _processes()
    found, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        for child, (ppid, _) in procs.items():
            if ppid == parent and child not in found:
                found.add(child)
                todo.append(child)
    return found


def _runs_into(out: Path) -> dict[int, str]:
    """The `lab.cli run` processes writing under *out*: pid -> command line."""
    return {pid: cmd for pid, (_, cmd) in _processes().items()
            if " lab.cli run " in cmd and f"--out {out}/" in cmd}


def _qemus_of(pids) -> dict[int, Path]:
    """QEMU processes under *pids* and their run directories."""
    import re

    found = {}
    for pid in pids:
        for child in _descendants(pid):
            cmd = _processes().get(child, (0, ""))[1]
            m = re.search(rf"({re.escape(str(vm.run_parent()))}/devdax-lab-run-[^/ ,]+)", cmd)
            if "qemu-system" in cmd and m:
                found[child] = Path(m.group(1))
    return found


def _wait_for(what, predicate, timeout: float = 180.0, poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


def _marked() -> tuple[str, dict]:
    """A marker for the environment of what a test starts (inherited by
    every child: Dask workers, cell runs, QEMU), and that environment: PIDs
    are reused quickly on a busy machine, a marker is not."""
    value = uuid.uuid4().hex
    return f"DEVDAX_LAB_TEST_MARK={value}", {**os.environ, "DEVDAX_LAB_TEST_MARK": value}


def _owned_run_dirs(marker: str) -> set[Path]:
    """Run directories whose owner (a `run`) carries *marker*."""
    owners = {pid for pid, _ in processes_with(marker)}
    found = set()
    for d in vm.run_parent().glob(vm.RUN_PREFIX + "*"):
        try:
            if int((d / "owner.pid").read_text()) in owners:
                found.add(d)
        except (OSError, ValueError):
            continue
    return found


def _kill_all(pids) -> None:
    """Teardown of last resort: SIGKILL whatever is still running, by PID."""
    for pid in pids:
        if pid_alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _long_scenario(directory: Path, steps: int = 150) -> Path:
    """A scenario that keeps its VM busy for several seconds (read faults of
    one page, again and again), so that a test can stop it midway."""
    text = ['title = "many read faults"', "[device]", 'align = "4K"', "",
            "[[step]]", 'action = "mmap"', 'proc = "a"', 'name = "m"', 'length = "64K"']
    for i in range(steps):
        text += ["", "[[step]]", 'action = "touch"', 'map = "m"', f"pages = [{i % 16}]"]
    path = directory / "many-faults.toml"
    path.write_text("\n".join(text) + "\n")
    return path


def _wrong_scenario(directory: Path) -> Path:
    """fault-4k with one expectation wrong on purpose (the read fault takes
    one reference: refcount 2, not 5)."""
    text = (ROOT / "scenarios" / "fault-4k.toml").read_text()
    wrong = text.replace('field = "refcount"\nequals = 2\n', 'field = "refcount"\nequals = 5\n')
    assert wrong != text
    path = directory / "fault-4k-wrong.toml"
    path.write_text(wrong)
    return path


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """One sweep shared by the tests below: its directory, its command's
    output, and the processes alive under it (none, once it is over)."""
    base = tmp_path_factory.mktemp("sweep")
    wrong = _wrong_scenario(base)
    out = base / "out"
    marker, env = _marked()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lab.cli", "sweep", "--scenarios",
         str(ROOT / "scenarios/fault-4k.toml"), str(ROOT / "scenarios/fork-share.toml"),
         str(wrong), "--kernels", ",".join(KERNELS), "--out", str(out)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, env=env)
    run_dirs: set[Path] = set()
    try:
        while proc.poll() is None:
            run_dirs |= _owned_run_dirs(marker)
            time.sleep(0.1)
        stdout, stderr = proc.communicate()
        yield {"out": out, "status": proc.returncode, "stdout": stdout, "stderr": stderr,
               "left": processes_with(marker), "run_dirs": run_dirs}
    finally:
        _kill_all([proc.pid, *(pid for pid, _ in processes_with(marker))])
        proc.wait()


def test_sweep_runs_every_cell_and_leaves_nothing_running(swept):
    assert swept["status"] == 0, swept["stderr"]
    assert swept["left"] == [], swept["left"]
    assert swept["run_dirs"], "no run directory of the sweep was ever seen"
    assert not [d for d in swept["run_dirs"] if d.exists()]
    cells = json.loads((swept["out"] / "sweep.json").read_text())["cells"]
    assert [(c["scenario"], c["kernel"]) for c in cells] == [
        (s, k) for s in ("fault-4k", "fork-share", "fault-4k-wrong") for k in KERNELS]


def test_verdicts_match_the_scenarios_expectations(swept):
    cells = {(c["scenario"], c["kernel"]): c
             for c in json.loads((swept["out"] / "sweep.json").read_text())["cells"]}
    for key, cell in cells.items():
        # the wrong expectation names `after`: on before every expectation holds
        expected = "fails" if key == ("fault-4k-wrong", "after") else "holds"
        assert cell["verdict"] == expected, (key, cell)
        expectations = pd.read_parquet(swept["out"] / key[0] / key[1] / "expectations.parquet")
        assert cell["failed_expectations"] == int((~expectations["passed"].astype(bool)).sum())
        assert cell["release"].startswith("6.12" if key[1] == "before" else "7.2")
    failing = cells[("fault-4k-wrong", "after")]
    assert failing["first_failure"] == (
        "expect 4 FAILS on after at step 3 (touch): m page 8 refcount == 5, actual 2")
    assert failing["status"] == 1 and failing["attempts"] == 1  # a verdict: never retried
    import re

    assert re.search(r"^fault-4k-wrong/after +fails +expect 4 FAILS", swept["stdout"], re.MULTILINE)


def test_dataset_reads_as_one_table_with_pandas_and_dask(swept):
    import dask.dataframe as dd

    out = swept["out"]
    for name in ("timeline", "steps", "expectations", "violations", "cells"):
        frame = pd.read_parquet(out / "data" / name)
        dask_frame = dd.read_parquet(str(out / "data" / name)).compute()
        assert len(frame) == len(dask_frame)
        if name == "cells":
            assert len(frame) == 6
            continue
        per_cell = sum(len(pd.read_parquet(p / f"{name}.parquet"))
                       for p in out.glob("*/*") if (p / "meta.json").exists())
        assert len(frame) == per_cell, name
    timeline = pd.read_parquet(out / "data" / "timeline")
    assert set(timeline["kernel"].astype(str)) == set(KERNELS)
    assert set(timeline["scenario"].astype(str)) == {"fault-4k", "fork-share", "fault-4k-wrong"}


def test_sweep_page_links_existing_reports_and_meta_names_the_worker(swept):
    import re

    out = swept["out"]
    page = (out / "sweep.html").read_text()
    links = re.findall(r"href='([^']+)'", page)
    assert len(links) == 6 and all((out / link).is_file() for link in links)
    assert "verdict-fails" in page and "refcount == 5, actual 2" in page
    assert "What differs between the kernels" in page and "Steps 2-5 (touch, fork, exit)" in page
    workers = set()
    for meta_path in out.glob("*/*/meta.json"):
        meta = json.loads(meta_path.read_text())
        assert meta["sweep"]["worker"].startswith("tcp://127.0.0.1:"), meta_path
        assert meta["qemu"] and meta["drgn"] and meta["kernels"]
        workers.add(meta["sweep"]["worker"])
    assert 1 <= len(workers) <= (os.cpu_count() or 1)


def test_lab_open_reads_the_sweep(swept):
    from lab import Lab

    lab = Lab.open(swept["out"])
    assert len(lab.frame("cells")) == 6 and len(lab.meta["cells"]) == 6
    assert set(lab.timeline["scenario"]) == {"fault-4k", "fork-share", "fault-4k-wrong"}


def test_a_cell_that_cannot_boot_is_recorded_untestable_with_its_reason(tmp_path):
    """A kernel tree whose bzImage and vmlinux are not kernels: QEMU fails,
    the cell is untestable (125), retried once, and the sweep goes on."""
    tree = tmp_path / "not-a-kernel"
    (tree / "arch/x86/boot").mkdir(parents=True)
    (tree / "scripts/kconfig").mkdir(parents=True)
    for name in ("Makefile", "Kconfig"):
        (tree / name).write_text("")
    for name in ("arch/x86/boot/bzImage", "vmlinux"):
        (tree / name).write_bytes(b"not a kernel\n" * 4096)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "lab.cli", "sweep", "--scenarios",
         str(ROOT / "scenarios/fault-4k.toml"), "--kernels", str(tree), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    [cell] = json.loads((out / "sweep.json").read_text())["cells"]
    assert cell["verdict"] == "untestable" and cell["status"] == 125 and cell["attempts"] == 2
    assert cell["reason"].startswith("the kernel could not be tested: QEMU exited")
    assert cell["console_tail"] and cell["report"] is None
    assert "untestable" in (out / "sweep.html").read_text()


@contextlib.contextmanager
def _a_cell_running(tmp_path, monkeypatch, silence: int):
    """A long cell submitted to a one-worker LocalCluster, its run's steps
    under way: yields (client, its future, the cell's directory, the run's
    pid, its QEMU's pid, its run directory, the environment marker). Any
    run still alive at the end is killed; the cluster is closed."""
    from distributed import Client, LocalCluster

    from lab.sweep import Cell
    from lab.sweep_cluster import run_cell

    out = tmp_path / "out"
    cell = Cell("many-faults", _long_scenario(tmp_path), "after")
    marker, env = _marked()
    monkeypatch.setenv("DEVDAX_LAB_TEST_MARK", env["DEVDAX_LAB_TEST_MARK"])  # for the workers
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, resources={"vm": 1},
                      dashboard_address=None, memory_limit=0,
                      silence_logs=silence) as cluster, Client(cluster) as client:
        try:
            future = client.submit(run_cell, cell, str(out), resources={"vm": 1}, pure=False)
            runs = _wait_for("the cell's run", lambda: _runs_into(out))
            _wait_for("steps running", lambda: "many-faults on after:   0%" in (
                out / "many-faults/after" / CELL_LOG).read_text(), timeout=120)
            [(qemu, run_dir)] = _wait_for("its QEMU", lambda: _qemus_of(runs)).items()
            [run] = runs
            yield client, future, out / "many-faults/after", run, qemu, run_dir, marker
        finally:
            _kill_all(pid for pid, cmd in processes_with(marker) if "lab.cli run" in cmd)


def test_a_cancelled_task_stops_its_vm_and_removes_its_run_dir(tmp_path, monkeypatch):
    with _a_cell_running(tmp_path, monkeypatch, logging.ERROR) as (
            client, future, cell_dir, run, qemu, run_dir, marker):
        assert pid_alive(qemu) and run_dir.exists()
        client.cancel(future)
        assert wait_gone(qemu, 60), "QEMU still runs after the task was cancelled"
        assert wait_gone(run, 60), "the run still runs after the task was cancelled"
        assert not run_dir.exists()
        log = (cell_dir / CELL_LOG).read_text()
        said = [line for line in log.splitlines() if line.startswith("devdax-lab: ")]
        assert said[-1] == STOP_LINE, log[-2000:]
    # the cluster is closed: nothing its workers started runs (the multiprocessing
    # resource tracker is this pytest process's own, started with the first worker)
    left = [p for p in processes_with(marker) if "multiprocessing.resource_tracker" not in p[1]]
    assert not left, left


def test_a_killed_worker_takes_its_run_and_vm_with_it(tmp_path, monkeypatch):
    """SIGKILL of the Dask worker process running a cell: the run gets
    SIGTERM (its pdeathsig), stops its VM and removes its run directory."""
    with _a_cell_running(tmp_path, monkeypatch, logging.CRITICAL) as (
            client, future, cell_dir, run, qemu, run_dir, _):
        worker = _processes()[run][0]  # setpriv execs the run: its parent is the worker
        assert "lab.cli run" not in _processes()[worker][1]
        os.kill(worker, signal.SIGKILL)
        assert wait_gone(run, 60), "the run outlived its worker"
        assert wait_gone(qemu, 30) and not run_dir.exists()
        log = (cell_dir / CELL_LOG).read_text()
        assert STOP_LINE in log, log[-2000:]
        client.cancel(future)  # Dask would run the cell again on the new worker


@pytest.mark.parametrize("how", ["SIGTERM", "Ctrl-C"])
def test_stopping_the_sweep_stops_every_run_and_the_cluster(tmp_path, how):
    scenario = _long_scenario(tmp_path)
    out = tmp_path / "out"
    marker, env = _marked()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lab.cli", "sweep", "--scenarios", str(scenario), "--kernels",
         ",".join(KERNELS), "--out", str(out), "--workers", "2"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, env=env)
    try:
        runs = _wait_for("two runs", lambda: len(_runs_into(out)) == 2 and _runs_into(out))
        _wait_for("steps running on both", lambda: all(
            "many-faults on " in p.read_text() and "0%" in p.read_text()
            for p in (out / "many-faults" / k / "cell.log" for k in KERNELS)), timeout=120)
        qemus = _wait_for("their QEMUs", lambda: len(_qemus_of(runs)) == 2 and _qemus_of(runs))
        seen = {pid for pid, _ in processes_with(marker)}
        assert len(seen) >= 8  # the sweep, 2 nannies, 2 workers, 2 runs, 2 QEMUs (setpriv execs)
        if how == "SIGTERM":
            proc.send_signal(signal.SIGTERM)
        else:  # a terminal's Ctrl-C: SIGINT to the whole foreground process group
            os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == (143 if how == "SIGTERM" else 130), stderr
        last = stderr.strip().splitlines()[-1]
        assert last == (STOP_LINE if how == "SIGTERM" else "devdax-lab: interrupted"), stderr
        _wait_for("every process of the sweep to end", lambda: not processes_with(marker),
                  timeout=30)
        assert not any(d.exists() for d in qemus.values())
        from lab.sweep import check_out_dir

        assert json.loads((out / "sweep.json").read_text())["state"] == "stopped"
        check_out_dir(out)  # the stopped sweep's DIR can be swept again
        for pid in runs:
            log = (out / "many-faults" / ("before" if "--kernel before" in runs[pid] else "after")
                   / "cell.log").read_text()
            assert ("stopped by SIG" in log or "interrupted" in log), log[-2000:]
    finally:
        _kill_all([proc.pid, *(pid for pid, _ in processes_with(marker))])
        proc.wait()
