"""The sweep's logic (lab.sweep) on recorded sweeps (tests/golden/sweep/):
cells, exit statuses, summaries read from real run directories, the
partitioned dataset, the matrix page and Lab.open of a sweep directory."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from lab import sweep
from lab import timeline as tl
from lab.errors import UserError
from lab.sweep import Cell

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "sweep"
TIMELINES = Path(__file__).resolve().parents[1] / "golden" / "timeline"
ROOT = Path(__file__).resolve().parents[2]


def _cells(name: str) -> list[dict]:
    return json.loads((GOLDEN / name / "sweep.json").read_text())["cells"]


def _log(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_cells_are_every_scenario_on_every_kernel_in_order():
    paths = sweep.find_scenarios([str(ROOT / "scenarios/fork-share.toml"),
                                  str(ROOT / "scenarios/fault-*.toml")])
    assert [p.stem for p in paths] == ["fork-share", "fault-1g", "fault-2m", "fault-4k"]
    cells = sweep.plan_cells(paths[:2], ["before", "after"])
    assert [c.key for c in cells] == ["fork-share/before", "fork-share/after",
                                      "fault-1g/before", "fault-1g/after"]
    assert sweep.cell_dir(Path("/o"), cells[0]) == Path("/o/fork-share/before")
    argv = sweep.cell_command(cells[0], Path("/o"), "py")
    assert argv[:4] == ["py", "-m", "lab.cli", "run"] and argv[-1] == "--check"
    assert argv[argv.index("--out") + 1] == "/o/fork-share/before"
    tree = Cell("fault-4k", paths[0], "~/src/linux-6.12")
    assert tree.label == "linux-6.12" and sweep.cell_dir(Path("/o"), tree).name == "linux-6.12"


def test_bad_input_is_one_line(tmp_path):
    with pytest.raises(UserError, match="matches no scenario file"):
        sweep.find_scenarios([str(tmp_path / "*.toml")])
    with pytest.raises(UserError, match="unknown kernel 'middle'.*before, after"):
        sweep.check_kernels(["before", "middle"], ["before", "after"])
    with pytest.raises(UserError, match="no such directory"):
        sweep.check_kernels([str(tmp_path / "nope/")], ["before"])
    assert sweep.check_kernels(["after", "", "after", "before"], ["before", "after"]) == [
        "after", "before"]
    a, b = tmp_path / "a" / "x.toml", tmp_path / "b" / "x.toml"
    with pytest.raises(UserError, match="two scenarios are called 'x'"):
        sweep.plan_cells([a, b], ["after"])
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="not a directory"):
        sweep.check_out_dir(tmp_path / "file")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(UserError, match="not empty and not a sweep directory"):
        sweep.check_out_dir(tmp_path / "full")
    sweep.check_out_dir(tmp_path / "new" / "dir")  # to be made: fine
    sweep.check_out_dir(GOLDEN / "holds")  # an earlier sweep: its cells run again


@pytest.mark.parametrize("status,verdict,retry", [
    (0, "holds", False), (1, "fails", False), (125, "untestable", True), (2, "error", False),
    (143, "stopped", False), (130, "stopped", False), (-9 + 256, "error", True),
    (None, "error", True), (3, "error", True)])
def test_exit_status_to_verdict_and_retry(status, verdict, retry):
    assert sweep.verdict_name(status) == verdict
    assert sweep.retry_worth(status) is retry


def test_local_slots_follow_cores_and_memory():
    slot = sweep.VM_SLOT_BYTES
    assert sweep.local_slots(2, 24 << 30) == 2
    assert sweep.local_slots(8, 3 * slot + 1) == 3
    assert sweep.local_slots(2, slot // 2) == 1
    assert sweep.local_slots(2, 0, asked=4) == 4
    with pytest.raises(UserError):
        sweep.local_slots(2, 0, asked=0)


def test_summary_of_a_cell_that_holds_counts_its_frames():
    run_dir = GOLDEN / "holds" / "fault-4k" / "after"
    cell = Cell("fault-4k", ROOT / "scenarios/fault-4k.toml", "after")
    s = sweep.summarize(cell, run_dir, 0, _log(run_dir / "cell.log"), seconds=3.5,
                        worker="tcp://127.0.0.1:1", attempts=1)
    expectations = pd.read_parquet(run_dir / "expectations.parquet")
    steps = pd.read_parquet(run_dir / "steps.parquet")
    assert s["verdict"] == "holds" and s["reason"] is None and s["console_tail"] == []
    assert s["violations"] == 0 and s["failed_expectations"] == 0
    assert s["expectations"] == len(expectations) == 7
    assert s["release"] == "7.2.13+deb14-amd64" == steps.merge(
        pd.read_parquet(run_dir / "timeline.parquet"), on="kernel")["kernel_release"].iloc[0]
    boot = json.loads((run_dir / "meta.json").read_text())["kernels"]["after"]["ready_seconds"]
    assert 0 < boot < 3.5 and s["boot_seconds"] == boot
    assert s["steps_seconds"] == round(steps["seconds"].sum(), 3)
    assert s["setup_seconds"] == round(3.5 - steps["seconds"].sum() - boot, 3)
    # the verdict line the run itself printed
    assert "every invariant and 7 expectation(s) hold" in (run_dir / "cell.log").read_text()


def test_summary_of_a_failing_cell_names_its_first_failure():
    run_dir = GOLDEN / "fails" / "fault-4k-wrong" / "after"
    cell = Cell("fault-4k-wrong", GOLDEN / "fails" / "fault-4k-wrong.toml", "after")
    s = sweep.summarize(cell, run_dir, 1, _log(run_dir / "cell.log"), seconds=3.0)
    failed = pd.read_parquet(run_dir / "expectations.parquet").query("passed == False")
    assert s["verdict"] == "fails" and s["failed_expectations"] == len(failed) == 1
    assert s["first_failure"] == failed["message"].iloc[0] == (
        "expect 4 FAILS on after at step 3 (touch): m page 8 refcount == 5, actual 2")
    assert s["reason"] == s["first_failure"] and s["console_tail"][-1].endswith("actual 2")


def test_summary_of_an_untestable_cell_has_its_reason_and_log_tail():
    run_dir = GOLDEN / "untestable" / "fault-4k" / "before"
    cell = Cell("fault-4k", ROOT / "scenarios/fault-4k.toml", "before")
    lines = _log(run_dir / "cell.log")
    s = sweep.summarize(cell, run_dir, 125, lines, seconds=1.0, attempts=2)
    assert s["verdict"] == "untestable" and s["violations"] is None and s["report"] is None
    assert s["reason"].startswith("the kernel could not be tested: QEMU exited with status -6")
    assert s["console_tail"] == lines[-sweep.TAIL_LINES:] and s["attempts"] == 2
    recorded = _cells("untestable")[0]
    assert recorded["reason"] == s["reason"] and recorded["attempts"] == 2


def test_error_line_of_a_traceback_is_its_last_line():
    lines = ["devdax-lab: fault-4k on after: booting", "Traceback (most recent call last):",
             '  File "x.py", line 1', "ZeroDivisionError: division by zero"]
    assert sweep.error_line(lines) == "ZeroDivisionError: division by zero"
    assert sweep.error_line(["devdax-lab: wrote x", "devdax-lab: verdict: every ..."]) is None


def test_meta_gets_the_worker():
    meta = json.loads((GOLDEN / "holds/fork-share/before/meta.json").read_text())
    assert meta["sweep"]["worker"].startswith("tcp://127.0.0.1:")  # as the sweep wrote it
    meta.pop("sweep")
    out = sweep.with_worker(meta, worker="tcp://127.0.0.1:9", host="h", attempts=1,
                            scheduler=None)
    assert out["sweep"] == {"worker": "tcp://127.0.0.1:9", "host": "h", "attempts": 1,
                            "scheduler": None}
    assert out["kernels"] == meta["kernels"] and "sweep" not in meta


@pytest.fixture
def sweep_dir(tmp_path):
    """The recorded 2 × 2 sweep plus its failing and untestable cells, in one directory."""
    out = tmp_path / "sweep"
    shutil.copytree(GOLDEN / "holds", out)
    shutil.copytree(GOLDEN / "fails" / "fault-4k-wrong", out / "fault-4k-wrong")
    shutil.copytree(GOLDEN / "untestable" / "fault-4k" / "before", out / "fault-4k" / "broken")
    broken = {**_cells("untestable")[0], "kernel": "broken"}
    return out, [*_cells("holds"), *_cells("fails"), broken]


def test_dataset_reads_as_one_table_with_pandas_and_dask(sweep_dir):
    import dask.dataframe as dd

    out, summaries = sweep_dir
    sweep.write_dataset(out, summaries)
    ran = [s for s in summaries if s["report"]]
    for name in sweep.DATASET_FRAMES:
        expected = pd.concat([pd.read_parquet(out / s["scenario"] / s["kernel"] / f"{name}.parquet")
                              .assign(scenario=s["scenario"]) for s in ran])
        frame = sweep.read_dataset(out, name)
        assert len(frame) == len(expected), name
        assert set(frame.columns) == set(expected.columns), name
        assert len(dd.read_parquet(str(out / "data" / name)).compute()) == len(expected), name
        for (kernel, scenario), g in frame.groupby(["kernel", "scenario"]):
            assert (out / "data" / name / f"kernel={kernel}" / f"scenario={scenario}"
                    / "part-0.parquet").exists()
    timeline = sweep.read_dataset(out, "timeline")
    one = pd.read_parquet(out / "fork-share/after/timeline.parquet")
    mine = timeline.query("scenario == 'fork-share' and kernel == 'after'")
    assert mine["refcount"].tolist() == one["refcount"].tolist()
    cells = sweep.read_dataset(out, "cells")
    assert len(cells) == len(summaries) == 6
    assert dict(zip(cells["kernel"] + "/" + cells["scenario"], cells["verdict"])) == {
        "before/fault-4k": "holds", "after/fault-4k": "holds", "before/fork-share": "holds",
        "after/fork-share": "holds", "after/fault-4k-wrong": "fails",
        "broken/fault-4k": "untestable"}


def test_differences_per_scenario_are_those_of_compare():
    by_kernel = {k: pd.read_parquet(GOLDEN / "holds/fork-share" / k / "timeline.parquet")
                 for k in ("before", "after")}
    got = sweep.differences_by_scenario({"fork-share": by_kernel, "alone": {"after": by_kernel["after"]}})
    # the recorded compare of the same scenario on the same kernels
    compare = tl.describe_differences(
        pd.read_parquet(TIMELINES / "compare-fork-share" / "diff.parquet"), ["before", "after"])
    assert got == {"fork-share": compare} and compare[0].startswith("Steps 2-5")


def test_sweep_page_and_matrix(sweep_dir):
    from lab.report import build_sweep_page

    out, summaries = sweep_dir
    matrix = sweep.verdict_matrix(summaries)
    assert list(matrix.columns) == ["before", "after", "broken"]
    assert matrix.loc["fault-4k-wrong", "after"] == "fails"
    assert pd.isna(matrix.loc["fault-4k-wrong", "before"])
    page = build_sweep_page(out, summaries, {"fork-share": ["Steps 2-5 differ"]},
                            about={"scheduler": "local"}).read_text()
    for s in summaries:
        if s["report"]:
            assert f"href='{s['report']}'" in page
    assert "verdict-fails" in page and "#ffe3e3" in page and "actual 2" in page
    assert "verdict-untestable" in page and "QEMU exited with status -6" in page
    assert "Steps 2-5 differ" in page and "<script" not in page


def test_lab_open_reads_a_sweep_directory(sweep_dir):
    from lab import Lab

    out, summaries = sweep_dir
    sweep.write_dataset(out, summaries)
    sweep.write_summaries(out, summaries, kernels=["before", "after"])
    lab = Lab.open(out)
    assert not lab.live and set(lab.timeline["scenario"]) == {"fault-4k", "fork-share",
                                                               "fault-4k-wrong"}
    assert len(lab.frame("cells")) == 6 and lab.meta["cells"][0]["verdict"] == "holds"
    assert lab.timeline["kernel"].dtype == object or str(lab.timeline["kernel"].dtype) in (
        "str", "string")
    run = Lab.open(out / "fork-share" / "after")  # a run directory opens as before
    assert set(run.timeline["kernel"]) == {"after"}


@pytest.mark.parametrize("args,message", [
    (["--scenarios", "nothing-*.toml", "--kernels", "after"], "matches no scenario file"),
    (["--scenarios", "scenarios/fault-4k.toml", "--kernels", "after,middle"],
     "unknown kernel 'middle'"),
])
def test_cli_bad_input_exits_2_and_leaves_nothing(tmp_path, args, message):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "lab.cli", "sweep", *args, "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and message in proc.stderr
    assert not out.exists()


def test_a_scheduler_without_vm_workers_is_one_line(tmp_path):
    """--scheduler of a cluster whose workers offer no 'vm' resource: exit 2,
    one line saying how to start the workers, nothing written."""
    import logging

    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tcp",
                      dashboard_address=None, silence_logs=logging.CRITICAL) as cluster:
        out = tmp_path / "out"
        proc = subprocess.run(
            [sys.executable, "-m", "lab.cli", "sweep", "--scenarios",
             str(ROOT / "scenarios/fault-4k.toml"), "--kernels", "after", "--out", str(out),
             "--scheduler", cluster.scheduler_address],
            cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "no worker has a 'vm' resource" in proc.stderr and "--resources vm=N" in proc.stderr
    assert not out.exists()


def test_the_sweep_logic_imports_no_dask():
    """lab.sweep is the pure side: Dask stays in lab.sweep_cluster."""
    code = ("import json, sys\nimport lab.sweep\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('dask', 'distributed', 'drgn', 'qemu') or m == 'lab.sweep_cluster')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    assert json.loads(out.stdout) == []


def test_a_cell_is_summarized_from_its_last_attempt_only():
    from lab.sweep_cluster import _last_attempt

    lines = ["== attempt 1 on h (w): python -m lab.cli run", "Traceback ...", "KeyError: 'x'",
             "== attempt 2 on h (w): python -m lab.cli run", "devdax-lab: the guest panicked"]
    assert _last_attempt(lines) == lines[3:]
    assert _last_attempt(["no attempt line"]) == ["no attempt line"]


def test_a_crash_of_the_run_is_an_error_worth_another_attempt():
    from lab.errors import EXIT_INTERNAL
    from lab.sweep import retry_worth, verdict_name

    assert verdict_name(EXIT_INTERNAL) == "error" and retry_worth(EXIT_INTERNAL)
    assert verdict_name(1) == "fails" and not retry_worth(1)


def test_a_bad_scenario_is_bad_input_before_a_scheduler_is_asked(tmp_path, capsys):
    from lab import cli

    bad = tmp_path / "bad.toml"
    bad.write_text("[[step]]\naction = 'nope'\n")
    status = cli.main(["sweep", "--scenarios", str(bad), "--kernels", "before", "--out",
                       str(tmp_path / "out"), "--scheduler", "tcp://127.0.0.1:9"])
    assert status == 2
    assert "bad.toml" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_partition_names_come_back_as_written(tmp_path):
    """A kernel named like a number stays a string when the dataset is read."""
    from lab.sweep import read_dataset

    for kernel in ("007", "after"):
        part = tmp_path / "data" / "steps" / f"kernel={kernel}" / "scenario=s1"
        part.mkdir(parents=True)
        pd.DataFrame({"step": [0]}).to_parquet(part / "part-0.parquet")
    frame = read_dataset(tmp_path, "steps")
    assert sorted(frame["kernel"]) == ["007", "after"]


def test_a_directory_another_live_sweep_writes_is_refused(tmp_path):
    import json
    import socket
    import subprocess

    from lab.errors import UserError
    from lab.sweep import check_out_dir

    other = subprocess.Popen(["sleep", "30"])
    try:
        about = {"state": "running", "driver": {"pid": other.pid, "host": socket.gethostname()},
                 "cells": []}
        (tmp_path / "sweep.json").write_text(json.dumps(about))
        with pytest.raises(UserError, match=f"another sweep \\(pid {other.pid}\\)"):
            check_out_dir(tmp_path)
    finally:
        other.kill()
        other.wait()
    check_out_dir(tmp_path)  # its driver is gone: the directory is a sweep's to run again
