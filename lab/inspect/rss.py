"""Resident-set counters of a guest process: what /proc/PID/status shows as
RssFile, RssAnon and RssShmem, read from its ``struct mm_struct``."""

from __future__ import annotations

from dataclasses import dataclass

import drgn
from drgn.helpers.linux.mm import task_rss
from drgn.helpers.linux.pid import find_task

from .attach import InspectError

__all__ = ["RssState", "mm_rss"]


@dataclass(frozen=True)
class RssState:
    """``mm->rss_stat`` in pages: MM_FILEPAGES, MM_ANONPAGES, MM_SHMEMPAGES."""

    file: int
    anon: int
    shmem: int


def mm_rss(prog: drgn.Program, pid: int) -> RssState:
    """The RSS counters of process *pid*: ``mm->rss_stat[MM_FILEPAGES]``,
    ``[MM_ANONPAGES]``, ``[MM_SHMEMPAGES]`` of its ``struct mm_struct``.

    drgn's ``task_rss`` probes the layout: since v6.2 (f1a7941243c1, "mm:
    convert mm's rss stats into percpu_counter") ``rss_stat`` is an array of
    ``struct percpu_counter``, summed over the CPUs as
    ``percpu_counter_sum()`` does, as /proc/PID/status does with
    ``get_mm_counter_sum()`` (both 6.12 and 7.2 have this form; exact while
    the guest is stopped); before, a struct of atomics plus per-thread
    caches, which it adds up too.

    :param pid: the process's PID in the guest
    :return: the counters in pages
    :raises InspectError: if there is no such process or it has no mm.
    """
    task = find_task(prog, pid)
    if not task:
        raise InspectError(f"no process with pid {pid} in the guest (has it exited?)")
    if not task.mm:
        raise InspectError(f"pid {pid} has no user address space (a kernel thread, or exiting)")
    rss = task_rss(task)
    return RssState(file=rss.file, anon=rss.anon, shmem=rss.shmem)
