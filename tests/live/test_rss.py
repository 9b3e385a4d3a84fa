"""Live: the RSS reader (lab.inspect.rss, behind Lab.rss) against the guest's
own /proc/PID/status, before and after device-dax faults on both kernels.
On `after` the PTE inserts count in MM_FILEPAGES (insert_page_into_pte_locked);
on `before` insert_pfn() counts nothing (docs/glossary.md, "RssFile")."""

from __future__ import annotations

import re

import pytest

from lab.inspect.rss import mm_rss

pytestmark = pytest.mark.live

STATUS = b"#!/bin/busybox sh\nexec /bin/busybox cat /proc/$1/status\n"
PAGES = 5


def status_kib(session, pid: int) -> dict[str, int]:
    """RssFile/RssAnon/RssShmem in KiB as the guest's /proc/PID/status shows them."""
    res = session.agent.run_binary(STATUS, [str(pid)], name="status.sh", timeout=20)
    assert res.status == 0, res.stderr
    text = res.stdout.decode()
    return {k: int(v) for k, v in re.findall(r"^(Rss\w+):\s+(\d+) kB", text, re.M)}


def drgn_kib(session, pid: int) -> dict[str, int]:
    with session.stopped():
        r = mm_rss(session.prog, pid)
    return {"RssFile": r.file * 4, "RssAnon": r.anon * 4, "RssShmem": r.shmem * 4}


def test_rss_file_matches_proc_status_and_counts_the_faults(session):
    agent = session.agent
    dev = session.vm.device("4K")["name"]
    addr = agent.mmap("r", dev, PAGES * 4096)
    pid = session.pid("r")
    before_fault = status_kib(session, pid)
    assert drgn_kib(session, pid)["RssFile"] == before_fault["RssFile"]
    agent.touch("r", [addr + i * 4096 for i in range(PAGES)], write=True)
    after_fault = status_kib(session, pid)
    read = drgn_kib(session, pid)
    # the status read runs in another process: r's own counters are still
    assert read["RssFile"] == after_fault["RssFile"]
    grown = after_fault["RssFile"] - before_fault["RssFile"]
    assert grown == {"before": 0, "after": PAGES * 4}[session.kernel.name]
