"""Capture the golden struct-page and page-table bytes used by
tests/unit/test_bulk_decode.py.

Run from the repository root after `make prepare`:

    .venv/bin/python tests/golden/capture_pages.py

For each kernel: boot, write-fault pages 1, 2 and 5 of the 4K device and
page 1 of the second 2M folio of the 2M device in one process, then (guest
stopped) save the raw struct pages of the first 64 pages of the 4K device and
the first 1024 of the 2M device, the layout drgn reports for struct page, the
raw page-table entries of the touched addresses, and what the per-page drgn
reader and the guest's /proc/PID/pagemap say about the same pages.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from drgn.helpers.linux.mm import pfn_to_page

from lab import inspect
from lab.inspect.bulk import head_encoding, page_dtype
from lab.inspect.pgtable import walk
from lab.session import Session

OUT = Path(__file__).resolve().parent / "pages"


def capture(kernel: str) -> None:
    with Session.boot(kernel, say=lambda *_: None) as s:
        a = s.agent
        d4, d2 = s.vm.device("4K"), s.vm.device("2M")
        m4 = a.mmap("g", d4["name"], 64 * 4096)
        m2 = a.mmap("g", d2["name"], 4 << 20)
        touched = [m4 + 4096, m4 + 2 * 4096, m4 + 5 * 4096, m2 + (2 << 20) + 4096]
        a.touch("g", touched, write=True)
        pagemap = a.pagemap("g", touched)
        pid = s.pid("g")
        prog = s.prog
        dtype = page_dtype(prog)
        base = pfn_to_page(prog, 0).value_()
        record = {"kernel": kernel, "release": s.vm.release, "itemsize": dtype.itemsize,
                  "fields": {n: [dtype.fields[n][1], dtype.fields[n][0].str] for n in dtype.names},
                  "head_mode": head_encoding(prog), "vmemmap_base": base, "windows": [],
                  "entries": []}
        with s.stopped():
            for dev, count in ((d4, 64), (d2, 1024)):
                first = dev["start"] >> 12
                raw = prog.read(base + first * dtype.itemsize, count * dtype.itemsize)
                name = f"{kernel}-{dev['name']}.bin"
                (OUT / name).write_bytes(raw)
                per_page = [inspect.folio_state(prog, p) for p in range(first, first + count)]
                record["windows"].append({
                    "file": name, "first_pfn": first, "count": count,
                    "folio_pfn": [f.folio_pfn for f in per_page],
                    "refcount_of_folio": [f.refcount for f in per_page],
                    "mapcount": [f.mapcount for f in per_page],
                })
            for addr, pm in zip(touched, pagemap, strict=True):
                level, raw_entry = walk(prog, prog_task_mm(prog, pid), addr)
                record["entries"].append({"addr": addr, "level": level, "raw": raw_entry,
                                          "pagemap_pfn": pm["pfn"]})
        (OUT / f"{kernel}.json").write_text(json.dumps(record, indent=1) + "\n")
        print(f"{kernel}: captured {s.vm.release}")


def prog_task_mm(prog, pid):
    from drgn.helpers.linux.pid import find_task

    return find_task(prog, pid).mm


if __name__ == "__main__":
    OUT.mkdir(exist_ok=True)
    for name in sys.argv[1:] or ["before", "after"]:
        capture(name)
