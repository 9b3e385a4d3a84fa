"""Capture the console of scenarios/hwpoison-4k.toml on each kernel, for
tests/unit/test_signals.py (the memory-management message parser).

Run from the repository root after `make prepare`:

    .venv/bin/python tests/golden/capture_hwpoison_console.py [KERNEL ...]

Writes tests/golden/console/KERNEL-hwpoison.log: the whole serial console
of a boot that ran the scenario (lab.runner.run_scenario).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from lab.runner import run_scenario  # noqa: E402
from lab.scenario import load_scenario  # noqa: E402
from lab.session import Session  # noqa: E402

OUT = ROOT / "tests" / "golden" / "console"

if __name__ == "__main__":
    scenario = load_scenario(ROOT / "scenarios" / "hwpoison-4k.toml")
    for kernel in sys.argv[1:] or ["before", "after"]:
        with Session.boot(kernel, say=lambda *_: None) as session:
            run_scenario(session, scenario)
            session.vm.sync_console()
            text = session.vm.console_log.read_text()
        (OUT / f"{kernel}-hwpoison.log").write_text(text)
        print(f"{kernel}: {len(text.splitlines())} console lines")
