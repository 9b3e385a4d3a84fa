"""Capture the golden console logs used by tests/unit/test_console.py.

Run from the repository root after `make prepare`:

    .venv/bin/python tests/golden/capture_console.py

For each kernel it keeps the console of a normal boot (powered off by the
agent) and of a boot crashed on purpose with devdax_lab.crash=1 (sysrq c:
Oops, then panic), which must end in lab.vm.GuestCrashed.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lab import launch, vm

OUT = Path(__file__).resolve().parent / "console"


def capture(kernel: str) -> None:
    boot_log = OUT / f"{kernel}-boot.log"
    boot_log.unlink(missing_ok=True)
    launch.boot(kernel, say=lambda *_: None, console_log=boot_log).close()
    crash_log = OUT / f"{kernel}-crash.log"
    crash_log.unlink(missing_ok=True)
    try:
        launch.boot(kernel, say=lambda *_: None, cmdline_extra=["devdax_lab.crash=1"],
                    ready_timeout=60, console_log=crash_log).close()
    except vm.GuestCrashed as exc:
        print(f"{kernel}: crash captured: {str(exc).splitlines()[0]}")
    else:
        sys.exit(f"{kernel}: the crash boot became ready; expected GuestCrashed")


if __name__ == "__main__":
    OUT.mkdir(exist_ok=True)
    for name in sys.argv[1:] or ["before", "after"]:
        capture(name)
