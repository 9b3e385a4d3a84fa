"""lab.writeup: repro.c compiled (and run on the host against a regular file
standing in for the device), report.txt against a golden file from a real
run, and the rule that every action the scenario validator knows has a C
generator."""

from __future__ import annotations

import dataclasses
import errno
import json
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from lab import scenario as scenario_mod
from lab.actions import REGISTRY
from lab.errors import UserError
from lab.writeup import (
    C_STEPS,
    CFLAGS,
    RunData,
    read_run,
    report_txt,
    repro_c,
    trim_kernel_messages,
    write_writeup,
)

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
WRITEUP = GOLDEN / "writeup" / "fork-share"


def _known_actions() -> tuple[str, ...]:
    """The actions of the registry (what the scenario validator accepts)."""
    return tuple(REGISTRY)


def test_every_action_the_validator_knows_has_a_c_generator():
    missing = set(_known_actions()) - set(C_STEPS)
    assert not missing, f"add a C generator to lab/writeup.py C_STEPS for: {sorted(missing)}"


def _run_data(text: str, errnos: dict[int, int] | None = None,
              releases=("6.12.0-test", "7.2.0-test")) -> RunData:
    """A RunData for *text* whose steps got *errnos* (step -> errno) on every kernel."""
    sc = scenario_mod.validate_text(text, "x.toml")
    kernels = ["before", "after"][:len(releases)]
    rows = [{"kernel": k, "step": s.index, "action": s.action,
             "errno": (errnos or {}).get(s.index)} for k in kernels for s in sc.steps]
    steps = pd.DataFrame(rows).astype({"errno": "Int64"})
    meta = {"kernels": {k: {"release": r} for k, r in zip(kernels, releases)},
            "scenario": {"name": "x", "text": text}}
    empty = pd.DataFrame()
    return RunData(Path("."), meta, sc, steps, empty, empty, None, empty, "dax0.0")


ALL_ACTIONS = """
[device]
align = "4K"

[[step]]
action = "mmap"
proc = "a"
name = "m"
length = "64K"

[[step]]
action = "touch"
map = "m"
pages = ["0-3", 9]
write = true

[[step]]
action = "fork"
proc = "a"
child = "b"

[[step]]
action = "touch"
proc = "b"
map = "m"
pages = [1]

[[step]]
action = "pin"
map = "m"
name = "p"
length = "16K"

[[step]]
action = "splice"
map = "m"
name = "s"
offset = "16K"
length = "8K"

[[step]]
action = "drain"
splice = "s"

[[step]]
action = "unpin"
pin = "p"

[[step]]
action = "madvise"
map = "m"
advice = "DONTNEED"

[[step]]
action = "mprotect"
map = "m"
prot = "r"
offset = "32K"
length = "32K"

[[step]]
action = "touch"
map = "m"
pages = [12]
write = true

[[step]]
action = "snapshot"

[[step]]
action = "kmsg"
text = "devdax-lab: repro \\"quoted\\" */ text"

[[step]]
action = "exit"
proc = "b"
"""

NEWER_ACTIONS = """
[[step]]
action = "mlock"
map = "m"
length = "16K"

[[step]]
action = "munlock"
map = "m"
length = "16K"

[[step]]
action = "mlock"
map = "m"
length = "16K"
onfault = true

[[step]]
action = "mremap"
map = "m"
length = "128K"
"""

TAIL = """
[[step]]
action = "munmap"
map = "m"
"""


def _all_actions_text() -> str:
    return ALL_ACTIONS + NEWER_ACTIONS + TAIL


def _compile(src: str, tmp_path: Path, name: str = "repro") -> Path:
    gcc = shutil.which("gcc")
    assert gcc, "gcc is needed to build repro.c"
    (tmp_path / f"{name}.c").write_text(src)
    proc = subprocess.run([gcc, *CFLAGS, "-o", str(tmp_path / name), str(tmp_path / f"{name}.c")],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    return tmp_path / name


def test_repro_of_every_action_compiles_without_a_warning(tmp_path):
    run = _run_data(_all_actions_text())
    src = repro_c(run)
    assert {s.action for s in run.scenario.steps} == set(_known_actions())
    for s in run.scenario.steps:  # one comment and one table row per step
        assert f"case {s.index}: {{ /* " in src
    kmsg_case = next(line for line in src.splitlines() if "case 13:" in line)
    assert "* / text" in kmsg_case  # the comment cannot end early (gcc would say so too)
    _compile(src, tmp_path)


FILE_SCENARIO = """
[device]
align = "4K"

[[step]]
action = "mmap"
proc = "a"
name = "m"
length = "64K"

[[step]]
action = "touch"
map = "m"
pages = ["0-3"]
write = true

[[step]]
action = "fork"
proc = "a"
child = "b"

[[step]]
action = "touch"
proc = "b"
map = "m"
pages = [2, 5]
write = true

[[step]]
action = "mprotect"
map = "m"
prot = "r"

[[step]]
action = "touch"
map = "m"
pages = [0]
write = true

[[step]]
action = "splice"
proc = "b"
map = "m"
name = "s"
length = "8K"

[[step]]
action = "drain"
splice = "s"

[[step]]
action = "exit"
proc = "b"

[[step]]
action = "mlock"
map = "m"
length = "16K"

[[step]]
action = "munlock"
map = "m"
length = "16K"

[[step]]
action = "mremap"
map = "m"
length = "128K"

[[step]]
action = "touch"
map = "m"
pages = [31]

[[step]]
action = "munmap"
map = "m"
"""


def test_repro_runs_and_checks_each_step_against_the_lab(tmp_path):
    """On the host a 1 MiB file stands in for the device: the steps run in
    two processes, the write to a read-only page is EFAULT as recorded, and
    a step that does differently from the lab makes the exit status 1."""
    device = tmp_path / "dax0.0"
    device.write_bytes(b"\0" * (1 << 20))
    binary = _compile(repro_c(_run_data(FILE_SCENARIO, {6: errno.EFAULT})), tmp_path)
    res = subprocess.run([str(binary), str(device)], capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("repro: Linux ") and "expecting what the lab saw on 7.2.0-test" in lines[0]
    assert lines[1] == "step 1 (mmap) a: m = mmap 64K at device offset 0: ok; as in the lab"
    assert lines[3] == "step 3 (fork) a forks b: ok; as in the lab"
    assert lines[6].startswith("step 6 (touch) a: write m page 0: EFAULT (errno 14: ")
    assert lines[6].endswith(", SIGSEGV; as in the lab")  # the run recorded no signals
    assert lines[7] == "step 7 (splice) b: splice m pages 0-1 as s: ok; as in the lab"
    assert lines[12] == "step 12 (mremap) a: mremap m 64K -> 128K MAYMOVE: ok; as in the lab"
    assert lines[13] == "step 13 (touch) a: read m page 31: ok; as in the lab"  # the new end
    assert lines[-1] == "repro: 14 of 14 steps as in the lab run"
    assert device.read_bytes()[2 * 4096] != 0  # b's store reached the "device"

    # with the run's signals: the touch of the read-only page was a SIGSEGV
    # in the lab too; a run that recorded none makes it a difference
    run = _run_data(FILE_SCENARIO, {6: errno.EFAULT})
    signals = pd.DataFrame([{"kernel": k, "step": 6, "proc": "a", "signal": "SIGSEGV"}
                            for k in ("before", "after")])
    for frame, status in ((signals, 0), (signals.iloc[:0], 1)):
        binary = _compile(repro_c(dataclasses.replace(run, signals=frame)), tmp_path, "sig")
        res = subprocess.run([str(binary), str(device)], capture_output=True, text=True,
                             timeout=60, check=False)
        assert res.returncode == status, res.stdout
        line = res.stdout.splitlines()[6]
        assert line.startswith("step 6 (touch) a: write m page 0: EFAULT (errno 14: ")
        assert line.endswith(", SIGSEGV; as in the lab" if status == 0 else
                             ", SIGSEGV; DIFFERENT from the lab (the lab's process got no signal)")

    wrong = _compile(repro_c(_run_data(FILE_SCENARIO, {2: errno.EINVAL})), tmp_path, "wrong")
    res = subprocess.run([str(wrong), str(device)], capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 1
    assert "step 2 (touch) a: write m pages 0-3: ok; DIFFERENT from the lab (the lab got EINVAL)" \
        in res.stdout
    assert "step 6 (touch) a: write m page 0: EFAULT" in res.stdout  # not expected this time
    res = subprocess.run([str(wrong), str(tmp_path / "missing")], capture_output=True, text=True, check=False,
                         timeout=60)
    assert res.returncode == 2 and "repro: open" in res.stderr
    for bad in (["--frobnicate"], [str(device), str(device)], ["--pause"]):
        res = subprocess.run([str(wrong), *bad], capture_output=True, text=True, timeout=60,
                             check=False)
        assert res.returncode == 2 and "usage:" in res.stderr and "--pause SECONDS" in res.stderr


def test_trim_kernel_messages_on_a_captured_oops():
    lines = (GOLDEN / "console" / "after-crash.log").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if "Kernel panic" in line)
    trimmed = trim_kernel_messages(lines[start:], max_lines=40)
    assert trimmed[:2] == ["Kernel panic - not syncing: sysrq triggered crash",
                           lines[start + 1].split("] ", 1)[1].strip()]
    assert not any(t.startswith(("RAX:", "RBX:", "Code:", "Hardware name:", "[", "?", "<TASK>"))
                   for t in trimmed)
    assert trimmed[trimmed.index("Call Trace:") + 1:][:4] == [
        "dump_stack_lvl", "vpanic", "panic", "sysrq_handle_crash"]
    assert len(trim_kernel_messages(lines[start:], max_lines=5)) == 5


def test_read_run_refuses_what_is_not_a_run_directory(tmp_path):
    with pytest.raises(UserError, match="not a run directory.*meta.json"):
        read_run(tmp_path)
    from lab.cli import main

    assert main(["writeup", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()
    # a notebook session (Lab.save) has frames but no scenario to replay
    for name in ("steps.parquet", "timeline.parquet"):
        shutil.copy(WRITEUP / name, tmp_path / name)
    (tmp_path / "meta.json").write_text(json.dumps(
        {"scenario": {"name": "notebook session", "text": ""}}))
    with pytest.raises(UserError, match="holds no scenario.*--writeup"):
        read_run(tmp_path)


def test_verdict_names_the_earliest_failure_expected_and_actual():
    """A violation at step 4 and a failed expectation at step 2 (made up on
    a recorded run): the subject and verdict name the expectation first."""
    from lab.expect import EXPECTATION_COLUMNS
    from lab.timeline import Violation, df_violations

    run = read_run(WRITEUP)
    violations = df_violations([Violation(
        "refs", "after", 4, "m", 2, "one reference too many", action="touch", proc="b",
        folio_pfn=1053186, field="refcount", expected="2", actual="3")])
    expectations = pd.DataFrame([
        {"expect": 1, "kernel": "before", "step": 2, "action": "touch", "object": "m page 0",
         "field": "refcount", "wanted": "== 2", "actual": "1", "passed": False,
         "why": "the mapping takes a reference.", "message": "expect 1 FAILS"},
        {"expect": 2, "kernel": "after", "step": 2, "action": "touch", "object": "m page 0",
         "field": "refcount", "wanted": "== 2", "actual": "2", "passed": True,
         "why": "", "message": "expect 2 holds"},
    ]).astype(EXPECTATION_COLUMNS)
    text = report_txt(dataclasses.replace(run, violations=violations, expectations=expectations))
    assert text.startswith("Subject: [devdax-lab] fork-share: expect 1 fails at step 2 on\n"
                           "  6.12.117+deb12-amd64\n")
    verdict = " ".join(text.split("Verdict\n-------\n", 1)[1].split("\n\n", 1)[0].split())
    assert verdict == (
        "On before (6.12.117+deb12-amd64), expectation 1 of the scenario fails at step 2 "
        "(touch: a: write m pages 0-3). Expected: m page 0 refcount == 2; actual: 1. the "
        "mapping takes a reference. 1 more failure(s) in this run (refs), listed in "
        "report.html.")
    assert max(len(line) for line in text.splitlines()) <= 80
    only_violation = report_txt(dataclasses.replace(run, violations=violations))
    assert "invariant refs is broken at step 4 (touch: b: write m pages 2-3, 6) for page 2 of " \
        "mapping m. Expected: refcount 2; actual: 3. one reference too many. Everything " \
        "held on before" in " ".join(only_violation.split())


def test_report_txt_matches_the_golden_file_and_fits_80_columns(tmp_path):
    run = read_run(WRITEUP)
    text = report_txt(run)
    assert text == (WRITEUP / "report.txt").read_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert all(line.isascii() for line in text.splitlines())
    # the exact invariants (rmap, refs, flat) hold on both kernels here
    assert text.startswith("Subject: [devdax-lab] fork-share: no violation on")
    for heading in ("Verdict", "Steps", "Counters of the watched pages", "Kernel messages",
                    "Who changed the counters (watchpoints)", "How to reproduce"):
        assert f"\n{heading}\n{'-' * len(heading)}\n" in text
    paths = write_writeup(WRITEUP, tmp_path)
    assert [p.name for p in paths] == ["repro.c", "report.txt"]
    assert (tmp_path / "report.txt").read_text() == text
    _compile((tmp_path / "repro.c").read_text(), tmp_path)
    meta = json.loads((WRITEUP / "meta.json").read_text())
    assert meta["scenario"]["name"] == "fork-share"
