"""Live: the command notebook 04 documents for a write-up without a notebook
runs as written (read from the notebook, so the two cannot drift), with only
its --out moved into the temporary directory."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

from lab.cli import main

pytestmark = pytest.mark.live

ROOT = Path(__file__).resolve().parents[2]


def _documented_command(notebook: Path) -> list[str]:
    """The ``devdax-lab ...`` command under "The same files without a
    notebook:" (comment lines, backslash continuations joined)."""
    text = notebook.read_text()
    tail = text.split("The same files without a notebook:", 1)[1]
    lines = [line.lstrip("#").strip() for line in tail.splitlines()[1:]]
    start = next(i for i, line in enumerate(lines) if line.startswith("devdax-lab "))
    command = ""
    for line in lines[start:]:
        command += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            break
    return shlex.split(command)


def test_notebook_04_documented_command(tmp_path, capsys, monkeypatch):
    argv = _documented_command(ROOT / "notebooks" / "04-bug-writeup.py")
    assert argv[:2] == ["devdax-lab", "compare"] and "--writeup" in argv
    out = tmp_path / "pin"
    argv[argv.index("--out") + 1] = str(out)
    monkeypatch.chdir(ROOT)  # scenario paths are relative to the checkout, as documented
    assert main(argv[1:]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}/repro.c and {out}/report.txt" in printed
    for name in ("timeline.parquet", "report.html", "meta.json", "repro.c", "report.txt"):
        assert (out / name).is_file(), name
    report = (out / "report.txt").read_text()
    assert re.match(r"Subject: \[devdax-lab\] pin-longterm", report), report[:200]
    assert os.path.getsize(out / "report.html") > 10_000
