"""Capture the golden run records and the timeline made from them, for
tests/unit/test_timeline_records.py.

Run from the repository root after `make prepare`:

    .venv/bin/python tests/golden/capture_records.py [SCENARIO ...]

Runs the scenarios of NAMES (or those named; hwpoison-4k's records carry
signals, kernel messages and the processes' RSS) on `before` and `after`
(lab.experiment.run_experiment), writes each run's records as JSON
(tests/golden/records/SCENARIO.json) and df_timeline of them as parquet
(tests/golden/records/SCENARIO.timeline.parquet).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "golden"))

from records import dump  # noqa: E402

from lab import timeline as tl  # noqa: E402
from lab.experiment import run_experiment  # noqa: E402

OUT = ROOT / "tests" / "golden" / "records"
NAMES = ("fork-share", "fault-2m", "pin-longterm", "splice-transient", "partial-munmap-2m")

if __name__ == "__main__":
    OUT.mkdir(exist_ok=True)
    for name in sys.argv[1:] or NAMES:
        exp = run_experiment(ROOT / "scenarios" / f"{name}.toml", ["before", "after"],
                             say=lambda *_: None)
        dump(exp.runs, OUT / f"{name}.json")
        tl.df_timeline(exp.runs).to_parquet(OUT / f"{name}.timeline.parquet")
        print(f"{name}: {sum(len(s.pages) for r in exp.runs for s in r.steps)} page records")
