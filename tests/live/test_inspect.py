"""drgn readers against live guests, checked against independent truth: the
guest's own /proc/PID/pagemap, the namespace sysfs attributes, and the
difference "device/dax: properly refcount device dax pages when mapping"
makes (before: devmap entries and no counts; after: real folio mappings)."""

from __future__ import annotations

import numpy as np
import pytest

from lab import inspect
from lab.model import MiB

pytestmark = pytest.mark.live

REFCOUNTED = {"before": False, "after": True}


def _map_and_touch(session, proc, align, length, offset_in_map):
    agent = session.agent
    dev = session.vm.device(align)
    addr = agent.mmap(proc, dev["name"], length)
    target = addr + offset_in_map
    entry_before = agent.pagemap(proc, [target])[0]
    assert not entry_before["present"]
    # The PFN the page will get: device-dax maps offset N of the device at
    # physical start + N (it is a linear device).
    pfn = (dev["start"] + offset_in_map) >> 12
    start = inspect.folio_state(session.prog, pfn)
    agent.touch(proc, [target], write=True)
    return dev, addr, target, pfn, start


def test_4k_write_fault(session):
    kernel = session.kernel.name
    dev, addr, target, pfn, start = _map_and_touch(session, "t4k", "4K", 16 * 4096, 5 * 4096)
    try:
        pagemap = session.agent.pagemap("t4k", [target])[0]
        assert pagemap["present"] and pagemap["pfn"] == pfn
        pid = session.pid("t4k")
        with session.stopped():
            pte = inspect.pte_state(session.prog, pid, target)
            now = inspect.folio_state(session.prog, pfn)
        assert pte.level == "PTE" and pte.present and pte.write and pte.pfn == pfn
        assert now.order == 0 and now.folio_pfn == pfn
        if REFCOUNTED[kernel]:
            assert not pte.special and pte.devmap is None
            assert now.refcount == start.refcount + 1
            assert now.mapcount == start.mapcount + 1 == 0  # raw _mapcount: 0 = mapped once
        else:
            assert pte.special and pte.devmap
            assert now.refcount == start.refcount and now.mapcount == start.mapcount == -1
        session.agent.munmap("t4k", addr, 16 * 4096)
        after = inspect.folio_state(session.prog, pfn)
        assert (after.refcount, after.mapcount) == (start.refcount, start.mapcount)
    finally:
        session.agent.exit("t4k")


def test_2m_write_fault_maps_a_pmd_and_counts_on_the_head(session):
    kernel = session.kernel.name
    length = 4 * MiB
    dev, addr, target, pfn, start = _map_and_touch(session, "t2m", "2M", length, 2 * MiB + 3 * 4096)
    try:
        head_pfn = pfn & ~511
        assert session.agent.pagemap("t2m", [target])[0]["pfn"] == pfn
        pid = session.pid("t2m")
        with session.stopped():
            pte = inspect.pte_state(session.prog, pid, target)
            head = inspect.folio_state(session.prog, head_pfn)
            tail = inspect.folio_state(session.prog, pfn)
        assert pte.level == "PMD" and pte.huge and pte.pfn == head_pfn
        assert head.order == 9 and tail.folio_pfn == head_pfn and tail.order == 9
        start_head = inspect.folio_state(session.prog, head_pfn) if False else None
        if REFCOUNTED[kernel]:
            assert pte.devmap is None
            assert head.refcount == start.refcount + 1
            assert head.entire_mapcount == 0  # raw: mapped once by a PMD
            assert head.large_mapcount == 0
        else:
            assert pte.devmap
            assert head.refcount == start.refcount
            assert head.entire_mapcount == -1
        session.agent.munmap("t2m", addr, length)
        after = inspect.folio_state(session.prog, head_pfn)
        assert after.refcount == start.refcount
        assert after.entire_mapcount == -1
        del start_head
    finally:
        session.agent.exit("t2m")


def test_pgmap_is_generic_and_covers_the_namespace(session):
    for dev in session.vm.devices:
        first = dev["start"] >> 12
        pg = inspect.pgmap_state(session.prog, inspect.find_dev_pagemap(session.prog, first))
        assert pg.type == "MEMORY_DEVICE_GENERIC"
        last = dev["start"] + dev["size"] - 1
        assert any(lo <= dev["start"] and last <= hi for lo, hi in pg.ranges)
        assert pg.vmemmap_shift == {4096: 0, 2 * MiB: 9}[dev["align"]]
        assert pg.ref.mode == "percpu" and pg.ref.count > 0


def test_pgmap_ref_is_unchanged_by_mapping_and_unmapping(session):
    dev = session.vm.device("4K")
    pgmap = inspect.find_dev_pagemap(session.prog, dev["start"] >> 12)
    before = inspect.percpu_ref_state(pgmap.ref).count
    addr = session.agent.mmap("tref", dev["name"], 64 * 4096)
    try:
        session.agent.touch("tref", [addr + i * 4096 for i in range(64)], write=True)
        mapped = inspect.percpu_ref_state(pgmap.ref).count
        session.agent.munmap("tref", addr, 64 * 4096)
        after = inspect.percpu_ref_state(pgmap.ref).count
    finally:
        session.agent.exit("tref")
    assert before == mapped == after


def test_bulk_read_equals_per_page_reader_on_every_page(session):
    agent = session.agent
    dev4, dev2 = session.vm.device("4K"), session.vm.device("2M")
    a4 = agent.mmap("mix", dev4["name"], 256 * 4096)
    a2 = agent.mmap("mix", dev2["name"], 4 * MiB)
    agent.touch("mix", [a4 + i * 4096 for i in range(0, 256, 3)], write=True)
    agent.touch("mix", [a2 + 4096], write=False)
    agent.fork("mix", "mix-child")
    agent.touch("mix-child", [a4 + 7 * 4096], write=True)
    agent.munmap("mix", a4 + 64 * 4096, 32 * 4096)
    try:
        for dev in (dev4, dev2):
            first, count = dev["start"] >> 12, dev["size"] >> 12
            with session.stopped():
                bulk = inspect.read_pages(session.prog, first, count)
                per_page = [inspect.folio_state(session.prog, pfn) for pfn in range(first, first + count)]
            assert len(bulk) == count
            assert np.array_equal(bulk.head_pfn, [f.folio_pfn for f in per_page])
            assert np.array_equal(bulk.mapcount, [f.mapcount for f in per_page])
            heads = bulk.pfn == bulk.head_pfn
            assert np.array_equal(bulk.refcount[heads], [f.refcount for f in per_page if f.pfn == f.folio_pfn])
            if REFCOUNTED[session.kernel.name]:
                assert (bulk.refcount[heads] > 1).any(), "the workload left no mapped folio to compare"
    finally:
        agent.exit("mix-child")
        agent.exit("mix")


def test_bad_questions_are_clear_errors(session):
    with pytest.raises(inspect.InspectError, match="not on any device"):
        inspect.folio_state(session.prog, 0x1000)
    with pytest.raises(inspect.InspectError, match="no process with pid 99999"):
        inspect.pte_state(session.prog, 99999, 0x400000)
    pid = session.agent.ping()["pid"]
    with pytest.raises(inspect.InspectError, match="no page-table entry maps|no mapping"):
        inspect.pte_state(session.prog, pid, 0x10000)


def test_debug_info_of_another_kernel_is_refused(session):
    from lab import kernels

    other = kernels.resolve("after" if session.kernel.name == "before" else "before", fetch=False)
    with pytest.raises(inspect.InspectError, match="held by another drgn Program"):
        inspect.attach(session.vm.spec.run_dir / "drgn-qmp.sock", session.kernel)
    try:
        session.detach()
        with pytest.raises(inspect.InspectError, match="does not match|debug info is for"):
            inspect.attach(session.vm.spec.run_dir / "drgn-qmp.sock", other)
    finally:
        session.attach()
    assert inspect.folio_state(session.prog, session.vm.devices[0]["start"] >> 12).order == 0
