"""The reproducer reproduces: for the shipped fork-share, pin-longterm and
fault-2m scenarios, the lab runs the scenario, writes its run directory and
the write-up; repro.c is compiled on the host, sent into the same guest
through the agent and run there. The lab snapshots the watched folios before
and after: before equals the run's start, after each step (the reproducer
pauses with --pause) the run's same step, after it the run's last step,
the reproducer's steps did what the run's steps did (exit status 0, which
covers every process exit), and the kernel complained as often as in the run."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from lab import inspect
from lab.columns import COUNTERS
from lab.experiment import Experiment, frames_of, provenance, write_experiment
from lab.runner import run_scenario
from lab.scenario import load_scenario
from lab.timeline import check_invariants
from lab.writeup import CFLAGS, read_run, write_writeup

pytestmark = pytest.mark.live

ROOT = Path(__file__).resolve().parents[2]
PAGE = 4096


def _counters(session, pfns: list[int]) -> dict[int, dict]:
    with session.stopped():
        states = {pfn: inspect.folio_state(session.prog, pfn) for pfn in pfns}
    return {pfn: {c: st.counters.get(c) for c in _names()} for pfn, st in states.items()}


PAUSE = 2.0  # seconds the reproducer waits after each step (guest time: not while stopped)


def _wait_for_line(session, text: str, since: int, runner: threading.Thread,
                   timeout: float = 60) -> int:
    """Wait for a console line holding *text* among those after line number
    *since* (an earlier scenario's reproducer printed the same markers);
    the console's line count then."""
    deadline = time.monotonic() + timeout
    while True:
        seen = session.vm.lines_seen
        new = session.vm.console_tail(min(seen - since, 60)) if seen > since else []
        if any(text in line for line in new):
            return seen
        assert runner.is_alive(), f"the reproducer ended before {text!r}"
        assert time.monotonic() < deadline, f"no {text!r} on the console"
        time.sleep(0.02)


def _names() -> list[str]:
    return [c.name for c in COUNTERS]


def _recorded(timeline, kernel: str, step: int, pfns: list[int]) -> dict[int, dict]:
    rows = timeline[(timeline["kernel"] == kernel) & (timeline["step"] == step)]
    out = {}
    for pfn in pfns:
        r = rows[rows["pfn"] == pfn].iloc[0]
        out[pfn] = {c: None if pd.isna(r[c]) else int(r[c]) for c in _names()}
    return out


# hwpoison-4k last: it leaves PG_hwpoison on page 1 of the 4K device
@pytest.mark.parametrize("name", ["fork-share", "pin-longterm", "fault-2m", "hwpoison-4k"])
def test_repro_c_reproduces_the_run(session, name, tmp_path):
    gcc = shutil.which("gcc")
    assert gcc, "gcc is needed to build repro.c"
    scenario = load_scenario(ROOT / "scenarios" / f"{name}.toml")
    run = run_scenario(session, scenario)
    run_dir = tmp_path / "run"
    frames = frames_of([run])
    write_experiment(Experiment(scenario, [run], frames, [],
                                check_invariants(frames["timeline"], frames["steps"]),
                                provenance(scenario, [run], [session.choice])), run_dir)
    c_file, txt = write_writeup(run_dir, tmp_path / "writeup")
    assert max(len(line) for line in txt.read_text().splitlines()) <= 80
    binary = tmp_path / "repro"
    subprocess.run([gcc, *CFLAGS, "-o", str(binary), str(c_file)], check=True)

    data = read_run(run_dir)
    kernel = session.kernel.name
    device = session.vm.device(scenario.device)
    pfns = sorted({device["start"] // PAGE + scenario.device_page(w.map, w.page)
                   for w in scenario.watch_list})
    last = int(data.steps["step"].max())
    complaints_before = len(session.vm.complaints)

    before = _counters(session, pfns)
    assert before == _recorded(data.timeline, kernel, 0, pfns)
    # With --pause the reproducer marks the kernel log after each step and
    # waits: the lab snapshots there (the agent is busy running it, drgn
    # and QMP are not), and each step's counters must be the run's.
    done: dict = {}
    runner = threading.Thread(target=lambda: done.setdefault("res", session.agent.run_binary(
        binary, [f"/dev/{device['name']}", "--pause", str(PAUSE)], timeout=120)))
    since = session.vm.lines_seen
    runner.start()
    try:
        for step in scenario.steps:
            since = _wait_for_line(session, f"repro: step {step.index} done", since, runner)
            assert _counters(session, pfns) == _recorded(data.timeline, kernel, step.index, pfns), \
                f"after step {step.index} ({step.action})"
    finally:
        runner.join(timeout=180)
    res = done["res"]
    out = res.stdout.decode()
    assert res.status == 0, out + res.stderr.decode()
    assert out.splitlines()[-1] == (f"repro: {len(scenario.steps)} of {len(scenario.steps)} "
                                    "steps as in the lab run")
    if name == "hwpoison-4k":  # memory_failure() signals the caller, as in the lab
        assert ("step 5 (madvise) a: madvise m page 1 MADV_HWPOISON: ok, SIGBUS (BUS_MCEERR_AR) "
                "addr_lsb 12; as in the lab") in out.splitlines(), out
    session.vm.sync_console()
    after = _counters(session, pfns)
    assert after == _recorded(data.timeline, kernel, last, pfns)
    recorded_complaints = data.complaints[data.complaints["kernel"] == kernel]
    assert len(session.vm.complaints) - complaints_before == len(recorded_complaints)


def test_run_with_writeup_writes_both_files(tmp_path, capsys):
    """`devdax-lab run ... --writeup`: the run directory and its write-up."""
    from lab.cli import main

    out = tmp_path / "run"
    assert main(["run", str(ROOT / "scenarios" / "fault-4k.toml"), "--kernel", "after",
                 "--out", str(out), "--writeup"]) == 0
    assert f"wrote {out}/repro.c and {out}/report.txt" in capsys.readouterr().out
    report = (out / "report.txt").read_text()
    assert report.startswith("Subject: [devdax-lab] fault-4k: ")
    assert "devdax-lab run" in report and "--kernel after --out DIR" in report
    subprocess.run(["gcc", *CFLAGS, "-o", str(tmp_path / "repro"), str(out / "repro.c")],
                   check=True)
