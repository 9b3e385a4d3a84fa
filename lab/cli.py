"""``devdax-lab``: the command line. Each subcommand parses its arguments and
calls the library. ``main`` is the one place where errors become a line on
stderr and an exit status: a ``lab.errors.LabError`` carries its own (2: bad
input, 1: the guest, QEMU or a tool failed), an interrupt is 130."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Sequence

from .errors import EXIT_INTERNAL, EXIT_INTERRUPTED, LabError, Terminated, UserError
from .model import DEFAULT_DAX, PUD_LAYOUT

__all__ = ["main"]


def _dax_layout(args) -> tuple:
    return PUD_LAYOUT if getattr(args, "pud", False) else DEFAULT_DAX


def cmd_kernels(args) -> int:
    from . import kernels

    rows = [kernels.status(name) for name in kernels.known_kernels()]
    print(f"{'NAME':<8} {'STATE':<8} {'RELEASE':<24} DESCRIPTION")
    for st in rows:
        print(f"{st.name:<8} {st.state:<8} {st.release or '-':<24} {st.description}")
    return 0


def cmd_fetch(args) -> int:
    from . import kernels
    from .progress import bars

    for name in args.names:
        k = kernels.fetch(name, progress=bars(), force=args.force)
        print(f"{name}: {k.release} cached at {k.root}")
    return 0


def cmd_kernel_build(args) -> int:
    from . import build
    from .progress import bars

    k = build.build_kernel(args.tree, args.patch, args.name, progress=bars(),
                           say=lambda line: print(line, file=sys.stderr, flush=True))
    print(f"{k.name}: {k.release} at {k.root} (use --kernel {k.name})")
    return 0


def cmd_prepare(args) -> int:
    """Fetch kernels, build their images and the prepared NVDIMM files."""
    from .launch import boot_inputs, resolve_kernel
    from .progress import bars

    for name in args.names:
        k = resolve_kernel(name, progress=bars()).artifacts
        inputs = boot_inputs(k, _dax_layout(args))
        print(f"{name}: {k.release} ready (image {inputs.initrd.stat().st_size // 1024} KiB)")
    return 0


def _to_stderr(line: str) -> None:
    """Progress of a --show-command (accelerator probe, preparing files):
    stdout carries only the command lines."""
    print(line, file=sys.stderr, flush=True)


def _print_command(spec, label: str | None = None) -> None:
    """The exact command a plan starts (what `Vm.launch` runs), with the
    run directory it makes at start called RUN_DIR."""
    from . import vm

    if label:
        print(f"# {label}")
    print(shlex.join(vm.launch_command(spec)))
    copies = ""
    if spec.restore_from is not None:
        copies = (f"; then QMP: migrate-set-capabilities x-ignore-shared, migrate-incoming "
                  f"exec:cat {spec.restore_from}/state, cont")
        if not (spec.restore_from / "manifest.json").exists():
            copies += (" (the state is saved first, once, by a cold boot of the same line "
                       "without -incoming and with share=on files in RUN_DIR)")
    elif spec.nvdimm_sources and not spec.nvdimms_in_place:
        copies = (f"; RUN_DIR/nvdimmN.img are sparse copies of "
                  f"{spec.nvdimm_sources[0].parent}/nvdimmN.img")
    print(f"# RUN_DIR: a private directory made at start ({vm.run_parent()}/{vm.RUN_PREFIX}*)"
          + copies)


def _show_scenario_commands(scenario_path: str, names: Sequence[str], watch, cold: bool) -> int:
    """--show-command of run and compare: each kernel's boot as the run would
    start it (the scenario decides the devices and whether events are on)."""
    from pathlib import Path

    from .experiment import boot_options, resolve_kernels
    from .progress import bars
    from .scenario import load_scenario
    from .session import Session

    scenario = load_scenario(Path(scenario_path))
    for choice in resolve_kernels(names, progress=bars()):
        spec = Session.plan(choice, progress=bars(), say=_to_stderr, cold=cold,
                            **boot_options(scenario, watch))
        _print_command(spec, f"{scenario.name} on {choice.spelling}:")
    return 0


def _print_devices(v) -> None:
    for d in v.devices:
        start = d["start"]
        print(f"  {d['name']:<8} align {_size(d['align']):>4}  size {_size(d['size']):>6}  "
              f"phys {start:#x}-{start + d['size'] - 1:#x}  ({d.get('region') or '?'})")


def _size(n: int) -> str:
    from .model import format_size

    for unit, name in ((1 << 30, "G"), (1 << 20, "M"), (1 << 10, "K")):
        if n >= unit and n % (unit // 16 or 1) == 0:
            value = n / unit
            return f"{value:g}{name}" if value == int(value) else f"{value:.2f}{name}"
    return format_size(n)


def cmd_boot(args) -> int:
    from . import launch, vm
    from .progress import bars

    dax = _dax_layout(args)
    names = [k for k in args.kernel.split(",") if k]
    if args.show_command or args.shell:
        if len(names) != 1:
            raise UserError(f"--shell and --show-command take one kernel, got {args.kernel!r}")
        spec = launch.boot_spec(names[0], dax=dax, shell=args.shell, cold=args.cold,
                                progress=bars(),
                                say=_to_stderr if args.show_command else print)
        if args.show_command:
            _print_command(spec)
            return 0
        print("devdax-lab: guest console follows; exit or Ctrl-D powers the guest off, "
              "Ctrl-A X quits QEMU", flush=True)
        with vm.Vm(spec) as v:
            v.wait_ready(args.timeout)
            return v.interact()
    for name in names:
        t0 = time.monotonic()
        with launch.boot(name, dax=dax, progress=bars(), cold=args.cold,
                         ready_timeout=args.timeout) as v:
            how = "restored" if v.spec.restore_from else "booted"
            print(f"{name}: Linux {v.release}, {how}, ready in {v.time_to_ready:.2f} s "
                  f"({v.spec.accel}); device-dax namespaces:")
            _print_devices(v)
        print(f"{name}: shut down cleanly ({time.monotonic() - t0:.1f} s in all)")
    return 0


def _write_experiment(exp, out) -> None:
    from .experiment import write_experiment

    f = exp.frames
    path = write_experiment(exp, out)
    print(f"devdax-lab: wrote {out}/timeline.parquet, timeline.csv, meta.json and {path}")
    if "accounting" in f:
        from .timeline import accounting_problems

        lost, gone = accounting_problems(f["accounting"])
        verdict = "holds" if not len(lost) else f"found {len(lost)} lost change(s) (kind 'lost')"
        if len(gone):
            verdict += f"; {len(gone)} watched counter(s) gone with their struct page"
        print(f"devdax-lab: {int((f['events']['kind'] == 'write').sum())} counter change(s) "
              f"recorded in events.parquet; accounting {verdict}")
    if exp.violations:
        print(f"devdax-lab: {len(exp.violations)} invariant violation(s), listed in the report")


def _writeup(run_dir, out) -> None:
    from .writeup import write_writeup

    paths = write_writeup(run_dir, out)
    print(f"devdax-lab: wrote {' and '.join(str(p) for p in paths)}")


def cmd_writeup(args) -> int:
    _writeup(args.run_dir, args.out or args.run_dir)
    return 0


def cmd_run(args) -> int:
    from pathlib import Path

    from .experiment import run_experiment
    from .progress import bars

    if args.show_command:
        return _show_scenario_commands(args.scenario, [args.kernel], args.watch, args.cold)
    dump_at = None
    if args.dump_at is not None:
        from .inspect.core import parse_dump_at

        dump_at = parse_dump_at(args.dump_at)
    exp = _maybe_judged(args, lambda: run_experiment(
        Path(args.scenario), [args.kernel], progress=bars(), events=args.watch,
        cold=args.cold, dump_at=dump_at, dump_dir=Path(args.out)))
    _write_experiment(exp, args.out)
    if args.writeup:
        _writeup(args.out, args.out)
    return _judge(exp) if args.check else 0


def cmd_inspect(args) -> int:
    from .api import Lab

    core = Lab.open_core(args.core, args.kernel)
    asked = False
    for pfn in args.folio or ():
        print(core.report("folio", pfn), end="\n\n")
        asked = True
    for pfn in args.pgmap or ():
        print(core.report("pgmap", pfn), end="\n\n")
        asked = True
    for pid, address in args.pte or ():
        print(core.report("pte", pid, address), end="\n\n")
        asked = True
    if args.devdax or not asked:
        print(core.report("devdax"))
    return 0


def _number(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (decimal or 0x...)") from None


def cmd_compare(args) -> int:
    from pathlib import Path

    from .experiment import run_experiment
    from .progress import bars

    names = [k for k in args.kernels.split(",") if k]
    if len(names) < 2:
        raise UserError(f"--kernels needs at least two kernels separated by commas, got {args.kernels!r}")
    if args.show_command:
        return _show_scenario_commands(args.scenario, names, args.watch, args.cold)
    exp = _maybe_judged(args, lambda: run_experiment(
        Path(args.scenario), names, progress=bars(), events=args.watch,
        cold=args.cold, jobs=args.jobs))
    _write_experiment(exp, args.out)
    if args.writeup:
        _writeup(args.out, args.out)
    for line in exp.differences:
        print(f"  {line}")
    return _judge(exp) if args.check else 0


def _maybe_judged(args, run):
    """*run*, under verdict rules (a failure of the kernel is 125) with --check."""
    from .experiment import verdict

    return verdict(run) if getattr(args, "check", False) else run()


def _judge(exp) -> int:
    """The verdict of a finished experiment: 0, or VerdictFailed (1) with the
    first failure (all of them are in the report and violations/expectations.parquet)."""
    from .errors import VerdictFailed

    failures = exp.failures
    if failures:
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        raise VerdictFailed(failures[0] + more)
    n = 0 if exp.expectations is None else len(exp.expectations)
    print(f"devdax-lab: verdict: every invariant and {n} expectation(s) hold")
    return 0


def cmd_check(args) -> int:
    """Run a scenario on each kernel and answer with an exit status."""
    import tempfile
    from pathlib import Path

    from .experiment import run_experiment
    from .progress import bars

    names = [k for k in args.kernel.split(",") if k]
    exp = _maybe_judged(args, lambda: run_experiment(
        Path(args.scenario), names, progress=bars(), say=lambda *_: None, jobs=args.jobs))
    if args.out:
        _write_experiment(exp, args.out)
    else:
        with tempfile.TemporaryDirectory(prefix="devdax-lab-check-") as tmp:
            _write_experiment(exp, tmp)
    return _judge(exp)


def cmd_sweep(args) -> int:
    """Every scenario on every kernel as Dask tasks; the sweep's outputs."""
    from pathlib import Path

    from . import kernels
    from .progress import bars
    from .scenario import load_scenario
    from .sweep import check_kernels, check_out_dir, find_scenarios, plan_cells
    from .sweep_cluster import run_sweep

    scenarios = find_scenarios(args.scenarios)
    for path in scenarios:  # bad input before anything starts, with --scheduler too
        load_scenario(path)
    names = check_kernels(args.kernels.split(","), kernels.known_kernels())
    out = Path(args.out)
    check_out_dir(out)
    if args.retries < 0:
        raise UserError(f"--retries {args.retries}: needs 0 or more")
    cells = plan_cells(scenarios, names, cold=args.cold)
    summaries = run_sweep(cells, out, scheduler=args.scheduler, workers=args.workers,
                          retries=args.retries, timeout=args.cell_timeout,
                          verbose=args.verbose, progress=bars(), say=_to_stderr)
    width = max(len(c.key) for c in cells)
    for s in summaries:
        why = s.get("first_failure") or s.get("reason")
        print(f"{s['scenario'] + '/' + s['kernel']:<{width}}  {s['verdict']:<10}"
              + (f"  {why}" if why and s["verdict"] != "holds" else ""))
    counts = {}
    for s in summaries:
        counts[s["verdict"]] = counts.get(s["verdict"], 0) + 1
    print(f"devdax-lab: {', '.join(f'{n} {v}' for v, n in counts.items())}; wrote "
          f"{out}/sweep.html, sweep.json and the dataset {out}/data/")
    return 0


def cmd_bisect(args) -> int:
    """Bisect a git tree with a scenario's verdict (lab.bisect)."""
    from .bisect import bisect, result_lines
    from .progress import bars

    outcome = bisect(args.tree, args.good, args.bad, args.scenario, out=args.out,
                     kernel_args=shlex.split(args.kernel_args) if args.kernel_args else (),
                     keep_kernels=args.keep_kernels, progress=bars(),
                     say=lambda line: print(f"devdax-lab: {line}", flush=True),
                     build_say=lambda line: print(line, file=sys.stderr, flush=True))
    for line in result_lines(outcome):
        print(line)
    return outcome.exit_status


def cmd_doctor(args) -> int:
    from .doctor import run_checks

    problems = 0
    for check in run_checks():
        mark = "ok  " if check.ok else "FAIL"
        print(f"[{mark}] {check.name}: {check.detail}")
        if not check.ok:
            problems += 1
            print(f"       fix: {check.fix}")
    print("all prerequisites present" if not problems else f"{problems} problem(s) found")
    return 0 if not problems else 2


def cmd_bench(args) -> int:
    from . import bench

    return bench.main(args)


def cmd_notebook(args) -> int:
    """JupyterLab on 127.0.0.1 with a notebook open, until Ctrl-C."""
    import getpass
    import signal
    import socket
    from pathlib import Path

    from .jupyter import JupyterServer, notebook_ipynb, resolve_notebook

    root = Path(__file__).resolve().parent.parent
    if not (root / "notebooks").is_dir():
        root = Path.cwd()
    if args.show_command:
        from .session import Session

        print(shlex.join(JupyterServer(root, port=args.port).launch_command()))
        print("# JupyterLab; its token, config and runtime dirs are private (made at start)")
        _print_command(Session.plan(args.kernel, say=_to_stderr),
                       f"what Lab.boot({args.kernel!r}) starts in it:")
        return 0

    def interrupt(signum, frame):  # a closed ssh session or a kill: stop cleanly as on Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGHUP, interrupt)
    open_path = None
    if not args.no_open:
        ipynb, written = notebook_ipynb(resolve_notebook(root / "notebooks", args.name))
        open_path = ipynb.relative_to(root).as_posix()
        print(f"devdax-lab: wrote {open_path} from its .py" if written else
              f"devdax-lab: opening {open_path} (newer than its .py: delete it to start afresh)")
    with JupyterServer(root, port=args.port, open_path=open_path) as server:
        print(f"devdax-lab: JupyterLab is running (pid {server.proc.pid}); open\n\n"
              f"    {server.url}\n")
        print(f"From another machine: ssh -L 8888:127.0.0.1:{server.port} "
              f"{getpass.getuser()}@{socket.gethostname()}\n"
              f"then open the address above with port 8888 instead of {server.port}.")
        print("Ctrl-C stops JupyterLab, its kernels and their VMs.", flush=True)
        try:
            status = server.wait()
        except KeyboardInterrupt:
            print("\ndevdax-lab: stopping JupyterLab", flush=True)
            return 0
        print(f"devdax-lab: JupyterLab exited by itself (status {status}):\n"
              + "\n".join(server.tail), file=sys.stderr)
        return 1


def _add_writeup_argument(parser) -> None:
    parser.add_argument(
        "--writeup", action="store_true",
        help="also write repro.c and report.txt (as devdax-lab writeup OUT does)")


def _add_watch_argument(parser) -> None:
    parser.add_argument(
        "--watch", nargs="?", const="counts", choices=["counts", "stacks"], default=None,
        help="also record every change of the watched folios' counters (watchpoints, "
             "events.parquet); 'stacks' adds each writer's kernel stack (about 15x slower a hit)")


def _add_cold_argument(parser) -> None:
    parser.add_argument("--cold", action="store_true",
                        help="boot the kernel instead of starting from its saved post-boot state")


def _jobs(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of kernels, 1 or more")
    return n


def _add_jobs_argument(parser) -> None:
    parser.add_argument("--jobs", type=_jobs, default=None, metavar="N",
                        help="kernels booted at once (default: all, at most one per core; "
                             "1: one after the other)")


def _add_show_command_argument(parser) -> None:
    parser.add_argument("--show-command", action="store_true",
                        help="print the exact command lines it would start, and start nothing")


def _add_check_argument(s) -> None:
    s.add_argument(
        "--check", action="store_true",
        help="exit with the verdict: 0 every expectation and invariant holds, 1 one fails, "
             "125 the kernel could not be tested (as devdax-lab check)")


DESCRIPTION = """\
devdax-lab boots real Debian kernels (and kernels you build from your own
tree) in QEMU with emulated NVDIMMs exposed as device-dax, drives a small
agent in the guest through a scenario of mmap, fault, fork, pin and munmap
steps, and reads struct folio, struct dev_pagemap and the page tables with
drgn from the host after every step. Runs are written as data
(timeline.parquet/.csv), an offline report.html and, on request, a bug
write-up (repro.c, report.txt); compare runs a scenario on several kernels
and lists where they differ.

The first run downloads the kernels (devdax-lab kernels lists them); everything
is cached under $DEVDAX_LAB_CACHE (default ~/.cache/devdax-lab)."""

EPILOG = """\
examples:
  devdax-lab doctor                       # what is missing, and how to fix it
  devdax-lab boot --kernel after          # boot a kernel, list its device-dax devices
  devdax-lab compare scenarios/fork-share.toml --out out/fork-share
  devdax-lab notebook                     # JupyterLab with the quickstart notebook

devdax-lab COMMAND --help describes each command."""


def _command(sub, name: str, summary: str, description: str, examples: Sequence[str]):
    """A subcommand with a one-line summary (in the list of commands), a
    description and examples (in its own --help)."""
    return sub.add_parser(
        name, help=summary, description=description,
        epilog="example" + ("s" if len(examples) > 1 else "") + ":\n"
        + "\n".join(f"  {e}" for e in examples),
        formatter_class=argparse.RawDescriptionHelpFormatter)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("devdax-lab")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="devdax-lab", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    loud = p.add_mutually_exclusive_group()
    loud.add_argument("-v", "--verbose", action="store_true",
                      help="say more: debug logging, and the traceback behind an error")
    loud.add_argument("-q", "--quiet", action="store_true",
                      help="no progress bars (results and errors are still printed)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = _command(
        sub, "kernels", "list the known kernels and their cache state (offline)",
        "List the kernels of the catalog (lab/data/kernel/catalog.toml) and those built\n"
        "with devdax-lab kernel build: name, cache state, release and description.\n"
        "Reads only the cache: no network.",
        ["devdax-lab kernels"])
    s.set_defaults(func=cmd_kernels)

    s = _command(
        sub, "fetch", "download and cache kernels (image, modules, debug info)",
        "Download a catalog kernel's Debian packages (image, modules, debug info:\n"
        "about 1.2 GB each), keep what the lab needs (about 0.4 GB) in the cache and\n"
        "verify it. A kernel already cached is checked, not downloaded again.",
        ["devdax-lab fetch before after", "devdax-lab fetch after --force"])
    s.add_argument("names", nargs="+", metavar="NAME", help="catalog kernel names (see kernels)")
    s.add_argument("--force", action="store_true", help="fetch again even if cached")
    s.set_defaults(func=cmd_fetch)

    s = _command(
        sub, "kernel", "kernels of your own: build a (patched) tree",
        "Kernels of your own. kernel build builds a Linux tree, optionally with\n"
        "patches applied to a private copy, with the lab's configuration and\n"
        "registers it under a name that --kernel accepts everywhere.",
        ["devdax-lab kernel build --tree ~/src/linux --patch fix.patch --name fixed"])
    ksub = s.add_subparsers(dest="kernel_command", required=True, metavar="ACTION")
    s = _command(
        ksub, "build", "build a kernel tree with the lab's config and register it",
        "Build a kernel tree with make tinyconfig plus lab/data/kernel/devdax-lab.config\n"
        "(out of tree, ccache when installed) and register it. The tree is never\n"
        "modified: patches are applied to a private copy. The same tree, patches and\n"
        "config are built once.",
        ["devdax-lab kernel build --tree ~/src/linux",
         "devdax-lab kernel build --tree ~/src/linux --patch 0001-fix.patch --name fixed",
         "devdax-lab compare scenarios/fork-share.toml --kernels after,fixed --out out/fix"])
    s.add_argument("--tree", required=True, help="a Linux source tree (git or not); never modified")
    s.add_argument("--patch", action="append", default=[], metavar="FILE",
                   help="a patch to apply first (git am, or patch -p1); repeatable")
    s.add_argument("--name", help="name for --kernel (default: the tree's name, + hash if patched)")
    s.set_defaults(func=cmd_kernel_build)

    s = _command(
        sub, "prepare", "fetch kernels, build guest images and NVDIMM files",
        "Everything a boot needs, made ahead of time: the kernel (fetched if it is\n"
        "a catalog kernel), its guest initramfs with the agent, and the prepared\n"
        "NVDIMM files. make lab runs it for before and after.",
        ["devdax-lab prepare before after", "devdax-lab prepare after --pud"])
    s.add_argument("names", nargs="+", metavar="NAME",
                   help="kernel names (catalog or built) or paths to built trees")
    s.add_argument("--pud", action="store_true", help="also prepare the 1G-aligned device")
    s.set_defaults(func=cmd_prepare)

    s = _command(
        sub, "boot", "boot a kernel, print its devices and time to ready",
        "Boot each kernel (from its saved post-boot state when there is one), print\n"
        "its release, time to ready and device-dax namespaces, and shut it down.\n"
        "--shell gives the guest console instead; --show-command prints the QEMU\n"
        "command line and starts nothing.",
        ["devdax-lab boot --kernel before,after", "devdax-lab boot --kernel after --shell",
         "devdax-lab boot --kernel after --show-command"])
    s.add_argument("--kernel", required=True, help="before, after, or a comma list")
    s.add_argument("--shell", action="store_true", help="interactive guest console (Ctrl-A X quits)")
    s.add_argument("--show-command", action="store_true", help="print the QEMU command line only")
    _add_cold_argument(s)
    s.add_argument("--pud", action="store_true", help="add a 1G-aligned device (needs 1G pages)")
    s.add_argument("--timeout", type=float, default=120.0,
                   help="seconds to wait for the guest to be ready (default 120)")
    s.set_defaults(func=cmd_boot)

    s = _command(
        sub, "run", "run a scenario on one kernel: timeline, report, meta",
        "Run a scenario on one kernel and write, in --out: timeline.parquet and\n"
        ".csv (the counters of every watched page after every step), report.html\n"
        "(opens offline), meta.json, and the verdicts of the scenario's\n"
        "expectations and the lab's invariants.",
        ["devdax-lab run scenarios/fault-4k.toml --kernel after --out out/fault-4k",
         "devdax-lab run scenarios/pin-longterm.toml --kernel before --out out/pin --watch",
         "devdax-lab run scenarios/fork-share.toml --kernel after --out out/fs --dump-at 4"])
    s.add_argument("scenario", help="a scenario file (see docs/scenarios.md)")
    s.add_argument("--kernel", required=True, help="before, after, or another known kernel")
    s.add_argument("--out", required=True, help="output directory (made if missing)")
    _add_watch_argument(s)
    _add_writeup_argument(s)
    _add_show_command_argument(s)
    _add_cold_argument(s)
    _add_check_argument(s)
    s.add_argument("--dump-at", metavar="STEP|complaint",
                   help="write the guest's memory to OUT/vmcore-KERNEL-stepN after step N "
                        "(0: before the first) or after the first step the kernel complained "
                        "at; read it with devdax-lab inspect --core")
    s.set_defaults(func=cmd_run)

    s = _command(
        sub, "inspect", "read a guest memory dump with the lab's readers (no VM)",
        "Read a vmcore written by `run --dump-at` or Lab.dump with the kernel's\n"
        "debug info and print the drgn plugin's reports: a folio's counters, a\n"
        "dev_pagemap, a page-table walk, the device-dax devices (the default).",
        ["devdax-lab inspect --core out/vmcore-after-step4 --kernel after",
         "devdax-lab inspect --core out/vmcore-after-step4 --kernel after --folio 0x100002"])
    s.add_argument("--core", required=True, metavar="VMCORE", help="the dump (ELF vmcore)")
    s.add_argument("--kernel", required=True, help="the dumped kernel: before, after, or another "
                   "known kernel (its debug info is used)")
    s.add_argument("--folio", type=_number, action="append", metavar="PFN",
                   help="show the folio holding PFN (repeatable)")
    s.add_argument("--pgmap", type=_number, action="append", metavar="PFN",
                   help="show the dev_pagemap covering PFN (repeatable)")
    s.add_argument("--pte", type=_number, nargs=2, action="append", metavar=("PID", "ADDRESS"),
                   help="walk PID's page table to ADDRESS (repeatable)")
    s.add_argument("--devdax", action="store_true",
                   help="list device-dax devices and their busy folios (the default)")
    s.set_defaults(func=cmd_inspect)

    s = _command(
        sub, "compare", "run a scenario on several kernels and report the differences",
        "Run a scenario on each kernel, the kernels booted side by side (one VM a\n"
        "core; --jobs 1 runs them in turn, with the same results), and write one\n"
        "run directory with every kernel's timeline, a report that sets them side\n"
        "by side, and the differences, which are also printed.",
        ["devdax-lab compare scenarios/fork-share.toml --out out/fork-share",
         "devdax-lab compare scenarios/pin-longterm.toml --kernels after,fixed --writeup "
         + "--out out/pin",
         "devdax-lab compare scenarios/fork-share.toml --jobs 1 --out out/fork-share"])
    s.add_argument("scenario", help="a scenario file (see docs/scenarios.md)")
    s.add_argument("--kernels", default="before,after", help="comma list (default before,after)")
    s.add_argument("--out", required=True, help="output directory (made if missing)")
    _add_watch_argument(s)
    _add_writeup_argument(s)
    _add_show_command_argument(s)
    _add_cold_argument(s)
    _add_check_argument(s)
    _add_jobs_argument(s)
    s.set_defaults(func=cmd_compare)

    s = _command(
        sub, "check", "is this kernel right? exit 0, 1 or 125, as git bisect run wants",
        "Run a scenario and answer with the exit status: 0 every expectation and\n"
        "invariant holds, 1 one fails (the first is printed), 125 the kernel could\n"
        "not be tested (it did not build or boot): git bisect run's codes.",
        ["devdax-lab check scenarios/fork-share.toml --kernel after",
         "git bisect run devdax-lab check scenarios/fork-share.toml --kernel ~/src/linux"])
    s.add_argument("scenario", help="a scenario file (see docs/scenarios.md)")
    s.add_argument("--kernel", required=True, help="a kernel name or tree; a comma list for several")
    s.add_argument("--out", help="also write the run directory here")
    _add_jobs_argument(s)
    s.set_defaults(func=cmd_check, check=True)

    s = _command(
        sub, "sweep", "every scenario on every kernel, in parallel on Dask: a verdict matrix",
        "Run each scenario on each kernel (one cell each, as run --check does) as\n"
        "Dask tasks: on a local cluster with one VM slot per core (as memory allows),\n"
        "or on an existing cluster with --scheduler. Writes, in --out, each cell's run\n"
        "directory (SCENARIO/KERNEL/), one partitioned parquet dataset per frame\n"
        "(data/FRAME/kernel=K/scenario=S/), sweep.json (a summary per cell) and\n"
        "sweep.html (the verdict matrix and what differs between the kernels). A cell\n"
        "that fails, cannot boot or times out is a result, not an error of the sweep.",
        ["devdax-lab sweep --scenarios 'scenarios/*.toml' --kernels before,after --out out/sweep",
         "devdax-lab sweep --scenarios scenarios/fault-4k.toml scenarios/fork-share.toml "
         "--kernels before,after --out out/s --scheduler tcp://10.0.0.1:8786"])
    s.add_argument("--scenarios", nargs="+", required=True, metavar="GLOB",
                   help="scenario files or globs (quote them so the shell leaves them)")
    s.add_argument("--kernels", required=True, help="comma list of kernels (names or tree paths)")
    s.add_argument("--out", required=True, help="a new or empty directory (or an earlier sweep's)")
    s.add_argument("--scheduler", metavar="ADDRESS",
                   help="an existing Dask scheduler (tcp://HOST:8786) whose workers have a "
                        "'vm' resource (dask worker ADDRESS --resources vm=N)")
    s.add_argument("--workers", type=int, metavar="N",
                   help="local VM slots (default: one per core, as memory allows)")
    s.add_argument("--retries", type=int, default=1,
                   help="more attempts for a cell that gave no verdict (125 or a crash of the "
                        "run; never a 1 or 2); default 1")
    s.add_argument("--cell-timeout", type=float, default=1800.0, metavar="SECONDS",
                   help="stop a cell's run after this long and record it (default 1800)")
    s.add_argument("--cold", action="store_true",
                   help="boot every cell's kernel from scratch instead of from its saved "
                        "state (as run --cold; slower)")
    s.set_defaults(func=cmd_sweep)

    s = _command(
        sub, "bisect", "find the commit of a git tree that breaks a scenario's verdict",
        "Bisect a git kernel tree between a good and a bad commit with git's own\n"
        "bisection (git rev-list --bisect-all; nothing is written into your\n"
        "repository): each candidate is built with the lab's config in the lab's\n"
        "worktree of the tree (ccache), registered as bisect-<commit>, and judged\n"
        "as devdax-lab check judges it: good, bad, or skipped when it does not\n"
        "build or boot. Prints the first bad commit, its report and why it fails.\n"
        "Exit 0 found, 125 only skipped commits left (cannot tell), 1 the bad end\n"
        "holds after all, 2 bad input.\n"
        "Candidates are built and tested one at a time (a build uses every core).",
        ["devdax-lab bisect --tree ~/src/linux --good v6.12 --bad HEAD scenarios/pin-longterm.toml",
         ("devdax-lab bisect --tree ~/src/linux --good v6.12 --bad fix-wip --out out/bisect "
          "--kernel-args 'init_on_free=1' scenarios/fork-share.toml")])
    s.add_argument("scenario", help="a scenario file whose verdict tells good from bad")
    s.add_argument("--tree", required=True, help="a git kernel tree; never modified")
    s.add_argument("--good", required=True, action="append", metavar="REV",
                   help="a commit the scenario holds on (repeatable)")
    s.add_argument("--bad", required=True, metavar="REV", help="a commit the scenario fails on")
    s.add_argument("--out", help="where the candidates' run directories go "
                   "(default: ./bisect-SCENARIO)")
    s.add_argument("--kernel-args", metavar="ARGS",
                   help="extra guest kernel command-line words, in one quoted string")
    s.add_argument("--keep-kernels", action="store_true",
                   help="keep the candidate kernels registered (~100 MB each) instead of "
                        "removing them at the end")
    s.set_defaults(func=cmd_bisect)

    s = _command(
        sub, "writeup", "a run directory as a bug report: repro.c and report.txt",
        "Turn a run directory into a bug report: repro.c, a standalone C reproducer\n"
        "of the same steps in the same processes, and report.txt, plain text in 80\n"
        "columns for a mailing list.",
        ["devdax-lab writeup out/fork-share", "devdax-lab writeup out/pin --out out/pin-report"])
    s.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by run or compare --out")
    s.add_argument("--out", help="where to write them (default: RUN_DIR)")
    s.set_defaults(func=cmd_writeup)

    s = _command(
        sub, "doctor", "check every prerequisite and say how to fix what is missing",
        "Check every prerequisite (programs, static busybox and libc, the lab's data\n"
        "files, Python modules, the cache directory, free disk, /dev/shm, KVM or\n"
        "TCG) without touching the network; exit 2 if one is missing.",
        ["devdax-lab doctor"])
    s.set_defaults(func=cmd_doctor)

    s = _command(
        sub, "notebook", "JupyterLab on 127.0.0.1 with a notebook open (Ctrl-C stops)",
        "Start JupyterLab on 127.0.0.1 with a notebook of notebooks/ open (written\n"
        "from its jupytext .py source) and print its URL with the token. Ctrl-C\n"
        "stops it, its kernels and their VMs.",
        ["devdax-lab notebook", "devdax-lab notebook 02-fork-and-mapcount --port 8888"])
    s.add_argument("name", nargs="?", default="00-quickstart",
                   help="a notebook in notebooks/ (default 00-quickstart)")
    s.add_argument("--port", type=int, default=None, help="port (default: a free one)")
    s.add_argument("--no-open", action="store_true", help="open JupyterLab without a notebook")
    s.add_argument("--kernel", default="after",
                   help="with --show-command: the kernel whose Lab.boot to show (default after)")
    _add_show_command_argument(s)
    s.set_defaults(func=cmd_notebook)

    s = _command(
        sub, "bench", "benchmarks: boot, snapshot, compare, compare-parallel, build, events, sweep",
        "Measure and print figures (recorded in docs/BENCHMARKS.md): boot (time to\n"
        "ready, cold and warm), snapshot (bulk vs per-page reads), compare (a\n"
        "scenario's step latency), compare-parallel (a compare's kernels in turn vs\n"
        "side by side), build (a kernel build, cold and with ccache),\n"
        "events (the cost of watchpoints), dump (a guest vmcore: size, time, reading it),\n"
        "sweep (cells per minute of a 2-slot sweep against a sequential loop).",
        ["devdax-lab bench boot --kernels before,after --runs 3",
         "devdax-lab bench compare --scenario scenarios/fork-share.toml",
         "devdax-lab bench compare-parallel --runs 3",
         "devdax-lab bench sweep --scenarios scenarios/fault-4k.toml scenarios/fork-share.toml"])
    s.add_argument("what", choices=["boot", "snapshot", "compare", "compare-parallel", "build",
                                     "events", "dump", "sweep"],
                   help="what to measure")
    s.add_argument("--scenarios", nargs="+", metavar="GLOB",
                   help="sweep: the scenarios (default fault-4k, fork-share, fault-2m, "
                        "pin-longterm)")
    s.add_argument("--scenario", default="scenarios/fork-share.toml",
                   help="the scenario for compare and compare-parallel (default "
                        "scenarios/fork-share.toml)")
    s.add_argument("--kernels", default="before,after", help="comma list (snapshot uses the first)")
    s.add_argument("--runs", type=int, default=5, help="repetitions (default 5; build at most 3)")
    s.set_defaults(func=cmd_bench)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose:
        import logging

        logging.basicConfig(level=logging.DEBUG, format="%(name)s: %(message)s")
    from . import progress

    progress.set_quiet(args.quiet)
    _terminate_like_ctrl_c()
    try:
        return args.func(args)
    except LabError as exc:  # every lab error: one line (plus any console/log tail), no traceback
        if args.verbose:
            import traceback

            traceback.print_exc()
        print(f"devdax-lab: {str(exc) or type(exc).__name__}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print("devdax-lab: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated as exc:
        print(f"devdax-lab: stopped by {exc}: what it had started is stopped and removed",
              file=sys.stderr)
        return exc.exit_status
    except Exception as exc:  # a bug: its traceback, and a status no verdict uses
        import traceback

        traceback.print_exc()
        print(f"devdax-lab: internal error ({type(exc).__name__}: {exc}); the traceback above "
              "is for a bug report", file=sys.stderr)
        return EXIT_INTERNAL


def _terminate_like_ctrl_c() -> None:
    """SIGTERM and SIGHUP end a command the way Ctrl-C does: the exception
    unwinds every context manager (QEMU stopped, run directory removed)."""
    import signal

    def raise_terminated(signum, _frame):
        # once: a second SIGTERM (a Dask worker dying while its task stops
        # the run, systemd repeating itself) would abort the cleanup the
        # first one started, leaving the run directory behind
        for again in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(again, signal.SIG_IGN)
        raise Terminated(signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, raise_terminated)


if __name__ == "__main__":
    sys.exit(main())
