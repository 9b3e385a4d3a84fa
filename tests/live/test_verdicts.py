"""Verdicts from the command line and pytest: every shipped scenario holds on
both kernels (the pytest plugin, as CI runs it), an expectation wrong on
purpose exits 1 with one line, a kernel that cannot be tested exits 125."""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytestmark = pytest.mark.live

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = sorted((ROOT / "scenarios").glob("*.toml"))


def _cli(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "lab.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, check=False)


def test_every_shipped_scenario_holds_on_both_kernels_through_the_pytest_plugin(tmp_path):
    junit = tmp_path / "junit.xml"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",  # the plugin: entry point
         "--devdax-kernel", "before,after", "--devdax-out", str(tmp_path / "runs"),
         f"--junitxml={junit}", "--rootdir", str(tmp_path), "-o", "addopts=",
         *map(str, SCENARIOS)],
        capture_output=True, text=True, timeout=3000, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    cases = ET.parse(junit).getroot().iter("testcase")
    names = sorted(c.get("name") for c in cases)
    assert names == sorted(f"{s.name}::{k}" for s in SCENARIOS for k in ("after", "before")) \
        or len(names) == 2 * len(SCENARIOS), names
    # each item wrote its run directory, with the verdict's frames
    for s in SCENARIOS:
        for k in ("before", "after"):
            run = tmp_path / "runs" / s.stem / k
            assert (run / "violations.parquet").exists() and (run / "expectations.parquet").exists()


def test_check_wrong_on_purpose_exits_1_with_one_line(tmp_path):
    text = (ROOT / "scenarios" / "fault-4k.toml").read_text()
    wrong = tmp_path / "fault-4k-wrong.toml"
    wrong.write_text(text + '\n[[expect]]\nstep = 2\nkernel = "after"\nmap = "m"\npage = 0\n'
                     'field = "refcount"\nequals = 1\nwhy = "wrong on purpose"\n')
    proc = _cli("check", str(wrong), "--kernel", "after")
    assert proc.returncode == 1, proc.stderr
    err = [line for line in proc.stderr.splitlines() if line.startswith("devdax-lab:")]
    assert len(err) == 1
    assert "FAILS on after at step 2 (touch): m page 0 refcount == 1, actual 2" in err[0]
    ok = _cli("check", str(ROOT / "scenarios" / "fault-4k.toml"), "--kernel", "after",
              "--out", str(tmp_path / "ok"))
    assert ok.returncode == 0, ok.stderr
    assert "verdict: every invariant and" in ok.stdout
    assert (tmp_path / "ok" / "expectations.parquet").exists()


def test_a_kernel_that_cannot_be_tested_exits_125(tmp_path):
    tree = tmp_path / "tree"  # a "built tree" whose kernel is not a kernel
    (tree / "arch" / "x86" / "boot").mkdir(parents=True)
    (tree / "arch" / "x86" / "boot" / "bzImage").write_bytes(b"not a kernel" * 100)
    (tree / "vmlinux").write_bytes(b"\x7fELF not really" * 100)
    proc = _cli("check", str(ROOT / "scenarios" / "fault-4k.toml"), "--kernel", str(tree),
                timeout=300)
    assert proc.returncode == 125, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("devdax-lab:")]
    assert len(lines) == 1, proc.stderr
    assert "could not be tested: QEMU exited" in lines[0]
    assert "Traceback" not in proc.stderr
