"""Console parsing on logs captured from real boots of both kernels
(tests/golden/capture_console.py made them)."""

from pathlib import Path

import pytest

from lab.console import complaints, find_complaint, strip_console_prefix

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "console"


@pytest.mark.parametrize("kernel", ["before", "after"])
def test_normal_boot_has_no_fatal_complaint(kernel):
    lines = (GOLDEN / f"{kernel}-boot.log").read_text().splitlines()
    assert any(line.startswith("devdax-lab: modules loaded") for line in lines)
    assert not [c for c in complaints(lines) if c.fatal]


@pytest.mark.parametrize("kernel", ["before", "after"])
def test_crash_log_ends_in_a_fatal_panic(kernel):
    found = complaints((GOLDEN / f"{kernel}-crash.log").read_text().splitlines())
    assert found and found[0].fatal and found[0].kind == "panic"
    assert "sysrq triggered crash" in found[0].text


def test_prefix_and_kinds():
    assert strip_console_prefix("[   12.345678] WARNING: CPU: 0 PID: 1 at mm/x.c:1\r\n") == \
        "WARNING: CPU: 0 PID: 1 at mm/x.c:1"
    assert find_complaint("[ 1.0] BUG: Bad page state in process a  pfn:101200").kind == "bug"
    assert find_complaint("[ 1.0] kernel BUG at mm/memremap.c:42!").kind == "bug"
    assert find_complaint("[ 1.0] Bad rss-counter state mm:0000 type:MM_FILEPAGES val:1").kind == "bad"
    assert find_complaint("devdax-lab: modules loaded (uptime 2.1)") is None
    oops = find_complaint("[    3.1] Oops: general protection fault, probably for non-canonical address")
    assert oops.kind == "oops" and oops.fatal
