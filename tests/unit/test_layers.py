"""The pure layers stay pure: the frames, plots, column spec and records
import nothing that starts a process or attaches drgn."""

from __future__ import annotations

import json
import subprocess
import sys

PURE = ("lab.model", "lab.columns", "lab.guest", "lab.actions", "lab.timeline", "lab.plots")


def test_pure_layers_import_neither_drgn_nor_qemu():
    code = ("import json, sys\n"
            + "".join(f"import {m}\n" for m in PURE)
            + "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
              "('drgn', '_drgn', 'qemu') or m in ('lab.vm', 'lab.session', 'lab.runner', "
              "'lab.agent', 'lab.inspect'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []
