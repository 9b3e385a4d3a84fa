"""Frozen value types shared by every layer. No I/O happens here.

Everything a VM run depends on is described by these specs, so that the QEMU
command line, the guest image and the cache keys are pure functions of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError  # re-exported: lab.model.UserError is lab.errors.UserError

__all__ = [
    "UserError",
    "KernelArtifacts",
    "DaxSpec",
    "VmSpec",
    "DEFAULT_DAX",
    "PUD_DAX",
    "PUD_LAYOUT",
    "parse_size",
    "format_size",
    "FolioState",
    "PercpuRefState",
    "PgmapState",
    "PteState",
    "VmaState",
    "Frame",
    "PageRecord",
    "SignalRecord",
    "ProcessRecord",
    "StepRecord",
    "Event",
    "RunResult",
    "MapSpec",
    "Step",
]


KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
_SUFFIXES = {"": 1, "K": KiB, "M": MiB, "G": GiB, "T": 1 << 40}


def parse_size(text: str | int) -> int:
    """Parse ``4K``, ``2M``, ``1G``, ``4096`` or ``"0x1000"`` into bytes.

    :raises UserError: if *text* is not a size.
    """
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    try:
        if s.startswith("0X"):
            return int(s, 16)
        suffix = s[-1:] if s[-1:] in _SUFFIXES and not s[-1:].isdigit() else ""
        number = s[: len(s) - len(suffix)]
        return int(float(number) * _SUFFIXES[suffix])
    except (ValueError, KeyError) as exc:
        raise UserError(f"not a size: {text!r} (use bytes or a suffix: 4K, 2M, 1G)") from exc


def format_size(n: int) -> str:
    """The shortest exact spelling of *n* bytes (``2M``, ``4K``, ``12345``)."""
    for suffix, unit in (("T", 1 << 40), ("G", GiB), ("M", MiB), ("K", KiB)):
        if n and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


@dataclass(frozen=True)
class KernelArtifacts:
    """The local files of one cached kernel, as `lab.kernels` resolved them.

    ``modules`` are decompressed ``.ko`` files in load order (dependencies
    first); ``module_debug`` are their DWARF files for drgn. A kernel with
    everything built in has neither.
    """

    name: str
    release: str
    vmlinuz: Path
    vmlinux: Path
    modules: tuple[Path, ...] = ()
    module_debug: tuple[Path, ...] = ()
    packages: tuple[tuple[str, str], ...] = ()  # (package, version)
    root: Path | None = None


@dataclass(frozen=True)
class DaxSpec:
    """One emulated NVDIMM carrying one device-dax namespace.

    ``size`` is the NVDIMM's backing size; the namespace takes what the
    region offers at ``align`` (4K, 2M or 1G), or ``namespace_size`` when set
    (ndctl requires a size for 1G alignment).
    """

    align: int
    size: int
    namespace_size: int | None = None

    @property
    def label(self) -> str:
        return format_size(self.align)


# Two devices by default: a 4K-aligned one of about a GiB (262,144 struct
# pages: the bulk-snapshot benchmark's device) and a 2M-aligned one.
# QEMU shows an NVDIMM as its size minus the label area rounded up to the
# backend alignment (2M), and places the next NVDIMM right after it. ndctl
# wants regions 16M-aligned, so every size is a multiple of 16M plus 2M.
_LABEL_ROUNDED = 2 * MiB
DEFAULT_DAX: tuple[DaxSpec, ...] = (
    DaxSpec(align=4 * KiB, size=1 * GiB + 64 * MiB + _LABEL_ROUNDED),
    DaxSpec(align=2 * MiB, size=512 * MiB + _LABEL_ROUNDED),
)
# A 1G-aligned device needs 1G pages in the CPU and 4-level paging.
PUD_DAX = DaxSpec(align=1 * GiB, size=5 * GiB + _LABEL_ROUNDED, namespace_size=4 * GiB)
# With the 1G device first, its region starts at 4 GiB (1G-aligned); after
# the others it would start 1600 MiB later and ndctl finds no room for it.
PUD_LAYOUT: tuple[DaxSpec, ...] = (PUD_DAX, *DEFAULT_DAX)


@dataclass(frozen=True)
class VmSpec:
    """Everything that decides a guest's QEMU command line."""

    kernel: KernelArtifacts
    initrd: Path
    # private 0700 directory made at launch (sockets, console log, RAM and
    # NVDIMM copies); a plan names it RUN_DIR until then
    run_dir: Path
    # the prepared NVDIMM files (cached): each boot maps private sparse copies
    # of them in its run directory, except the boot that prepares them
    nvdimm_sources: tuple[Path, ...]
    nvdimms_in_place: bool = False
    dax: tuple[DaxSpec, ...] = DEFAULT_DAX
    memory: int = 1 * GiB
    cpus: int = 2
    accel: str = "tcg"
    qemu: str = "qemu-system-x86_64"
    cmdline_extra: tuple[str, ...] = ()
    gdbstub: bool = False
    # What -kernel loads: the uncompressed vmlinux through its PVH entry when it
    # has one (no decompression, ~0.8 s less under TCG), else the bzImage.
    boot_file: Path | None = None
    firmware: Path | None = None  # -bios (qboot starts faster than SeaBIOS)
    extra_args: tuple[str, ...] = field(default=())
    # the guest's console on this terminal (QEMU's monitor behind Ctrl-A)
    # instead of captured by the owner
    shell: bool = False
    # a saved post-boot state (lab.warm) to start from instead of booting:
    # QEMU maps its RAM and NVDIMM files copy-on-write and waits for the
    # device state (-incoming defer)
    restore_from: Path | None = None

    @property
    def ram_file(self) -> Path:
        """The file backing guest RAM (shared, so that a saved state can leave
        it out of the migration stream)."""
        return self.restore_from / "ram" if self.restore_from is not None else self.run_dir / "ram"

    @property
    def needs_1g_pages(self) -> bool:
        return any(d.align >= GiB for d in self.dax)

    @property
    def nvdimm_files(self) -> tuple[Path, ...]:
        """The files QEMU maps as NVDIMMs."""
        if self.restore_from is not None:
            return tuple(self.restore_from / f"nvdimm{i}.img" for i in range(len(self.dax)))
        if self.nvdimms_in_place:
            return self.nvdimm_sources
        return tuple(self.run_dir / f"nvdimm{i}.img" for i in range(len(self.nvdimm_sources)))


@dataclass(frozen=True)
class FolioState:
    """The state of one page and the folio it belongs to, as the kernel stores it.

    ``counters`` holds every counter of `lab.columns.COUNTERS` by column name
    (``refcount``, ``mapcount``, ``large_mapcount``, ...), read as the kernel
    stores them: ``mapcount`` is the page's raw ``_mapcount`` (-1 = unmapped).
    A counter a kernel (or an order-0 folio) does not have is ``None``, never
    a guess. ``folio.refcount`` reads ``folio.counters["refcount"]``.
    """

    pfn: int
    folio_pfn: int
    order: int
    flags: tuple[str, ...]
    counters: Mapping[str, int | None] = field(hash=False)
    mapping: int = 0
    index: int | None = None
    pgmap: int | None = None

    def __getattr__(self, name: str):
        # only reached for names that are not fields: the counters
        counters = self.__dict__.get("counters")
        if counters is not None and name in counters:
            return counters[name]
        raise AttributeError(f"{type(self).__name__} has no field or counter {name!r}")

    @property
    def flags_text(self) -> str:
        return "|".join(self.flags)


@dataclass(frozen=True)
class PercpuRefState:
    """A ``struct percpu_ref`` summed as percpu_ref_read() would."""

    count: int
    mode: str  # "percpu", "atomic" or "dead"


@dataclass(frozen=True)
class PgmapState:
    """One ``struct dev_pagemap``."""

    address: int
    type: str  # MEMORY_DEVICE_GENERIC, ...
    ranges: tuple[tuple[int, int], ...]  # physical [start, end] inclusive, as struct range
    vmemmap_shift: int
    ops: int
    flags: int
    ref: PercpuRefState


@dataclass(frozen=True)
class PteState:
    """The page-table entry that maps one user address."""

    level: str  # PTE, PMD or PUD
    raw: int
    present: bool
    write: bool
    dirty: bool
    young: bool
    huge: bool
    special: bool
    devmap: bool | None  # None: this kernel has no devmap bit
    pfn: int | None


@dataclass(frozen=True)
class VmaState:
    """The VMA containing one user address."""

    start: int
    end: int
    flags: int
    flag_names: tuple[str, ...]
    pgoff: int
    file: str | None


# -- records: what a run saw --------------------------------------------------
# Plain data made by the runner (`lab.runner`) and the watcher
# (`lab.events`), read by the pure layers (`lab.timeline`, `lab.plots`,
# `lab.report`) without importing anything that starts a process or drgn.

Frame = tuple[str, str | None, bool]  # (function, "file:line" or None, inlined)


@dataclass(frozen=True)
class PageRecord:
    """One watched page after one step, as seen from one process (or none)."""

    map: str
    page: int
    pfn: int
    folio: FolioState
    proc: str | None
    vaddr: int | None
    pte: PteState | None
    pagemap_pfn: int | None  # the guest's own /proc/PID/pagemap answer
    pinned: bool = False  # inside a long-term pin the scenario holds
    in_pipe: bool = False  # inside a spliced range not yet drained
    pins: int = 0  # live long-term pins covering this page
    folio_pins: int = 0  # live pins of this page's folio (of this page, for order 0)
    folio_pipe_refs: int = 0  # pages of this folio held by live pipes, summed over pipes


@dataclass(frozen=True)
class SignalRecord:
    """One signal a guest process received during a step, or the one that
    ended it (``survived`` False, ``code`` None: a wait status carries no
    si_code)."""

    proc: str
    pid: int | None
    signal: int
    code: int | None  # si_code (BUS_MCEERR_AR = 4 for SIGBUS)
    addr: int | None  # si_addr of a signal the kernel raised
    addr_lsb: int | None  # memory failure: log2 of the mapping's size (12, 21, 30)
    survived: bool
    during: str | None = None  # the agent command whose answer reported it
    sender: int | None = None  # pid of the process that sent it (kill)


@dataclass(frozen=True)
class ProcessRecord:
    """One live guest process at a snapshot: its ``mm_struct`` RSS counters
    (MM_FILEPAGES, MM_ANONPAGES, MM_SHMEMPAGES, in pages, summed as the kernel
    does), None where they could not be read."""

    proc: str
    pid: int
    file_pages: int | None
    anon_pages: int | None
    shmem_pages: int | None


@dataclass(frozen=True)
class StepRecord:
    """What one step did and what the kernel looked like after it: the
    snapshot of that step."""

    step: int  # 0 = the state before the first step
    action: str
    proc: str | None
    label: str
    detail: str
    errno: int | None
    error: str | None
    seconds: float  # action + snapshot
    pages: tuple[PageRecord, ...]
    pgmap: PgmapState
    device_refcount: Any  # numpy int array: every struct page of the device (bulk path)
    device_mapcount: Any
    complaints: tuple[tuple[str, str], ...] = ()  # (kind, console line)
    # the console's memory-management lines (memory failure, OOM, ...):
    # (kind, console line), next to the complaints they are not
    kernel_messages: tuple[tuple[str, str], ...] = ()
    signals: tuple[SignalRecord, ...] = ()  # received during this step
    exited: tuple[tuple[str, str], ...] = ()  # (proc, reason): ended without an exit step
    processes: tuple[ProcessRecord, ...] = ()  # every live worker at the snapshot
    rss_seconds: float | None = None  # what reading the processes' RSS cost


@dataclass(frozen=True)
class Event:
    """One change of one watched counter (or, with kind "lost", a change the
    watchpoints did not see, found by the watcher's accounting; with kind
    "gone", a counter whose struct page no longer exists)."""

    seq: int
    step: int
    kind: str  # "write", "lost", or "gone" (the struct page was removed)
    folio_pfn: int
    field: str
    old: int
    new: int | None  # None: gone
    cpu: int | None
    comm: str | None
    pid: int | None
    pc: int | None  # the instruction after the write, as reported
    location: tuple[Frame, ...]  # of pc - 1, inline frames included
    stack: tuple[Frame, ...] | None  # None: not asked for
    seconds: float  # time spent handling the hit (guest stopped)

    @property
    def delta(self) -> int | None:
        return None if self.new is None else self.new - self.old


@dataclass
class RunResult:
    """All steps of one scenario (or notebook session) on one kernel.

    ``scenario`` is a `lab.scenario.Scenario` (None for a notebook session).
    """

    scenario: Any
    kernel: str  # the kernel's name (for a tree, its directory's name)
    # the kernel as the user spelled it: a name, or the PATH of a tree built
    # in place (what meta.json and a rerun need; `kernel` alone cannot be
    # looked up again for a tree)
    kernel_spelling: str
    release: str
    accel: str
    device: dict
    steps: list[StepRecord] = field(default_factory=list)
    # with watches armed (`lab.events`): every change of a watched counter,
    # the accounting rows of each snapshot, and what handling the hits cost
    events: list[Event] = field(default_factory=list)
    accounting: list[dict] = field(default_factory=list)
    event_stats: dict = field(default_factory=dict)
    watched_folios: dict[int, list[tuple[str, int]]] = field(default_factory=dict)
    # whether a device-dax fault maps the folio on this kernel (None: unknown),
    # and the insert functions its fault handler calls (lab.inspect.probes)
    counts_mappings: bool | None = None
    dax_fault_calls: tuple[str, ...] = ()
    # QEMU start to ready (a boot, or a restore of the saved state), seconds
    ready_seconds: float | None = None


# -- steps: what a scenario or a notebook asks the guest to do ----------------


@dataclass(frozen=True)
class MapSpec:
    """A mapping as its ``mmap`` step created it (offsets on the device)."""

    name: str
    proc: str
    offset: int
    length: int
    step: int

    @property
    def pages(self) -> int:
        return self.length // (4 * KiB)


@dataclass(frozen=True)
class Step:
    """One step, checked and normalised by its action in `lab.actions`.

    ``index`` counts from 1; ``proc`` is the guest process the step runs in
    (None for ``snapshot``); ``args`` holds the action's fields with defaults
    filled in (sizes in bytes, pages as sorted 4K page indices within the
    mapping) plus a few derived keys: see ``docs/scenarios.md``. ``fields``
    are the fields as written (defaults filled), which the runner checks
    again against the live guest. ``pages_touched`` are the (map, page) pairs
    the step faults in or takes references on.
    """

    index: int
    action: str
    proc: str | None
    args: Mapping[str, Any] = field(hash=False)
    label: str | None = None
    fields: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False)
    pages_touched: tuple[tuple[str, int], ...] = field(default=(), compare=False)
