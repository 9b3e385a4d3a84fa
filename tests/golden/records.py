"""Run records (lab.model) to and from JSON, for the golden records of
tests/unit/test_timeline_records.py. The device-wide bulk arrays are left
out (df_timeline does not read them)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import MappingProxyType

import numpy as np

from lab.model import (
    FolioState,
    PageRecord,
    PercpuRefState,
    PgmapState,
    ProcessRecord,
    PteState,
    RunResult,
    SignalRecord,
    StepRecord,
)


def _plain(obj):
    if isinstance(obj, MappingProxyType):
        return dict(obj)
    if dataclasses.is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_plain(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


def dump(runs: list[RunResult], path: Path) -> None:
    out = []
    for run in runs:
        steps = []
        for st in run.steps:
            d = {f.name: _plain(getattr(st, f.name)) for f in dataclasses.fields(st)
                 if f.name not in ("device_refcount", "device_mapcount")}
            steps.append(d)
        out.append({"kernel": run.kernel, "kernel_spelling": run.kernel_spelling,
                    "release": run.release, "accel": run.accel,
                    "device": run.device, "counts_mappings": run.counts_mappings,
                    "dax_fault_calls": list(run.dax_fault_calls), "steps": steps})
    path.write_text(json.dumps(out, indent=1) + "\n")


def load(path: Path) -> list[RunResult]:
    runs = []
    for r in json.loads(path.read_text()):
        steps = []
        for st in r["steps"]:
            pages = []
            for p in st["pages"]:
                f = p["folio"]
                folio = FolioState(**{**f, "flags": tuple(f["flags"]),
                                      "counters": MappingProxyType(f["counters"])})
                pte = PteState(**p["pte"]) if p["pte"] else None
                pages.append(PageRecord(**{**p, "folio": folio, "pte": pte}))
            pg = st["pgmap"]
            pgmap = PgmapState(**{**pg, "ranges": tuple(tuple(x) for x in pg["ranges"]),
                                  "ref": PercpuRefState(**pg["ref"])})
            empty = np.zeros(0, dtype=np.int64)
            # records captured before signals/processes existed lack them
            extra = {"kernel_messages": tuple(tuple(m) for m in st.get("kernel_messages", ())),
                     "signals": tuple(SignalRecord(**x) for x in st.get("signals", ())),
                     "exited": tuple(tuple(x) for x in st.get("exited", ())),
                     "processes": tuple(ProcessRecord(**x) for x in st.get("processes", ()))}
            steps.append(StepRecord(**{**st, "pages": tuple(pages), "pgmap": pgmap,
                                       "complaints": tuple(tuple(c) for c in st["complaints"]),
                                       **extra,
                                       "device_refcount": empty, "device_mapcount": empty}))
        # records captured before RunResult had kernel_spelling were of
        # catalog kernels, spelled as their names
        runs.append(RunResult(scenario=None, kernel=r["kernel"],
                              kernel_spelling=r.get("kernel_spelling", r["kernel"]),
                              release=r["release"],
                              accel=r["accel"], device=r["device"], steps=steps,
                              counts_mappings=r.get("counts_mappings"),
                              dax_fault_calls=tuple(r.get("dax_fault_calls", ()))))
    return runs
