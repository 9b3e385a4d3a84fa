"""Live: folio->mapping and ->index of device-dax folios (lab.inspect.mapping)
against what dax_set_mapping() must have written: unset before the first
fault, the device file's mapping and the page's offset on the device after
it, and still set after munmap (docs/glossary.md, "folio->mapping")."""

from __future__ import annotations

import pytest

from lab.inspect.mapping import folio_mapping

pytestmark = pytest.mark.live

PAGE = 4096
OFFSET_PAGES = 16  # the mapping starts 64K into the device


def read(session, pfn):
    with session.stopped():
        return folio_mapping(session.prog, pfn)


def test_mapping_and_index_set_at_fault_and_kept(session):
    agent = session.agent
    dev = session.vm.device("4K")
    first_pfn = dev["start"] // PAGE + OFFSET_PAGES
    addr = agent.mmap("f", dev["name"], 8 * PAGE, offset=OFFSET_PAGES * PAGE)
    assert read(session, first_pfn + 3).mapping == 0  # never faulted in this boot
    agent.touch("f", [addr + 3 * PAGE, addr + 5 * PAGE], write=True)
    three, five = read(session, first_pfn + 3), read(session, first_pfn + 5)
    assert three.mapping and three.mapping == five.mapping and not three.anon
    assert (three.index, five.index) == (OFFSET_PAGES + 3, OFFSET_PAGES + 5)
    assert read(session, first_pfn + 4).mapping == 0  # untouched neighbour
    agent.munmap("f", addr, 8 * PAGE)
    assert read(session, first_pfn + 3) == three  # nothing clears them for GENERIC
