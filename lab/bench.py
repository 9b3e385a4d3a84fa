"""``devdax-lab bench``: measured, not asserted. Prints figures and ratios
that docs/BENCHMARKS.md records.

- ``boot``: QEMU start to device-dax ready, per kernel, cold boot and warm
  start (restore of the saved post-boot state) in turns, and where the time
  goes in each (the guest-uptime stamps /init prints; the Vm's timestamps);
  and a notebook's ``Lab.boot`` (warm start + drgn attach).
- ``snapshot``: every struct page of the 1 GiB 4K device, read page by page
  through drgn objects against one bulk read decoded with numpy.
- ``compare``: a whole `compare` of a scenario, cold boots and warm starts
  in turns, and the latency of one step.
- ``compare-parallel``: a whole `compare` with its kernels one after the
  other (``--jobs 1``) against side by side, cold and warm, in turns.
- ``sweep``: the same cells (scenarios × kernels) as a sweep on a local
  Dask cluster with 2 VM slots and as a sequential loop of the same cell
  runs, in one run: cells per minute of each and the ratio.
- ``events``: watchpoints: cost per hit with and without a stack, the cost
  to code that touches no watched memory (during and after), and a
  scenario's steps with watches off, counting and unwinding.
"""

from __future__ import annotations

import os
import re
import statistics
import time
from collections.abc import Sequence

__all__ = ["MARK", "boot_phases", "main", "restore_phases"]

MARK = re.compile(r"^devdax-lab: (?P<what>.*?) \(uptime (?P<uptime>\d+\.\d+)\)$")


def boot_phases(marks: Sequence[tuple[float, str]], ready: float) -> dict[str, float]:
    """Split a boot into phases from /init's stamped lines.

    :param marks: (host seconds since QEMU start, line) for each line /init printed
    :param ready: host seconds from QEMU start to ready
    :return: seconds spent in: firmware and kernel load (before the kernel's
        clock starts), kernel boot to /init, module loading, agent and
        namespaces until ready.
    """
    stamps = {}
    for host_t, line in marks:
        m = MARK.match(line)
        if m:
            stamps[m["what"]] = (host_t, float(m["uptime"]))
    host_init, up_init = stamps["init started"]
    _, up_modules = stamps["modules loaded"]
    kernel_zero = host_init - up_init  # host time when the guest's clock read 0
    return {
        "firmware+load": kernel_zero,
        "kernel to /init": up_init,
        "modules": up_modules - up_init,
        "agent+namespaces": ready - (kernel_zero + up_modules),
    }


def restore_phases(v) -> dict[str, float]:
    """Split a warm start into phases from the Vm's timestamps.

    :return: seconds spent in: QEMU starting until its sockets answer (it
        loads the kernel file named by -kernel even when restoring), loading
        the saved device state (migrate-incoming until paused, then cont), the
        agent's first answer, the device-dax namespaces listed."""
    return {
        "QEMU start": v.connected_at - v.started_at,
        "device state in": v.restored_at - v.connected_at,
        "agent answers": v.answered_at - v.restored_at,
        "namespaces": v.ready_at - v.answered_at,
    }


def bench_boot(kernel_names: Sequence[str], runs: int) -> int:
    """Cold boot and warm start (restore of the saved post-boot state) of
    each kernel, alternating in one run, QEMU start to ready; where the time
    goes in each; and a notebook's Lab.boot of the kernel (warm: restore +
    drgn attach)."""
    import dataclasses
    import os

    from . import launch, vm, warm
    from .api import Lab

    quiet = lambda *_: None  # noqa: E731
    print(f"boot: QEMU start to device-dax ready, cold boot vs warm start, {runs} runs each "
          f"in turns (accelerator: {vm.probe_accel(say=quiet)}; load average "
          f"{os.getloadavg()[0]:.1f})")
    for name in kernel_names:
        spec = launch.boot_spec(name, say=quiet)
        if spec.restore_from is None:
            print(f"  {name}: no warm start possible (a tree by path); skipped")
            continue
        made = warm.make_state(spec, say=quiet)
        cold_spec = dataclasses.replace(spec, restore_from=None)
        cold, hot, cold_phases, hot_phases, checks = [], [], [], [], []
        for _ in range(runs):
            with launch.start(cold_spec, say=quiet) as v:
                cold.append(v.time_to_ready)
                cold_phases.append(boot_phases(v.marks, v.time_to_ready))
            t = time.monotonic()
            with launch.start(spec, say=quiet) as v:
                assert v.spec.restore_from is not None, "the warm start fell back to a cold boot"
                started = time.monotonic() - t
                hot.append(v.time_to_ready)
                hot_phases.append(restore_phases(v))
                checks.append(started - (v.ready_at - t))
        labs, attaches = [], []
        for _ in range(runs):
            t = time.monotonic()
            with Lab.boot(name, say=quiet) as lab:
                labs.append(time.monotonic() - t)
                session = lab._session
                session.detach()
                t = time.monotonic()
                session.attach()  # drgn alone, on a guest that is ready
                attaches.append(time.monotonic() - t)
        mc, mh = statistics.median(cold), statistics.median(hot)
        print(f"  {name:<7} cold median {mc:.2f} s (min {min(cold):.2f}, max {max(cold):.2f})   "
              f"warm median {mh:.3f} s (min {min(hot):.3f}, max {max(hot):.3f})   "
              f"{mc / mh:.0f}x faster (targets: warm <= 0.25 s: {mh / 0.25:.2f}x of it; >= 10x)")
        rows = [(k, statistics.median(p[k] for p in cold_phases)) for k in cold_phases[0]]
        hrows = [(k, statistics.median(p[k] for p in hot_phases)) for k in hot_phases[0]]
        hrows.append(("check (release, devices, clock)", statistics.median(checks)))
        print(f"      {'cold boot':<34}{'warm start':<34}")
        for i in range(max(len(rows), len(hrows))):
            left = f"{rows[i][0]:<20} {rows[i][1]:6.2f} s" if i < len(rows) else ""
            right = f"{hrows[i][0]:<32} {hrows[i][1] * 1000:5.0f} ms" if i < len(hrows) else ""
            print(f"      {left:<34}{right}")
        print(f"      saved state: made once in {made['made_in_seconds']:.1f} s (its cold boot "
              f"{made['boot_seconds']:.1f} s, save {made['save_seconds'] * 1000:.0f} ms, copying "
              f"RAM and NVDIMM files {made['copy_seconds'] * 1000:.0f} ms), "
              f"{made['state_bytes'] // 1024} KiB of device state")
        lm = statistics.median(labs)
        print(f"      Lab.boot({name!r}) warm: median {lm:.2f} s (min {min(labs):.2f}; target "
              f"0.5 s: {lm / 0.5:.2f}x of it); drgn attaching alone (debug info load) "
              f"{statistics.median(attaches):.2f} s, overlapped with the restore")
    return 0


def bench_snapshot(kernel_name: str, runs: int) -> int:
    import numpy as np
    from drgn.helpers.linux.mm import page_flags, pfn_to_page

    from . import inspect
    from .session import Session

    t0 = time.monotonic()
    with Session.boot(kernel_name, say=lambda *_: None) as s:
        print(f"snapshot: kernel {kernel_name} ({s.vm.release}), booted in {time.monotonic() - t0:.1f} s")
        loads = []
        for _ in range(3):
            s.detach()
            t = time.perf_counter()
            s.attach()
            loads.append(time.perf_counter() - t)
        print(f"  attach + debug info load (vmlinux + {len(s.kernel.module_debug)} modules): "
              f"median {statistics.median(loads) * 1000:.0f} ms")
        dev = s.vm.device("4K")
        first, count = dev["start"] >> 12, dev["size"] >> 12
        prog = s.prog
        with s.stopped():
            bulk_times = []
            for _ in range(max(runs, 3)):
                t = time.perf_counter()
                bulk = inspect.read_pages(prog, first, count)
                bulk_times.append(time.perf_counter() - t)
            t = time.perf_counter()
            ref = np.empty(count, np.int64)
            mapc = np.empty(count, np.int64)
            flags = np.empty(count, np.uint64)
            for i in range(count):
                page = pfn_to_page(prog, first + i)
                ref[i] = page._refcount.counter.value_()
                mapc[i] = page._mapcount.counter.value_()
                flags[i] = page_flags(page).value_()
            per_page = time.perf_counter() - t
        same = (np.array_equal(ref, bulk.refcount) and np.array_equal(mapc, bulk.mapcount)
                and np.array_equal(flags, bulk.flags))
        best = min(bulk_times)
        print(f"  device {dev['name']}: {count} struct pages ({count * 4096 / (1 << 30):.2f} GiB of 4K pages)")
        print(f"  per-page drgn objects: {per_page:.2f} s ({per_page / count * 1e6:.1f} us/page)")
        print(f"  bulk read + numpy:     {best * 1000:.1f} ms best, "
              f"{statistics.median(bulk_times) * 1000:.1f} ms median of {len(bulk_times)} "
              f"(target 20 ms)")
        print(f"  speed-up: {per_page / best:.1f}x (target 100x); results identical: {same}")
        mib = count * dtype_size(prog) / (1 << 20)
        print(f"  bulk throughput: {mib:.1f} MiB in {best * 1000:.1f} ms = {mib / 1024 / best:.2f} GiB/s")
        return 0 if same else 1


def bench_compare(scenario: str, kernel_names: Sequence[str], runs: int) -> int:
    """Wall time of a whole compare (kernels cached, saved states made), cold
    boots and warm starts in turns, where a warm compare's time goes, and the
    latency of one step (agent action + snapshot + console sync)."""
    from pathlib import Path

    from .experiment import run_experiment

    from . import timeline as tl

    run_experiment(Path(scenario), kernel_names, say=lambda *_: None)  # saved states made
    walls: dict[bool, list[float]] = {True: [], False: []}
    step_seconds, steps_total, plain_steps, judge = [], [], [], []
    for _ in range(runs):
        # the same scenario without the reads only the verdicts need (the
        # kind of kernel, who holds each folio), alternating with full runs
        plain = run_experiment(Path(scenario), kernel_names, say=lambda *_: None,
                               verdict_reads=False)
        st = plain.frames["steps"]
        plain_steps += list(st[st["step"] > 0]["seconds"])
        for cold in (True, False):
            t = time.perf_counter()
            exp = run_experiment(Path(scenario), kernel_names, say=lambda *_: None, cold=cold)
            walls[cold].append(time.perf_counter() - t)
            steps = exp.frames["steps"]
            if not cold:
                step_seconds += list(steps[steps["step"] > 0]["seconds"])
                steps_total.append(float(steps["seconds"].sum()))
        t = time.perf_counter()
        tl.check_invariants(exp.frames["timeline"], exp.frames["steps"])
        judge.append(time.perf_counter() - t)
    print(f"compare {Path(scenario).name} on {','.join(kernel_names)}: {runs} runs each, "
          f"cold and warm in turns")
    for cold, label, target in ((True, "cold boots ", 20.0), (False, "warm starts", 2.0)):
        med = statistics.median(walls[cold])
        print(f"  wall time, {label}: median {med:.2f} s (min {min(walls[cold]):.2f}, max "
              f"{max(walls[cold]):.2f}); target {target:g} s: {med / target:.2f}x of target")
    print(f"  of a warm compare, the steps and their snapshots: median "
          f"{statistics.median(steps_total):.2f} s; the rest is per kernel: restore, drgn "
          f"attach (debug info), close; and frames, diff and invariants")
    step_med = statistics.median(step_seconds)
    print(f"  one step (action + snapshot): median {step_med * 1000:.0f} ms over "
          f"{len(step_seconds)} steps (max {max(step_seconds) * 1000:.0f} ms); "
          f"target 100 ms: {step_med / 0.1:.2f}x of target")
    plain_med = statistics.median(plain_steps)
    print(f"  one step without the verdict reads: median {plain_med * 1000:.0f} ms; with "
          f"them {step_med * 1000:.0f} ms ({step_med / plain_med:.2f}x); judging the run "
          f"(every invariant): median {statistics.median(judge) * 1000:.0f} ms")
    return 0


def bench_compare_parallel(scenario: str, kernel_names: Sequence[str], runs: int) -> int:
    """Wall time of a whole compare (kernels cached, saved states made) with
    its kernels one after the other against side by side (one thread a
    kernel), cold boots and warm starts, in turns; and whether both give the
    same timelines (addresses aside: a cold boot's mmap addresses vary)."""
    from pathlib import Path

    from .experiment import run_experiment

    def compare(jobs: int, cold: bool):
        return run_experiment(Path(scenario), kernel_names, say=lambda *_: None, cold=cold,
                              jobs=jobs)

    compare(len(kernel_names), False)  # saved states made
    walls: dict[tuple[bool, int], list[float]] = {}
    same = True
    for _ in range(runs):
        for cold in (True, False):
            timelines = []
            for jobs in (1, len(kernel_names)):
                t = time.perf_counter()
                exp = compare(jobs, cold)
                walls.setdefault((cold, jobs), []).append(time.perf_counter() - t)
                # a cold boot's mmap addresses differ from boot to boot (ASLR)
                timelines.append(exp.frames["timeline"].drop(columns=["vaddr"]))
            same = same and timelines[0].equals(timelines[1])
    print(f"compare {Path(scenario).name} on {','.join(kernel_names)}: {runs} runs each, "
          f"in turn (--jobs 1) and side by side (--jobs {len(kernel_names)}), cold and warm")
    for cold, label in ((True, "cold boots "), (False, "warm starts")):
        seq = statistics.median(walls[(cold, 1)])
        par = statistics.median(walls[(cold, len(kernel_names))])
        print(f"  {label}: in turn median {seq:.2f} s (min {min(walls[(cold, 1)]):.2f}), side by "
              f"side median {par:.2f} s (min {min(walls[(cold, len(kernel_names))]):.2f}): "
              f"{seq / par:.2f}x")
    print(f"  timelines identical (vaddr aside): {same}")
    return 0 if same else 1


def bench_build(runs: int = 3) -> int:
    """Building Debian's linux-source-6.12 with the lab's configuration: cold
    (empty object directory, ccache bypassed: every object compiled and
    stored), warm (ccache, after `make clean`), one touched file
    (mm/memremap.c), and QEMU start to ready of the result (median of
    *runs*). Uses its own object directory; prints the machine's load average
    around the cold build, which other work on the machine slows down."""
    import os
    import shutil

    from . import build, launch, vm
    from .cache import cache_root
    from .model import KernelArtifacts

    quiet = lambda *_: None
    tree = build.debian_source_tree()
    obj = cache_root() / "build" / "bench" / "obj"
    log = obj.parent / "build.log"
    shutil.rmtree(obj, ignore_errors=True)
    obj.mkdir(parents=True)
    log.write_text("")
    print(f"build: {tree.name} with lab/data/kernel/devdax-lab.config, {os.cpu_count()} cores, "
          f"CC={build._cc()}")
    t = time.monotonic()
    build.configure(tree, obj, log, say=quiet)
    configured = time.monotonic() - t
    load = os.getloadavg()[0]
    cold = build.make(tree, obj, ["bzImage"], log, say=quiet, env={"CCACHE_RECACHE": "1"})
    objects = sum(1 for _ in obj.rglob("*.o"))
    print(f"  configure (tinyconfig + fragment) {configured:.1f} s")
    print(f"  cold build          {cold:7.1f} s  (target 300 s: {cold / 300:.2f}x of target); "
          f"{objects} objects; load average {load:.2f} before, {os.getloadavg()[0]:.2f} after")
    build.make(tree, obj, ["clean"], log, say=quiet)
    warm = build.make(tree, obj, ["bzImage"], log, say=quiet)
    print(f"  warm (ccache) build {warm:7.1f} s  (target 30 s: {warm / 30:.2f}x of target)")
    touched = tree / "mm" / "memremap.c"
    st = touched.stat()
    try:
        touched.touch()
        one = build.make(tree, obj, ["bzImage"], log, say=quiet)
    finally:  # the tree's identity (file mtimes) stays that of its registered kernel
        os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns))
    print(f"  one file touched    {one:7.1f} s  (target 10 s: {one / 10:.2f}x of target)")
    vmlinux = obj / "vmlinux"
    print(f"  vmlinux {vmlinux.stat().st_size / 1e6:.0f} MB, "
          f"bzImage {(obj / 'arch/x86/boot/bzImage').stat().st_size / 1e6:.1f} MB")
    kernel = KernelArtifacts(
        name="bench-build", vmlinux=vmlinux, vmlinuz=obj / "arch" / "x86" / "boot" / "bzImage",
        release=(obj / "include" / "config" / "kernel.release").read_text().strip(), root=obj)
    times = []
    for _ in range(runs):
        with launch.boot(kernel, say=quiet) as v:
            times.append(v.time_to_ready)
    med = statistics.median(times)
    print(f"  QEMU start to ready {med:7.2f} s  median of {runs} (min {min(times):.2f}, max "
          f"{max(times):.2f}; target 2 s: {med / 2:.2f}x of target; "
          f"accelerator {vm.probe_accel(say=quiet)})")
    return 0


def dtype_size(prog) -> int:
    import drgn

    return drgn.sizeof(prog.type("struct page"))


def _cycle_times(agent, addr: int, pages: int, reps: int) -> list[float]:
    """Seconds per cycle of: write-fault *pages* 4K pages at *addr*, then
    MADV_DONTNEED them (every page mapped and unmapped once)."""
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        agent.touch("a", [addr + i * 4096 for i in range(pages)], write=True)
        agent.madvise("a", addr, pages * 4096, 4)  # MADV_DONTNEED
        times.append(time.perf_counter() - t)
    return times


def bench_events(kernel_name: str, runs: int, scenario: str = "scenarios/fork-share.toml") -> int:
    """Watchpoints: the cost of a hit with and without a stack, the cost to
    code that touches no watched memory, whether it lasts after the
    watchpoints are gone, and a scenario with and without watches."""
    import os

    from .runner import run_scenario
    from .scenario import load_scenario
    from .session import Session

    pages, reps, cycles = 64, 40, 20 * max(1, runs)
    load = os.getloadavg()[0]
    print(f"events: {kernel_name}, TCG, 1 vCPU, {pages}-page cycles (write-fault + DONTNEED), "
          f"load average {load:.1f}")
    with Session.boot(kernel_name, events=True, say=lambda *_: None) as s:
        a, dev, w = s.agent, s.vm.device(4096), s.watcher
        watched = a.mmap("a", dev["name"], pages * 4096, offset=0)
        other = a.mmap("a", dev["name"], pages * 4096, offset=64 << 20)  # other vmemmap pages
        first = dev["start"] // 4096

        def other_ms(times: list[float] | None = None) -> tuple[float, float]:
            ts = times if times is not None else _cycle_times(a, other, pages, reps)
            return min(ts) * 1e3, statistics.median(ts) * 1e3

        def series() -> list[float]:
            """Medians of 40 cycles every 5 s for 30 s: the guest's own drift."""
            out = []
            for _ in range(6):
                out.append(other_ms()[1])
                time.sleep(5)
            return out

        control = series()
        # none and 2 watchpoints measured in turns, so that drift of the
        # machine's load falls on both alike
        none, two = [], []
        for _ in range(4):
            none += _cycle_times(a, other, pages, reps)
            w.watch(first)
            two += _cycle_times(a, other, pages, reps)
            w.unwatch()  # nothing left: the stub is let go as well
        rows = [("no watchpoints", *other_ms(none)), ("2 watchpoints (one folio)", *other_ms(two))]
        for i in range(pages):
            w.watch(first + i)
        rows.append((f"{len(w.counters)} watchpoints ({pages} folios)", *other_ms()))
        base = rows[0][1] / 1e3  # fastest cycle without watchpoints

        def hits(n: int) -> tuple[int, float, float]:
            h0, s0, t = w.stats.hits, w.stats.handling_seconds, time.perf_counter()
            for _ in range(n):
                _cycle_times(a, watched, pages, 1)
            wall, n_hits = time.perf_counter() - t, w.stats.hits - h0
            return n_hits, (wall - n * base) / n_hits * 1e3, (w.stats.handling_seconds - s0) / n_hits * 1e3

        n, wall, handling = hits(cycles)
        print(f"  hit without stack: {wall:.3f} ms wall, {handling:.3f} ms handling on the host "
              f"({n} hits)")
        for i in range(pages):
            w.watch(first + i, stacks=True)
        n2, wall2, handling2 = hits(3)
        print(f"  hit with stack:    {wall2:.3f} ms wall, {handling2:.3f} ms handling "
              f"({n2} hits; {wall2 / wall:.1f}x)")
        with s.stopped():
            lost = sum(r["lost"] not in (0, None) for r in w.reconcile())
        print(f"  {len(w.events)} events, accounting: {lost} counter(s) with lost changes")
        w.unwatch()
        rows.append((f"all removed, after {w.stats.hits} hits", *other_ms()))
        after = series()
        print("  code that touches no watched memory (ms per cycle, min / median):")
        for label, lo, med in rows:
            print(f"    {label:34s} {lo:6.2f} / {med:6.2f}   ({lo / rows[0][1]:.2f}x / "
                  f"{med / rows[0][2]:.2f}x)")
        print("  medians every 5 s for 30 s, before any watch: "
              + " ".join(f"{m:.2f}" for m in control))
        print("  the same after every watch was removed:       "
              + " ".join(f"{m:.2f}" for m in after)
              + f"   (mean {statistics.mean(after) / statistics.mean(control):.2f}x)")
    sc = load_scenario(scenario)
    for mode in (None, "counts", "stacks"):
        times = []
        for _ in range(max(1, runs)):
            with Session.boot(kernel_name, events=bool(mode), say=lambda *_: None) as s:
                t = time.perf_counter()
                result = run_scenario(s, sc, events=mode)
                times.append(time.perf_counter() - t)
        print(f"  {sc.name} steps, watches {mode or 'off'}: {statistics.median(times):.2f} s "
              f"median of {len(times)} ({len(result.events)} events)")
    return 0


def bench_dump(kernel_names: Sequence[str], runs: int) -> int:
    """A whole-guest vmcore (QMP dump-guest-memory): its size and time, and
    reading it back (open with debug info, the devdax report) with no VM."""
    import tempfile
    from pathlib import Path

    from .inspect.core import Core, dump_guest_memory
    from .session import Session

    for name in kernel_names:
        with Session.boot(name, say=lambda *_: None) as s, \
                tempfile.TemporaryDirectory(prefix="devdax-dump-") as tmp:
            vmcore = Path(tmp) / "vmcore"
            times, size = [], 0
            for _ in range(max(1, min(runs, 3))):
                info = dump_guest_memory(s.vm.qmp, vmcore)
                times.append(info.seconds)
                size = info.size
            t = time.perf_counter()
            core = Core.open(vmcore, s.kernel)
            opened = time.perf_counter() - t
            t = time.perf_counter()
            core.report("devdax")
            devdax = time.perf_counter() - t
            del core
            print(f"dump: kernel {name} ({s.vm.release}): {size / 2**30:.2f} GiB ELF vmcore, "
                  f"median {statistics.median(times):.1f} s (min {min(times):.1f}, "
                  f"max {max(times):.1f}, {len(times)} runs); open with debug info "
                  f"{opened * 1000:.0f} ms; devdax report on the dump {devdax:.2f} s")
    return 0


SWEEP_SCENARIOS = ["scenarios/fault-4k.toml", "scenarios/fork-share.toml",
                   "scenarios/fault-2m.toml", "scenarios/pin-longterm.toml"]


def bench_sweep(patterns: Sequence[str], kernel_names: Sequence[str], slots: int = 2) -> int:
    """:func:`_bench_sweep` of the cells as a sweep runs them by default
    (from the saved state) and booted cold: a warm cell is mostly the run's
    own Python and drgn on the host, a cold one mostly the guest's boot (one
    busy core under TCG), so the two bound the speed-up differently."""
    status = 0
    for cold in (False, True):
        status |= _bench_sweep(patterns, kernel_names, slots, cold=cold)
    return status


def _bench_sweep(patterns: Sequence[str], kernel_names: Sequence[str], slots: int = 2, *,
                 cold: bool = False) -> int:
    """Cells per minute of a sweep with *slots* VM slots against a loop that
    runs the same cells one after the other (each cell the same child
    process, `lab.sweep_cluster.run_cell`), after one shared preparation
    (kernels, images, NVDIMM files, warm states). The sweep's time includes
    starting and closing its local cluster and writing its outputs (dataset,
    sweep.json, sweep.html): what a user waits for. Also the host CPU a cell
    of the loop used (user + system of its processes over its wall time):
    more than one core a cell caps what *slots* cores can give."""
    import json
    import tempfile
    from pathlib import Path

    from . import kernels
    from .sweep import check_kernels, find_scenarios, plan_cells
    from .sweep_cluster import prepare_local, run_cell, run_sweep

    quiet = lambda *_: None
    cells = plan_cells(find_scenarios(patterns),
                       check_kernels(kernel_names, kernels.known_kernels()), cold=cold)
    prepare_local(cells, say=quiet)
    with tempfile.TemporaryDirectory(prefix="devdax-lab-bench-sweep-") as tmp:
        t0, cpu0 = time.monotonic(), os.times()
        loop = [run_cell(cell, Path(tmp) / "loop", retries=0) for cell in cells]
        loop_s, cpu1 = time.monotonic() - t0, os.times()
        t0 = time.monotonic()
        swept = run_sweep(cells, Path(tmp) / "sweep", workers=slots, retries=0, prepare=False,
                          say=quiet)
        sweep_s = time.monotonic() - t0
        about = json.loads((Path(tmp) / "sweep" / "sweep.json").read_text())
    verdicts = [(s["verdict"], t["verdict"]) for s, t in zip(loop, swept, strict=True)]
    n = len(cells)
    mean = lambda rows: statistics.mean(r["sweep_seconds"] for r in rows)  # noqa: E731
    cores = (cpu1.children_user + cpu1.children_system
             - cpu0.children_user - cpu0.children_system) / loop_s
    print(f"sweep, {'cold boots' if cold else 'warm starts'}: {n} cells "
          f"({len({c.scenario for c in cells})} scenarios x {len({c.kernel for c in cells})} "
          "kernels)")
    print(f"  sequential loop: {loop_s:.1f} s, {60 * n / loop_s:.1f} cells/min "
          f"(a cell {loop_s / n:.2f} s on average, using {cores:.2f} cores of host CPU)")
    print(f"  sweep, {slots} slots: {sweep_s:.1f} s, {60 * n / sweep_s:.1f} cells/min "
          f"(cluster start and outputs included); a cell {mean(swept):.2f} s on average "
          f"(alone: {mean(loop):.2f} s), the cluster started in "
          f"{about['cluster_start_seconds']:.1f} s")
    busy = sum(r["sweep_seconds"] for r in swept) / slots
    print(f"  ratio: {loop_s / sweep_s:.2f}x; the sweep's slots were busy with cells "
          f"{busy:.1f} s each, the other {sweep_s - busy:.1f} s went to the cluster "
          f"(start, close, tasks reaching the workers) and the outputs")
    if any(a != b for a, b in verdicts):
        print(f"  verdicts differ between the two: {verdicts}")
        return 1
    return 0


def main(args) -> int:
    if args.what == "sweep":
        return bench_sweep(args.scenarios or SWEEP_SCENARIOS, args.kernels.split(","))
    if args.what == "dump":
        return bench_dump(args.kernels.split(","), args.runs)
    if args.what == "boot":
        return bench_boot(args.kernels.split(","), args.runs)
    if args.what == "snapshot":
        return bench_snapshot(args.kernels.split(",")[0], args.runs)
    if args.what == "compare":
        return bench_compare(args.scenario, args.kernels.split(","), args.runs)
    if args.what == "compare-parallel":
        return bench_compare_parallel(args.scenario, args.kernels.split(","), args.runs)
    if args.what == "build":
        return bench_build(min(args.runs, 3))
    if args.what == "events":
        return bench_events(args.kernels.split(",")[-1], args.runs)
    raise AssertionError(args.what)
