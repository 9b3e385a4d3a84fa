"""Capture the golden files of lab.events from real guests (run from the
repository root with the venv):

    .venv/bin/python tests/golden/capture_gdb.py

- tests/golden/gdb/exchange-after.json: every byte between GdbRemote and
  QEMU's gdbstub (QEMU 7.2, TCG) while the `after` kernel write-faults one
  4K device-dax page with write watchpoints on its folio's _refcount and
  _mapcount, then is interrupted and detached; with the results the client
  parsed (tests/unit/test_rsp.py replays it).
- tests/golden/events/fork-share.json: the events, accounting rows and
  steps of `fork-share` run with stack-unwinding watches on `before` and
  `after` (tests/unit/test_events_frames.py builds the frames from it).
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from lab import inspect  # noqa: E402
from lab.events.rsp import GdbRemote  # noqa: E402
from lab.experiment import run_experiment  # noqa: E402
from lab.session import Session  # noqa: E402

OUT = Path(__file__).resolve().parent


def capture_exchange() -> None:
    with Session.boot("after", events=True) as s:
        dev = s.vm.device(4096)
        pfn = dev["start"] >> 12
        _, _, counters = inspect.folio_counters(s.prog, pfn)
        rsp = GdbRemote.connect(s.vm.spec.run_dir / "gdb.sock", record=True)
        results: dict = {"counters": counters, "start": None, "hits": []}
        results["start"] = vars(rsp.start())
        for _, address, size in counters:
            rsp.insert_watchpoint(address, size)
        rsp.cont()
        addr = s.agent.mmap("a", dev["name"], 65536, write=True, shared=True)
        toucher = threading.Thread(target=s.agent.touch, args=("a", [addr]), kwargs={"write": True})
        toucher.start()
        for _ in range(2):  # refcount, then mapcount
            stop = rsp.wait_stop(timeout=30)
            regs = rsp.read_registers()
            value = rsp.read_memory(stop.watch, 4)
            results["hits"].append({"stop": vars(stop), "rip": regs["rip"], "rsp": regs["rsp"],
                                    "value": int.from_bytes(value, "little", signed=True)})
            rsp.cont()
        toucher.join()
        rsp.interrupt()
        results["interrupt"] = vars(rsp.wait_stop(timeout=10))
        rsp.detach()
        rsp.close()
        exchange = [[d, b.decode("latin-1")] for d, b in rsp.transcript]
        (OUT / "gdb" / "exchange-after.json").write_text(json.dumps(
            {"qemu": s.vm.spec.qemu, "kernel": s.vm.release, "exchange": exchange,
             "results": results}, indent=1) + "\n")


def capture_events() -> None:
    exp = run_experiment(ROOT / "scenarios" / "fork-share.toml", ["before", "after"],
                         events="stacks")
    runs = []
    for run in exp.runs:
        runs.append({
            "kernel": run.kernel, "release": run.release,
            "steps": [{"step": st.step, "action": st.action, "label": st.label} for st in run.steps],
            "events": [{**vars(ev), "location": ev.location, "stack": ev.stack} for ev in run.events],
            "accounting": run.accounting,
            "watched_folios": [[pfn, pages] for pfn, pages in run.watched_folios.items()],
        })
    (OUT / "events" / "fork-share.json").write_text(json.dumps({"runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    capture_exchange()
    capture_events()
