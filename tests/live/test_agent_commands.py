"""The agent's mremap, mlock/munlock and run commands on both kernels,
checked against the guest's own /proc/PID/maps, smaps and pagemap (and
drgn's view of the folio the page table entry points at)."""

from __future__ import annotations

import errno
import shutil
import subprocess

import pytest

from lab import inspect
from lab.agent import AgentError
from lab.model import KiB, MiB

pytestmark = pytest.mark.live

PAGE = 4096


def _vma(maps: list[dict], addr: int) -> dict | None:
    return next((v for v in maps if v["start"] <= addr < v["end"]), None)


def _dax_vmas(agent, proc: str) -> list[tuple[int, int, int]]:
    """(start, length, device offset) of each device-dax VMA of *proc*."""
    return [(v["start"], v["end"] - v["start"], v["offset"])
            for v in agent.maps(proc) if v["path"].startswith("/dev/dax")]


def test_mremap_4k_grows_in_place_or_moves_with_its_page(session):
    agent = session.agent
    dev = session.vm.device("4K")
    pfn = dev["start"] // PAGE
    addr = agent.mmap("mr4", dev["name"], 48 * KiB)
    try:
        agent.touch("mr4", [addr], write=True)
        before = inspect.folio_state(session.prog, pfn)
        agent.munmap("mr4", addr + 16 * KiB, 16 * KiB)
        assert _dax_vmas(agent, "mr4") == [(addr, 16 * KiB, 0), (addr + 32 * KiB, 16 * KiB, 32 * KiB)]
        # The hole after the first 16K lets it grow where it is; the VMA then
        # meets the last 16K (same file, next offset) and they merge.
        assert agent.mremap("mr4", addr, 16 * KiB, 32 * KiB) == addr
        assert _dax_vmas(agent, "mr4") == [(addr, 48 * KiB, 0)]
        with pytest.raises(AgentError) as info:
            agent.mremap("mr4", addr, 32 * KiB, 64 * KiB)
        assert info.value.errno == errno.ENOMEM
        new = agent.mremap("mr4", addr, 32 * KiB, 64 * KiB, maymove=True)
        assert new != addr
        assert sorted(_dax_vmas(agent, "mr4")) == sorted(
            [(new, 64 * KiB, 0), (addr + 32 * KiB, 16 * KiB, 32 * KiB)])
        # The entry moved with the mapping: same PFN at the new address, none
        # at the old, and the folio's counters are those of one mapping.
        at_new, at_old = agent.pagemap("mr4", [new, addr])
        assert (at_new["present"], at_new["pfn"]) == (True, pfn)
        assert (at_old["present"], at_old["raw"]) == (False, 0)
        pid = session.pid("mr4")
        with session.stopped():
            pte = inspect.pte_state(session.prog, pid, new)
            moved = inspect.folio_state(session.prog, pfn)
        assert pte.present and pte.pfn == pfn
        assert (moved.refcount, moved.mapcount) == (before.refcount, before.mapcount)
        assert agent.mremap("mr4", new, 64 * KiB, 16 * KiB) == new  # shrink in place
        assert _vma(agent.maps("mr4"), new)["end"] == new + 16 * KiB
    finally:
        agent.exit("mr4")


def test_mremap_2m_unaligned_shrink_is_refused(session):
    agent = session.agent
    dev = session.vm.device("2M")
    addr = agent.mmap("mr2", dev["name"], 4 * MiB, align=2 * MiB)
    try:
        agent.touch("mr2", [addr], write=True)
        # Shrinking splits the VMA at an address the device's alignment
        # does not allow (dev_dax_may_split): EINVAL, and nothing changed.
        with pytest.raises(AgentError) as info:
            agent.mremap("mr2", addr, 4 * MiB, 4 * MiB - PAGE)
        assert info.value.errno == errno.EINVAL
        assert _dax_vmas(agent, "mr2") == [(addr, 4 * MiB, 0)]
        assert agent.pagemap("mr2", [addr])[0]["pfn"] == dev["start"] // PAGE
        # Growing in place splits nothing, and both kernels accept an end
        # that is not 2M-aligned (the device's own check is only may_split).
        grown = agent.mremap("mr2", addr, 4 * MiB, 4 * MiB + PAGE)
        assert grown == addr
        assert _dax_vmas(agent, "mr2") == [(addr, 4 * MiB + PAGE, 0)]
    finally:
        agent.exit("mr2")


def test_mlock_populates_device_dax_but_does_not_lock_it(session):
    agent = session.agent
    dev = session.vm.device("4K")
    addr = agent.mmap("ml", dev["name"], 64 * KiB, offset=64 * KiB)
    pages = [addr + i * PAGE for i in range(16)]
    try:
        assert not any(e["present"] for e in agent.pagemap("ml", pages))
        agent.mlock("ml", addr, 64 * KiB)
        # mm_populate() faults every page in, but mlock_fixup() leaves a DAX
        # VMA without VM_LOCKED: smaps shows no "lo" and nothing locked.
        entries = agent.pagemap("ml", pages)
        assert [e["pfn"] for e in entries] == [(dev["start"] + 64 * KiB) // PAGE + i
                                               for i in range(16)]
        vma = _vma(agent.maps("ml", smaps=True), addr)
        assert "lo" not in vma["vmflags"].split() and vma["locked"] == 0
        agent.munlock("ml", addr, 64 * KiB)
        agent.mlock("ml", addr, 64 * KiB, onfault=True)
        assert "lf" not in _vma(agent.maps("ml", smaps=True), addr)["vmflags"].split()
        agent.munlock("ml", addr, 64 * KiB)
        assert all(e["present"] for e in agent.pagemap("ml", pages))
        with pytest.raises(AgentError) as info:  # a range with a hole in it
            agent.mlock("ml", addr, 128 * KiB)
        assert info.value.errno == errno.ENOMEM
    finally:
        agent.exit("ml")


PROGRAM = r"""
#include <stdio.h>
#include <sys/utsname.h>
int main(int argc, char **argv)
{
	struct utsname u;
	uname(&u);
	printf("%s", u.release);
	for (int i = 1; i < argc; i++)
		printf(" [%s]", argv[i]);
	printf("\n");
	fprintf(stderr, "argc %d\n", argc);
	return argc;
}
"""


def test_run_a_static_binary_in_the_guest(session, tmp_path):
    gcc = shutil.which("gcc")
    assert gcc, "gcc is needed to build the program"
    (tmp_path / "p.c").write_text(PROGRAM)
    subprocess.run([gcc, "-static", "-O2", "-Wall", "-Werror", "-o", str(tmp_path / "uname"),
                    str(tmp_path / "p.c")], check=True)
    release = session.agent.ping()["release"]
    res = session.agent.run_binary(tmp_path / "uname", ["a b", "c"])
    assert (res.status, res.signal, res.timed_out) == (3, None, False)
    assert res.stdout.decode() == f"{release} [a b] [c]\n"
    assert res.stderr == b"argc 3\n"
    res = session.agent.run("uname", timeout=10)
    assert res.status == 1 and res.stdout.decode() == release + "\n"
