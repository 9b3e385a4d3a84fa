"""The CLI's contract for bad input: exit 2, one line, no traceback, nothing started."""

import subprocess
import sys


def run(*args):
    return subprocess.run([sys.executable, "-m", "lab.cli", *args], capture_output=True, text=True,
                          timeout=60)


def test_unknown_kernel_lists_the_known_ones():
    proc = run("boot", "--kernel", "nosuch")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "before" in proc.stderr and "after" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_kernels_listing_is_offline_and_names_both():
    proc = run("kernels")
    assert proc.returncode == 0, proc.stderr
    names = [line.split()[0] for line in proc.stdout.splitlines()[1:]]
    assert {"before", "after"} <= set(names)


def test_doctor_reports_each_check():
    proc = run("doctor")
    assert "qemu-system-x86_64" in proc.stdout and "accelerator" in proc.stdout
    assert proc.returncode in (0, 2)
