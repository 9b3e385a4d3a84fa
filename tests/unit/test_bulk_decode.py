"""Decode struct pages and page-table entries captured from real guests
(tests/golden/capture_pages.py made them) and compare with what the per-page
drgn reader and the guest's /proc/PID/pagemap said at the same moment."""

import json
from pathlib import Path

import numpy as np
import pytest

from lab.inspect.bulk import decode_pages
from lab.inspect.pgtable import decode_entry

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "pages"
KERNELS = ["before", "after"]


def _record(kernel):
    return json.loads((GOLDEN / f"{kernel}.json").read_text())


def _dtype(rec):
    names = list(rec["fields"])
    return np.dtype({"names": names, "formats": [rec["fields"][n][1] for n in names],
                     "offsets": [rec["fields"][n][0] for n in names], "itemsize": rec["itemsize"]})


@pytest.mark.parametrize("kernel", KERNELS)
def test_bulk_decode_matches_the_per_page_reader(kernel):
    rec = _record(kernel)
    for win in rec["windows"]:
        raw = (GOLDEN / win["file"]).read_bytes()
        pages = decode_pages(raw, win["first_pfn"], rec["vmemmap_base"], _dtype(rec), rec["head_mode"])
        assert len(pages) == win["count"]
        assert pages.head_pfn.tolist() == win["folio_pfn"]
        assert pages.mapcount.tolist() == win["mapcount"]
        heads = pages.pfn == pages.head_pfn
        assert pages.refcount[heads].tolist() == np.array(win["refcount_of_folio"])[heads].tolist()


@pytest.mark.parametrize("kernel", KERNELS)
def test_large_folios_are_decoded_as_such(kernel):
    rec = _record(kernel)
    win = rec["windows"][1]  # the 2M device: order-9 folios
    raw = (GOLDEN / win["file"]).read_bytes()
    pages = decode_pages(raw, win["first_pfn"], rec["vmemmap_base"], _dtype(rec), rec["head_mode"])
    first = win["first_pfn"]
    assert set(pages.head_pfn[:512].tolist()) == {first}
    assert set(pages.head_pfn[512:].tolist()) == {first + 512}


@pytest.mark.parametrize("kernel", KERNELS)
def test_page_table_entries_point_at_the_pagemap_pfn(kernel):
    rec = _record(kernel)
    devmap_kernel = kernel == "before"
    for entry in rec["entries"]:
        pte = decode_entry(entry["level"], entry["raw"], devmap=devmap_kernel)
        assert pte.present and pte.write
        if entry["level"] == "PTE":
            assert pte.pfn == entry["pagemap_pfn"]
        else:  # a PMD maps the 2M folio: the pagemap PFN is inside it
            assert entry["level"] == "PMD" and pte.huge
            assert pte.pfn <= entry["pagemap_pfn"] < pte.pfn + 512
        # The seed change: before, a devmap entry (special for PTEs); after,
        # a normal mapping of the folio.
        if devmap_kernel:
            assert pte.devmap
            assert pte.special == (entry["level"] == "PTE")
        else:
            assert pte.devmap is None and not pte.special


@pytest.mark.parametrize("kernel", KERNELS)
def test_refcounts_tell_the_kernels_apart(kernel):
    rec = _record(kernel)
    win = rec["windows"][0]  # 4K device, pages 1, 2 and 5 write-faulted
    refs = win["refcount_of_folio"]
    maps = win["mapcount"]
    if kernel == "after":
        assert [refs[i] for i in (1, 2, 5)] == [2, 2, 2] and [maps[i] for i in (1, 2, 5)] == [0, 0, 0]
        assert refs[0] == 1 and maps[0] == -1
    else:
        assert set(refs) == {1} and set(maps) == {-1}
