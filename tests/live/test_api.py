"""The notebook API refuses what a scenario file refuses, before anything
reaches the guest, and takes every action of the registry (`lab.actions`)."""

from __future__ import annotations

import pytest

from lab import Lab
from lab.actions import REGISTRY
from lab.guest import StepError
from lab.model import UserError

pytestmark = pytest.mark.live


@pytest.fixture(scope="module", params=["before", "after"])
def lab(request):
    with Lab.boot(request.param, say=lambda *_: None) as lab:
        yield lab


def _refused(lab: Lab, call, match: str) -> None:
    """*call* raises a one-line StepError matching *match*; no step is taken."""
    steps = len(lab.steps)
    with pytest.raises(StepError, match=match) as e:
        call()
    assert "\n" not in str(e.value)
    assert len(lab.steps) == steps, "a refused step reached the guest"


def test_what_a_scenario_refuses_the_notebook_refuses(lab):
    m = lab.mmap("4K", length="16K")
    lab.touch(m, [0], write=True)
    _refused(lab, lambda: lab.exit("nobody"), 'no process "nobody"')
    lab.fork("a", "b")
    _refused(lab, lambda: lab.fork("a", "b"), 'process "b" already exists')
    _refused(lab, lambda: lab.pin(m, length=0), "length: must be more than 0")
    _refused(lab, lambda: lab.pin(m, length="1G"), "runs past the end of mapping")
    _refused(lab, lambda: lab.unpin("nope"), 'no pin "nope"')
    _refused(lab, lambda: lab.touch(m, [4]), 'page 4 is outside mapping "m1"')
    _refused(lab, lambda: lab.step("mremap", map=m, length="64K", bogus=1),
             "bogus: unknown field")
    lab.munmap(m, proc="b")
    _refused(lab, lambda: lab.munmap(m, proc="b"), 'unmapped from "b"')
    # the 1 GiB pin of a 16K mapping watched nothing
    assert set(lab.timeline["page"].dropna()) <= {0, 1, 2, 3}
    lab.exit("b")
    _refused(lab, lambda: lab.exit("b"), 'process "b" exited at step')


def test_every_registry_action_has_a_method(lab):
    for name in REGISTRY:
        assert callable(getattr(lab, name)), name
    with pytest.raises(UserError, match="unknown action 'mremapp'"):
        lab.step("mremapp")


def test_mremap_mlock_munlock_through_the_registry(lab):
    """The registry's mremap, mlock and munlock, checked against the guest's
    own /proc/PID/maps and smaps."""
    agent = lab._session.agent
    m = lab.mmap("4K", length="16K", proc="r")
    lab.touch(m, [0], write=True, proc="r")

    def vma(addr):
        return next(v for v in agent.maps("r", smaps=True) if v["start"] <= addr < v["end"])

    # mlock succeeds and faults the range in, but a DAX VMA is never
    # VM_LOCKED: mlock_fixup() leaves vma_is_dax() VMAs alone ("dax: remove
    # VM_MIXEDMAP for fsdax and device dax", v4.15)
    record = lab.mlock(m, proc="r")
    assert record.errno is None, record.error
    assert "lo" not in vma(m.addr)["vmflags"].split()
    now = lab.current().query("proc == 'r'")
    assert set(now["page"]) == {0, 1, 2, 3} and now["pt_present"].all()  # populated
    assert (now["pagemap_pfn"] == now["pfn"]).all()
    record = lab.munlock(m, proc="r")
    assert record.errno is None, record.error
    record = lab.mremap(m, "32K", proc="r")
    assert record.errno is None, record.error
    moved = lab.mappings[m.name]
    assert moved.length == 32 * 1024
    v = vma(moved.addr)
    assert (v["start"], v["end"]) == (moved.addr, moved.addr + 32 * 1024)
    lab.touch(moved, [7], write=True, proc="r")  # a page of the grown part
    row = lab.current().query("proc == 'r' and page == 7").iloc[0]
    assert row["pagemap_pfn"] == row["pfn"]
    # shrinking without MAYMOVE works in place; a refusal would be recorded, not raised
    record = lab.mremap(moved, "16K", maymove=False, proc="r")
    assert record.errno is None and lab.mappings[m.name].length == 16 * 1024
    lab.exit("r")
