"""Write-ups that leave the lab: a standalone C reproducer (repro.c) and a
plain-text report for a mailing list (report.txt), made from a run directory.

A bug report is read by people who will never install the lab, so both files
stand alone. ``repro.c`` replays the scenario's steps in the same processes
with the same system calls as the guest agent makes (one generator per
action in :data:`C_STEPS`), prints one line per step and exits 0 only if
every step succeeded or failed exactly as in the lab run. ``report.txt`` says
what was run, the verdict, the steps, the counters at the steps where they
moved, the kernel's complaints, the writers of each change (when the run
watched them) and how to reproduce, in at most 80 columns.

:func:`read_run` is the only I/O besides :func:`write_writeup`; the
generators are pure functions of the :class:`RunData` it returns.
"""

from __future__ import annotations

import json
import shlex
import textwrap
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .errors import UserError
from .model import format_size
from .scenario import Scenario, validate_text

__all__ = [
    "CFLAGS",
    "C_STEPS",
    "RunData",
    "read_run",
    "report_sections",
    "report_txt",
    "repro_c",
    "trim_kernel_messages",
    "write_writeup",
]

#: how repro.c is meant to be built (and how the tests build it)
CFLAGS = ("-Wall", "-Wextra", "-Werror", "-O2", "-static")
WIDTH = 80
PAGE = 4096


@dataclass(frozen=True)
class RunData:
    """What a write-up is made from: the run directory's files.

    ``steps`` is the steps frame (one row per kernel and step, ``errno``
    null on success), ``timeline`` the timeline frame, ``complaints`` the
    kernel's complaints per step, ``events`` the watched counters' changes
    (None when the run watched nothing), ``violations`` the invariant
    violations (``violations.parquet``, else computed from the timeline:
    `lab.timeline.VIOLATION_COLUMNS`), ``expectations`` the scenario's
    ``[[expect]]`` judged (``expectations.parquet``, else judged here;
    `lab.expect.EXPECTATION_COLUMNS`).
    """

    path: Path
    meta: Mapping
    scenario: Scenario
    steps: pd.DataFrame
    timeline: pd.DataFrame
    complaints: pd.DataFrame
    events: pd.DataFrame | None
    violations: pd.DataFrame
    device: str
    expectations: pd.DataFrame | None = None
    signals: pd.DataFrame | None = None
    kernel_messages: pd.DataFrame | None = None

    @property
    def kernels(self) -> list[str]:
        """Kernel names in the order they ran."""
        return list(dict.fromkeys(self.steps["kernel"]))

    def release(self, kernel: str) -> str:
        return str(self.meta.get("kernels", {}).get(kernel, {}).get("release") or "?")


def read_run(run_dir: str | Path) -> RunData:
    """The files of a run directory (``devdax-lab run/compare --out``).

    :raises UserError: if it is not one (a missing file is named).
    """
    path = Path(run_dir)
    need = ["meta.json", "steps.parquet", "timeline.parquet"]
    missing = [n for n in need if not (path / n).is_file()]
    if missing:
        raise UserError(f"{path}: not a run directory (no {', '.join(missing)}); "
                        "make one with devdax-lab run or compare --out DIR")
    meta = json.loads((path / "meta.json").read_text())
    text = (meta.get("scenario") or {}).get("text")
    if not text:
        raise UserError(f"{path} holds no scenario (a notebook session saved with Lab.save?): "
                        "a write-up replays a scenario's steps; write them as a scenario file "
                        "and run it with devdax-lab run FILE --kernel K --out DIR --writeup")
    name = (meta["scenario"].get("name") or "scenario") + ".toml"
    scenario = validate_text(text, name)
    steps = pd.read_parquet(path / "steps.parquet")
    timeline = pd.read_parquet(path / "timeline.parquet")
    complaints = (pd.read_parquet(path / "complaints.parquet")
                  if (path / "complaints.parquet").is_file()
                  else pd.DataFrame(columns=["kernel", "step", "action", "kind", "text"]))
    events = pd.read_parquet(path / "events.parquet") if (path / "events.parquet").is_file() else None
    from . import timeline as tl

    if (path / "violations.parquet").is_file():
        violations = pd.read_parquet(path / "violations.parquet")
    else:
        violations = tl.df_violations(tl.check_invariants(timeline, steps))
    expectations = None
    if (path / "expectations.parquet").is_file():
        expectations = pd.read_parquet(path / "expectations.parquet")
    elif scenario.expect:
        from .expect import check_expectations

        frames = {"timeline": timeline, "steps": steps}
        for name in ("device", "processes"):
            if (path / f"{name}.parquet").is_file():
                frames[name] = pd.read_parquet(path / f"{name}.parquet")
        expectations = check_expectations(scenario.expect, frames, list(dict.fromkeys(steps["kernel"])))
    device = "dax0.0"
    if (path / "device.parquet").is_file():
        dev = pd.read_parquet(path / "device.parquet", columns=["device"])
        if len(dev):
            device = str(dev["device"].iloc[0])
    optional = {name: pd.read_parquet(path / f"{name}.parquet")
                for name in ("signals", "kernel_messages") if (path / f"{name}.parquet").is_file()}
    return RunData(path, meta, scenario, steps, timeline, complaints, events, violations, device,
                   expectations, **optional)


# -- repro.c ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Ctx:
    """Names of the scenario's things as C array indices."""

    procs: Mapping[str, int]
    maps: Mapping[str, int]
    pins: Mapping[str, int]
    pipes: Mapping[str, int]


@dataclass(frozen=True)
class CStep:
    """How one action becomes C: ``code(step, ctx)`` gives the statements
    run in the step's process (they set ``r.err`` to an errno, and
    ``r.value`` to what the lab's agent would answer); ``helpers`` are the
    support functions they call (emitted once, only when used)."""

    code: Callable
    helpers: tuple[str, ...] = ()


def _c_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=True)  # a valid C string literal for ASCII-escaped text


def _c_comment(s: str) -> str:
    return s.replace("*/", "* /")


def _range(step, ctx: _Ctx) -> str:
    a = step.args
    return f"maps[{ctx.maps[a['map']]}].addr + {a.get('offset', 0)}UL, {a['length']}UL"


def _code_mmap(step, ctx: _Ctx) -> str:
    a = step.args
    prot = "PROT_READ | PROT_WRITE" if a.get("write", True) else "PROT_READ"
    flags = "MAP_SHARED" if a.get("shared", True) else "MAP_PRIVATE"
    return (f"r.err = map_device({ctx.maps[a['name']]}, {a['length']}UL, {a.get('offset', 0)}UL, "
            f"{prot}, {flags});\n"
            f"r.value = (long long)(uintptr_t)maps[{ctx.maps[a['name']]}].addr;")


def _code_touch(step, ctx: _Ctx) -> str:
    a = step.args
    pages = ", ".join(map(str, a["pages"]))
    return (f"static const unsigned long pages[] = {{{pages}}};\n"
            f"r.err = touch_pages({ctx.maps[a['map']]}, pages, "
            f"sizeof pages / sizeof pages[0], {1 if a.get('write') else 0});")


def _code_fork(step, ctx: _Ctx) -> str:
    child = ctx.procs[step.args["child"]]
    return (f"pid_t pid = fork();\n"
            f"if (pid == 0)\n\tbecome({child}); /* the child serves as process "
            f"{step.args['child']} from now on */\n"
            f"r.err = pid < 0 ? errno : 0;\nr.value = pid;")


def _code_munmap(step, ctx: _Ctx) -> str:
    return f"r.err = munmap({_range(step, ctx)}) ? errno : 0;"


def _code_exit(step, ctx: _Ctx) -> str:
    return "r.value = getpid();\nexit_after_reply = 1;"


def _code_pin(step, ctx: _Ctx) -> str:
    return f"r.err = pin_range({ctx.pins[step.args['name']]}, {_range(step, ctx)});"


def _code_unpin(step, ctx: _Ctx) -> str:
    return f"r.err = unpin({ctx.pins[step.args['pin']]});"


def _code_splice(step, ctx: _Ctx) -> str:
    return f"r.err = splice_range({ctx.pipes[step.args['name']]}, {_range(step, ctx)}, &r.value);"


def _code_drain(step, ctx: _Ctx) -> str:
    return f"r.err = drain({ctx.pipes[step.args['splice']]}, &r.value);"


def _code_madvise(step, ctx: _Ctx) -> str:
    a = step.args
    return (f"r.err = madvise({_range(step, ctx)}, {a['advice_value']}) ? errno : 0; "
            f"/* MADV_{a['advice']} */")


def _code_mprotect(step, ctx: _Ctx) -> str:
    prot = " | ".join({"r": "PROT_READ", "w": "PROT_WRITE", "x": "PROT_EXEC"}[c]
                      for c in step.args["prot"]) or "PROT_NONE"
    return f"r.err = mprotect({_range(step, ctx)}, {prot}) ? errno : 0;"


def _code_mremap(step, ctx: _Ctx) -> str:
    a = step.args
    m = ctx.maps[a["map"]]
    flags = "MREMAP_MAYMOVE" if a.get("maymove") else "0"
    return (f"void *p = mremap(maps[{m}].addr, {a['old_length']}UL, {a['length']}UL, {flags});\n"
            f"r.err = p == MAP_FAILED ? errno : 0;\n"
            f"if (p != MAP_FAILED) {{\n\tmaps[{m}].addr = p;\n\tmaps[{m}].length = "
            f"{a['length']}UL;\n}}\nr.value = (long long)(uintptr_t)maps[{m}].addr;")


def _code_mlock(step, ctx: _Ctx) -> str:
    if step.args.get("onfault"):
        return f"r.err = mlock2({_range(step, ctx)}, MLOCK_ONFAULT) ? errno : 0;"
    return f"r.err = mlock({_range(step, ctx)}) ? errno : 0;"


def _code_munlock(step, ctx: _Ctx) -> str:
    return f"r.err = munlock({_range(step, ctx)}) ? errno : 0;"


def _code_snapshot(step, ctx: _Ctx) -> str:
    return "/* the lab took an extra snapshot here: nothing to do */"


def _code_kmsg(step, ctx: _Ctx) -> str:
    text = step.args["text"]
    return f"r.err = kmsg({_c_str(text if text.endswith(chr(10)) else text + chr(10))});"


#: one generator per action: the statements of its ``case`` in run_step()
C_STEPS: Mapping[str, CStep] = {
    "mmap": CStep(_code_mmap, ("map_device",)),
    "touch": CStep(_code_touch, ("touch_pages",)),
    "fork": CStep(_code_fork),
    "munmap": CStep(_code_munmap),
    "exit": CStep(_code_exit),
    "pin": CStep(_code_pin, ("pin_range",)),
    "unpin": CStep(_code_unpin, ("unpin",)),
    "splice": CStep(_code_splice, ("splice_range",)),
    "drain": CStep(_code_drain, ("drain",)),
    "madvise": CStep(_code_madvise),
    "mprotect": CStep(_code_mprotect),
    "mremap": CStep(_code_mremap),
    "mlock": CStep(_code_mlock),
    "munlock": CStep(_code_munlock),
    "snapshot": CStep(_code_snapshot),
    "kmsg": CStep(_code_kmsg, ("kmsg",)),
}

# Support functions, each the same system calls the guest agent makes for
# the action (lab/data/vm-images/agent/agent.c), so the kernel sees the same thing.
_HELPERS: dict[str, str] = {
    "map_device": r"""
/* mmap the device at an address aligned as the lab aligns it: reserve
 * length + align of PROT_NONE, map at the first aligned address inside. */
static int map_device(int m, size_t length, off_t offset, int prot, int flags)
{
	int fd = open(device_path, O_RDWR | O_CLOEXEC);
	if (fd < 0)
		return errno;
	void *p = mmap(NULL, length, prot, flags, fd, offset);
	if (p != MAP_FAILED && (uintptr_t)p % DEVICE_ALIGN) {
		munmap(p, length);
		char *resv = mmap(NULL, length + DEVICE_ALIGN, PROT_NONE,
				  MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
		p = MAP_FAILED;
		if (resv != MAP_FAILED) {
			uintptr_t lo = (uintptr_t)resv, hi = lo + length + DEVICE_ALIGN;
			uintptr_t start = (lo + DEVICE_ALIGN - 1) / DEVICE_ALIGN * DEVICE_ALIGN;
			p = mmap((void *)start, length, prot, flags | MAP_FIXED, fd, offset);
			if (p == MAP_FAILED) {
				int en = errno;
				munmap(resv, length + DEVICE_ALIGN);
				errno = en;
			} else {
				if (start > lo)
					munmap(resv, start - lo);
				if (hi > start + length)
					munmap((void *)(start + length), hi - (start + length));
			}
		}
	}
	int en = errno;
	close(fd); /* the mapping keeps the device open */
	if (p == MAP_FAILED)
		return en;
	maps[m].addr = p;
	maps[m].length = length;
	return 0;
}
""",
    "touch_pages": r"""
/* One byte store (write) or load per page: one fault each.  A SIGBUS or
 * SIGSEGV is reported as EFAULT, as the lab's agent does (on_signal). */
static int touch_pages(int m, const unsigned long *pages, size_t n, int write)
{
	static unsigned seq;
	unsigned char val = (unsigned char)(1 + seq++ % 255);
	if (sigsetjmp(fault_jmp, 1))
		return EFAULT;
	fault_armed = 1;
	for (size_t i = 0; i < n; i++) {
		volatile unsigned char *p = (volatile unsigned char *)maps[m].addr + pages[i] * 4096;
		if (write)
			*p = val;
		else
			(void)*p;
	}
	fault_armed = 0;
	return 0;
}
""",
    "pin_range": r"""
#ifndef __NR_io_uring_setup /* C libraries older than Linux 5.1's system calls */
#define __NR_io_uring_setup 425
#define __NR_io_uring_register 427
#endif

/* A long-term pin (FOLL_LONGTERM): register the range as an io_uring fixed
 * buffer.  The ring is never used for I/O. */
static int pin_range(int pin, char *addr, size_t length)
{
	struct io_uring_params params;
	memset(&params, 0, sizeof params);
	int fd = (int)syscall(__NR_io_uring_setup, 1, &params);
	if (fd < 0)
		return errno;
	struct iovec iov = {addr, length};
	if (syscall(__NR_io_uring_register, fd, IORING_REGISTER_BUFFERS, &iov, 1) < 0) {
		int en = errno;
		close(fd);
		return en;
	}
	rings[pin] = fd;
	return 0;
}
""",
    "unpin": r"""
/* Unregister before closing: closing alone drops the pins later, from a
 * workqueue. */
static int unpin(int pin)
{
	int rc = (int)syscall(__NR_io_uring_register, rings[pin], IORING_UNREGISTER_BUFFERS,
			      NULL, 0);
	int en = rc < 0 ? errno : 0;
	close(rings[pin]);
	return en;
}
""",
    "splice_range": r"""
/* vmsplice (no SPLICE_F_GIFT) into a non-blocking pipe: the pipe holds
 * page references until it is drained. */
static int splice_range(int pipe_no, char *addr, size_t length, long long *spliced)
{
	int *fds = pipes[pipe_no];
	if (pipe2(fds, O_CLOEXEC | O_NONBLOCK) < 0)
		return errno;
	fcntl(fds[1], F_SETPIPE_SZ, (int)(length + 2 * 4096)); /* best effort */
	struct iovec iov = {addr, length};
	*spliced = 0;
	while (iov.iov_len > 0) {
		ssize_t n = vmsplice(fds[1], &iov, 1, SPLICE_F_NONBLOCK);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && errno == EAGAIN && *spliced > 0)
			break;
		if (n <= 0)
			return n < 0 ? errno : EIO;
		*spliced += n;
		iov.iov_base = (char *)iov.iov_base + n;
		iov.iov_len -= (size_t)n;
	}
	return 0;
}
""",
    "drain": r"""
/* Read the pipe empty and close it: its page references go. */
static int drain(int pipe_no, long long *got)
{
	static char buf[65536];
	int *fds = pipes[pipe_no];
	close(fds[1]);
	*got = 0;
	for (;;) {
		ssize_t n = read(fds[0], buf, sizeof buf);
		if (n > 0)
			*got += n;
		else if (n < 0 && errno == EINTR)
			continue;
		else {
			int en = n < 0 ? errno : 0;
			close(fds[0]);
			return en;
		}
	}
}
""",
    "kmsg": r"""
static int kmsg(const char *text)
{
	int fd = open("/dev/kmsg", O_WRONLY | O_CLOEXEC);
	if (fd < 0)
		return errno;
	int en = write(fd, text, strlen(text)) < 0 ? errno : 0;
	close(fd);
	return en;
}
""",
}

_ERRNO_NAMES = ("EPERM", "ENOENT", "ESRCH", "EINTR", "EIO", "ENXIO", "E2BIG", "EBADF",
                "EAGAIN", "ENOMEM", "EACCES", "EFAULT", "EBUSY", "EEXIST", "ENODEV",
                "EINVAL", "EMFILE", "ENOSPC", "ENOSYS", "EOPNOTSUPP", "EOVERFLOW")


def _expectations(run: RunData) -> tuple[list[str], list[list[int]]]:
    """(kernel releases, per release the errno of each step, 0 = success)."""
    releases, table = [], []
    for kernel in run.kernels:
        rows = run.steps[(run.steps["kernel"] == kernel) & (run.steps["step"] > 0)]
        by_step = {int(r.step): (0 if pd.isna(r.errno) else int(r.errno))
                   for r in rows.itertuples()}
        releases.append(run.release(kernel))
        table.append([by_step.get(s.index, 0) for s in run.scenario.steps])
    return releases, table


# Signals repro.c tells apart (the C macro names, as signals.parquet spells them).
_SIGNALS = ("SIGBUS", "SIGSEGV")


def _expected_signals(run: RunData) -> list[list[str]]:
    """Per kernel, the signal (a C constant, "0" for none) some process got
    during each step of the run (signals.parquet; "-1", not compared, when
    the run directory has none)."""
    table = []
    if run.signals is None:
        return [["-1"] * len(run.scenario.steps) for _ in run.kernels]
    for kernel in run.kernels:
        got: dict[int, str] = {}
        if run.signals is not None and len(run.signals):
            sig = run.signals[run.signals["kernel"] == kernel]
            for r in sig.to_dict("records"):
                if r["signal"] in _SIGNALS:
                    got.setdefault(int(r["step"]), r["signal"])
        table.append([got.get(s.index, "0") for s in run.scenario.steps])
    return table


def _step_line(step) -> str:
    """What a step does, in words (also the label the lab showed)."""
    a = step.args
    what = {
        "mmap": lambda: (f"{step.proc}: {a['name']} = mmap {format_size(a['length'])} at device "
                         f"offset {format_size(a.get('offset', 0))}"),
        "touch": lambda: (f"{step.proc}: {'write' if a.get('write') else 'read'} "
                          f"{a['map']} page{'s' if len(a['pages']) > 1 else ''} "
                          f"{_pages(a['pages'])}"),
        "fork": lambda: f"{step.proc} forks {a['child']}",
        "exit": lambda: f"{step.proc} exits",
        "unpin": lambda: f"{step.proc}: unpin {a['pin']}",
        "drain": lambda: f"{step.proc}: drain {a['splice']}",
        "snapshot": lambda: "snapshot",
        "kmsg": lambda: f"kmsg {a['text']!r}",
        "mremap": lambda: (f"{step.proc}: mremap {a['map']} {format_size(a['old_length'])} -> "
                           f"{format_size(a['length'])}" + (" MAYMOVE" if a.get("maymove") else "")),
    }.get(step.action)
    if what:
        return what()
    extra = {"madvise": lambda: f" MADV_{a['advice']}",
             "mprotect": lambda: f" {a['prot'] or 'none'}",
             "pin": lambda: f" as {a['name']}", "splice": lambda: f" as {a['name']}",
             "mlock": lambda: " ONFAULT" if a.get("onfault") else ""}.get(step.action, lambda: "")()
    first = a.get("offset", 0) // PAGE
    n = a.get("length", 0) // PAGE
    span = f"page {first}" if n == 1 else f"pages {first}-{first + n - 1}"
    return f"{step.proc}: {step.action} {a['map']} {span}{extra}"


def _pages(pages: Sequence[int]) -> str:
    out, run_start, prev = [], None, None
    for p in list(pages) + [None]:
        if run_start is not None and p is not None and p == prev + 1:
            prev = p
            continue
        if run_start is not None:
            out.append(str(run_start) if prev == run_start else f"{run_start}-{prev}")
        run_start = prev = p
    return ", ".join(out)


def repro_c(run: RunData) -> str:
    """A standalone C program replaying the run's scenario (see module doc)."""
    sc = run.scenario
    procs: list[str] = []
    for s in sc.steps:
        for name in (s.proc, s.args.get("child") if s.action == "fork" else None):
            if name and name not in procs:
                procs.append(name)
    forked = {s.args["child"] for s in sc.steps if s.action == "fork"}
    ctx = _Ctx(procs={p: i for i, p in enumerate(procs)},
               maps={m: i for i, m in enumerate(sc.maps)},
               pins={s.args["name"]: i for i, s in enumerate(
                   [s for s in sc.steps if s.action == "pin"])},
               pipes={s.args["name"]: i for i, s in enumerate(
                   [s for s in sc.steps if s.action == "splice"])})
    missing = sorted({s.action for s in sc.steps} - set(C_STEPS))
    if missing:
        raise UserError(f"repro.c: no C generator for action(s) {', '.join(missing)} "
                        "(lab/writeup.py C_STEPS)")
    helpers = list(dict.fromkeys(h for s in sc.steps for h in C_STEPS[s.action].helpers))
    releases, expect = _expectations(run)
    nsteps = len(sc.steps)

    cases = []
    for s in sc.steps:
        body = C_STEPS[s.action].code(s, ctx)
        label = f" ({s.label})" if s.label and s.label != _step_line(s) else ""
        cases.append(f"\tcase {s.index}: {{ /* {_c_comment(_step_line(s))}{_c_comment(label)} */\n"
                     + textwrap.indent(body, "\t\t") + "\n\t\tbreak;\n\t}")
    step_rows = [f'\t{{{s.index}, {ctx.procs[s.proc] if s.proc else -1}, '
                 f'{ctx.procs[s.args["child"]] if s.action == "fork" else -1}, '
                 f'{_c_str(s.action)}, {_c_str(_step_line(s))}}},' for s in sc.steps]
    expect_rows = ["\t{" + ", ".join(map(str, row)) + "}," for row in expect]
    expect_sig_rows = ["\t{" + ", ".join(row) + "}," for row in _expected_signals(run)]
    desc = "\n".join(f" * {line}".rstrip() for line in
                     (sc.description or "").strip().splitlines())
    kernels_doc = "\n".join(f" *   {k}: Linux {r}" for k, r in zip(run.kernels, releases))
    device_path = f"/dev/{run.device}"
    uses = set(helpers)
    globals_ = [f"#define NPROCS {len(procs)}", f"#define NMAPS {max(len(ctx.maps), 1)}",
                f"#define NSTEPS {nsteps}", f"#define NKERNELS {len(releases)}",
                f"#define DEVICE_ALIGN {sc.device}UL"]
    decls = [("static struct { char *addr; size_t length; } maps[NMAPS] "
             "__attribute__((unused)); /* this process's view of each mapping */")]
    if "pin_range" in uses or "unpin" in uses:
        decls.append(f"static int rings[{max(len(ctx.pins), 1)}]; /* io_uring fds of the pins */")
    if "splice_range" in uses or "drain" in uses:
        decls.append(f"static int pipes[{max(len(ctx.pipes), 1)}][2];")
    proc_names = ", ".join(_c_str(p) for p in procs)
    forked_flags = ", ".join("1" if p in forked else "0" for p in procs)
    release_names = ", ".join(_c_str(r) for r in releases)
    errnames = "\n".join(f"\tE({n})," for n in _ERRNO_NAMES)
    sources = f"{sc.name}.toml" + (f" (sha256 {sc.sha256[:16]})" if sc.sha256 else "")
    return _C_TEMPLATE.format(
        title=_c_comment(sc.title or sc.name), source=_c_comment(sources),
        desc=_c_comment(desc) or " * (no description)", kernels=_c_comment(kernels_doc),
        device_path=device_path, align=format_size(sc.device),
        globals="\n".join(globals_), decls="\n".join(decls),
        proc_names=proc_names, forked=forked_flags, releases=release_names,
        expect="\n".join(expect_rows), steps="\n".join(step_rows), errnames=errnames,
        expect_sig="\n".join(expect_sig_rows),
        helpers="".join(_HELPERS[h] for h in helpers), cases="\n".join(cases))


_C_TEMPLATE = r"""/*
 * repro.c - {title}
 *
 * Generated by `devdax-lab writeup` from the scenario {source}.
{desc}
 *
 * The lab ran it on:
{kernels}
 *
 * Needs a device-dax device aligned {align} (default {device_path}) and root.
 * Build: gcc -Wall -Wextra -Werror -O2 -static -o repro repro.c
 * Run:   ./repro [{device_path}] [--pause SECONDS]
 * With --pause, after each step "repro: step N done" goes to the kernel log
 * and the program waits SECONDS: time to read the counters (drgn, crash).
 * Each step runs in the named process (a child of this program; fork steps
 * fork them as the lab did) and prints one line.  Exit status: 0 when every
 * step succeeded or failed with the same errno as in the lab run, 1 when
 * some step did not, 2 when the reproducer could not start.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/io_uring.h>
#include <poll.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

#ifndef MLOCK_ONFAULT
#define MLOCK_ONFAULT 1
#endif

{globals}

static const char *device_path = "{device_path}";
static const char *const proc_names[NPROCS] = {{{proc_names}}};
/* 1: the process is made by a fork step, not started by this program */
static const int proc_forked[NPROCS] = {{{forked}}};
static const char *const releases[NKERNELS] = {{{releases}}};
/* errno of each step in the lab run, per kernel (0: it succeeded) */
static const int expected[NKERNELS][NSTEPS] = {{
{expect}
}};
/* the signal a process of the scenario received during each step (0: none;
 * -1: the run did not record signals) */
static const int expected_sig[NKERNELS][NSTEPS] = {{
{expect_sig}
}};
static const struct {{
	int index, proc, child; /* proc -1: this program does it itself */
	const char *action, *what;
}} steps[NSTEPS] = {{
{steps}
}};

{decls}
static int me = -1;                /* which process this is */
static int ctl[NPROCS][2], res[2]; /* step numbers in, results out */
static int exit_after_reply;
static double pause_seconds;

struct result {{
	int step, err;
	long long value;
	int sig, code, lsb; /* the last signal the step brought (sig 0: none) */
}};

/* A fault in a touch ends the touch (EFAULT).  Any other SIGBUS/SIGSEGV is
 * recorded and the process goes on, as the lab's agent does: the SIGBUS
 * memory_failure() sends the caller of madvise(MADV_HWPOISON) arrives as the
 * system call returns, with nothing to retry.  A real fault outside a touch
 * comes back at once; the third time at one address the default (death)
 * is restored. */
static sigjmp_buf fault_jmp;
static volatile sig_atomic_t fault_armed, sig_no, sig_code, sig_lsb, repeats;
static void *volatile last_addr;

static void on_signal(int sig, siginfo_t *si, void *uc)
{{
	(void)uc;
	sig_no = sig;
	sig_code = si->si_code;
	sig_lsb = sig == SIGBUS && (si->si_code == BUS_MCEERR_AR || si->si_code == BUS_MCEERR_AO)
		  ? si->si_addr_lsb : 0;
	if (fault_armed) {{
		fault_armed = 0;
		siglongjmp(fault_jmp, 1);
	}}
	if (si->si_code <= 0)
		return;
	if (si->si_addr == last_addr) {{
		if (++repeats >= 3)
			signal(sig, SIG_DFL);
	}} else {{
		last_addr = si->si_addr;
		repeats = 1;
	}}
}}

static const char *signame(int sig, int code)
{{
	if (sig == SIGBUS)
		return code == BUS_MCEERR_AR ? "SIGBUS (BUS_MCEERR_AR)"
		       : code == BUS_MCEERR_AO ? "SIGBUS (BUS_MCEERR_AO)" : "SIGBUS";
	return sig == SIGSEGV ? "SIGSEGV" : "a signal";
}}

#define E(name) {{name, #name}}
static const struct {{
	int no;
	const char *name;
}} errnames[] = {{
{errnames}
}};

static const char *errname(int no)
{{
	for (size_t i = 0; i < sizeof errnames / sizeof errnames[0]; i++)
		if (errnames[i].no == no)
			return errnames[i].name;
	return "E?";
}}
{helpers}
static void become(int proc) __attribute__((noreturn));

static struct result run_step(int step)
{{
	struct result r = {{step, 0, 0, 0, 0, 0}};
	switch (step) {{
{cases}
	}}
	return r;
}}

/* A process of the scenario: run the steps the coordinator sends. */
static void become(int proc)
{{
	me = proc;
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_sigaction = on_signal;
	sa.sa_flags = SA_SIGINFO;
	sigaction(SIGBUS, &sa, NULL);
	sigaction(SIGSEGV, &sa, NULL);
	for (;;) {{
		int step;
		ssize_t n = read(ctl[me][0], &step, sizeof step);
		if (n < 0 && errno == EINTR)
			continue;
		if (n != (ssize_t)sizeof step || step == 0)
			_exit(0);
		sig_no = 0;
		struct result r = run_step(step);
		r.sig = sig_no;
		r.code = sig_code;
		r.lsb = sig_lsb;
		if (write(res[1], &r, sizeof r) != (ssize_t)sizeof r)
			_exit(3);
		if (exit_after_reply)
			_exit(0);
	}}
}}

/* As the lab's agent does: an exit step is over when the process is gone
 * (its mappings torn down), not when it said it would go. */
static void wait_gone(pid_t pid)
{{
	for (int i = 0; i < 5000 && kill(pid, 0) == 0; i++) {{
		struct timespec ts = {{0, 1000000}};
		nanosleep(&ts, NULL);
	}}
}}

/* --pause: a line in the kernel log marks the moment, then a wait. */
static void pause_after(int step)
{{
	char line[64];
	int fd = open("/dev/kmsg", O_WRONLY | O_CLOEXEC);
	int n = snprintf(line, sizeof line, "<4>repro: step %d done\n", step);
	if (fd >= 0) {{
		if (write(fd, line, (size_t)n) < 0)
			perror("repro: /dev/kmsg");
		close(fd);
	}}
	struct timespec ts = {{(time_t)pause_seconds,
			      (long)((pause_seconds - (double)(time_t)pause_seconds) * 1e9)}};
	nanosleep(&ts, NULL);
}}

int main(int argc, char **argv)
{{
	int devices = 0;
	for (int a = 1; a < argc; a++) {{
		if (strcmp(argv[a], "--pause") == 0 && a + 1 < argc) {{
			pause_seconds = atof(argv[++a]);
		}} else if (argv[a][0] != '-' && !devices++) {{
			device_path = argv[a];
		}} else {{
			fprintf(stderr, "usage: %s [DEVICE] [--pause SECONDS]   (default %s)\n", argv[0],
				device_path);
			return 2;
		}}
	}}
	setvbuf(stdout, NULL, _IOLBF, 0);
	int fd = open(device_path, O_RDWR);
	if (fd < 0) {{
		fprintf(stderr, "repro: open %s: %s\n", device_path, strerror(errno));
		return 2;
	}}
	close(fd);
	struct utsname u;
	uname(&u);
	int k = NKERNELS - 1;
	for (int i = 0; i < NKERNELS; i++)
		if (strcmp(u.release, releases[i]) == 0)
			k = i;
	printf("repro: Linux %s, device %s; expecting what the lab saw on %s\n", u.release,
	       device_path, releases[k]);

	signal(SIGCHLD, SIG_IGN); /* the kernel reaps exited processes */
	signal(SIGPIPE, SIG_IGN);
	pid_t pids[NPROCS] = {{0}};
	if (pipe(res) < 0) {{
		perror("repro: pipe");
		return 2;
	}}
	for (int i = 0; i < NPROCS; i++) {{
		if (pipe(ctl[i]) < 0) {{
			perror("repro: pipe");
			return 2;
		}}
	}}
	for (int i = 0; i < NPROCS; i++) {{
		if (proc_forked[i])
			continue;
		pids[i] = fork();
		if (pids[i] < 0) {{
			perror("repro: fork");
			return 2;
		}}
		if (pids[i] == 0)
			become(i);
	}}

	int mismatches = 0;
	for (int i = 0; i < NSTEPS; i++) {{
		struct result r;
		int p = steps[i].proc;
		if (p < 0) {{
			r = run_step(steps[i].index);
		}} else {{
			int step = steps[i].index;
			struct pollfd pfd = {{res[0], POLLIN, 0}};
			if (write(ctl[p][1], &step, sizeof step) != (ssize_t)sizeof step ||
			    poll(&pfd, 1, 120000) != 1 || read(res[0], &r, sizeof r) != (ssize_t)sizeof r) {{
				printf("step %d (%s) %s: no answer from process %s\n", step, steps[i].action,
				       steps[i].what, proc_names[p]);
				return 2;
			}}
			if (strcmp(steps[i].action, "exit") == 0 && r.err == 0) {{
				wait_gone((pid_t)r.value);
				pids[p] = 0;
			}}
			if (steps[i].child >= 0 && r.err == 0)
				pids[steps[i].child] = (pid_t)r.value;
		}}
		int want = expected[k][i], want_sig = expected_sig[k][i];
		int same = r.err == want && (want_sig < 0 || r.sig == want_sig);
		mismatches += !same;
		if (r.err)
			printf("step %d (%s) %s: %s (errno %d: %s)", steps[i].index, steps[i].action,
			       steps[i].what, errname(r.err), r.err, strerror(r.err));
		else
			printf("step %d (%s) %s: ok", steps[i].index, steps[i].action, steps[i].what);
		if (r.sig)
			printf(", %s", signame(r.sig, r.code));
		if (r.sig && r.lsb)
			printf(" addr_lsb %d", r.lsb);
		printf("; %s", same ? "as in the lab" : "DIFFERENT from the lab");
		if (r.err != want)
			printf(" (the lab got %s)", want ? errname(want) : "success");
		if (want_sig >= 0 && r.sig != want_sig)
			printf(" (the lab's process got %s)", want_sig ? signame(want_sig, 0) : "no signal");
		printf("\n");
		if (pause_seconds > 0)
			pause_after(steps[i].index);
	}}
	/* Processes still alive end here, as at the end of the lab's run. */
	for (int i = 0; i < NPROCS; i++) {{
		if (!pids[i])
			continue;
		int quit = 0;
		if (write(ctl[i][1], &quit, sizeof quit) == (ssize_t)sizeof quit)
			wait_gone(pids[i]);
	}}
	printf("repro: %d of %d steps as in the lab run\n", NSTEPS - mismatches, NSTEPS);
	return mismatches ? 1 : 0;
}}
"""


# -- report.txt ------------------------------------------------------------------

# Lines of a kernel splat that carry no information for the reader.
_NOISE = ("RAX:", "RBX:", "RCX:", "RDX:", "RSI:", "RDI:", "RBP:", "R08:", "R09:", "R10:",
          "R11:", "R12:", "R13:", "R14:", "R15:", "FS:", "CS:", "CR2:", "DR0:", "DR3:",
          "DR6:", "Code:", "Modules linked in:", "Hardware name:", "RSP:", "PKRU:", "</TASK>",
          "<TASK>", "---[ end trace")


def trim_kernel_messages(lines: Iterable[str], max_lines: int = 12) -> list[str]:
    """The useful lines of kernel messages: no timestamps, no register
    dumps, code bytes or module lists; call-trace frames without their
    offsets and without the unwinder's "?" guesses; at most *max_lines*."""
    from .console import strip_console_prefix

    out = []
    for line in lines:
        text = strip_console_prefix(str(line)).strip()
        if not text or text.startswith(_NOISE) or text.startswith("? "):
            continue  # "? frame": a guess of the unwinder, not a caller
        if "+0x" in text and "/0x" in text:  # "folio_put+0x12/0x40 [mod]" -> "folio_put"
            text = " ".join(w.split("+0x")[0] for w in text.split())
        out.append(text)
        if len(out) == max_lines:
            break
    return out


def _wrap(text: str, hang: str = "", first: str = "") -> list[str]:
    """*text* filled to 80 columns: the first line starts with *first*, the
    others with *hang*."""
    return textwrap.wrap(text, WIDTH, initial_indent=first, subsequent_indent=hang,
                         break_long_words=True, break_on_hyphens=False) or [first]


def _heading(title: str) -> list[str]:
    return ["", title, "-" * len(title)]


def _short_kernel(run: RunData, kernel: str) -> str:
    return f"{kernel} ({run.release(kernel)})"


def _failures(run: RunData) -> list[tuple[int, int, str, str]]:
    """Every violation and failed expectation as (step, kernel order, short
    name, paragraph), the earliest first."""
    from .timeline import INVARIANTS

    order = {k: i for i, k in enumerate(run.kernels)}
    steps = {s.index: s for s in run.scenario.steps}

    def at(step: int) -> str:
        st = steps.get(step)
        return f"step {step}" + (f" ({st.action}: {_step_line(st)})" if st else " (start)")

    def given(v) -> str | None:
        return None if v is None or (not isinstance(v, str) and pd.isna(v)) else str(v)

    out = []
    for r in run.violations.to_dict("records"):
        kernel, step = r["kernel"], int(r["step"])
        where = ""
        if given(r.get("map")) and given(r.get("page")) is not None:
            where = f" for page {int(r['page'])} of mapping {r['map']}"
        entry = INVARIANTS.get(r["invariant"])
        check = entry[0] if isinstance(entry, tuple) else entry
        rule = " ".join(((check.__doc__ or "") if check else "").split(".")[0].split())
        text = (f"On {_short_kernel(run, kernel)}, invariant {r['invariant']} is broken at "
                f"{at(step)}{where}. ")
        if given(r.get("field")) and given(r.get("expected")) is not None:
            text += (f"Expected: {r['field']} {r['expected']}; actual: {r['actual']}. "
                     f"{r['message']}.")
        else:
            text += (f"Expected: {rule.split(':', 1)[-1].strip() or r['invariant']}. "
                     f"Actual: {r['message']}.")
        out.append((step, order.get(kernel, 99), r["invariant"], text))
    if run.expectations is not None and len(run.expectations):
        from .expect import failed

        for r in failed(run.expectations).to_dict("records"):
            kernel, step = r["kernel"], int(r["step"])
            why = f" {r['why']}" if given(r.get("why")) else ""
            text = (f"On {_short_kernel(run, kernel)}, expectation {r['expect']} of the "
                    f"scenario fails at {at(step)}. Expected: {r['object']} {r['field']} "
                    f"{r['wanted']}; actual: {r['actual']}.{why}")
            out.append((step, order.get(kernel, 99), f"expect {r['expect']}", text))
    return sorted(out, key=lambda f: (f[0], f[1]))


def _verdict(run: RunData) -> list[str]:
    from .timeline import INVARIANTS

    failures = _failures(run)
    checked = "every invariant the lab checks (" + ", ".join(INVARIANTS) + ")"
    if run.expectations is not None and len(run.expectations):
        checked += f" and the scenario's {run.expectations['expect'].nunique()} expectation(s)"
    if not failures:
        return _wrap(f"No violation: {checked} held at every step on "
                     f"{' and '.join(_short_kernel(run, k) for k in run.kernels)}.")
    text = failures[0][3]
    if len(failures) > 1:
        names = sorted({f[2] for f in failures[1:]})
        text += (f" {len(failures) - 1} more failure(s) in this run ({', '.join(names)}), "
                 "listed in report.html.")
    failing = {f[1] for f in failures}
    clean = [k for i, k in enumerate(run.kernels) if i not in failing]
    if clean:
        text += f" Everything held on {', '.join(_short_kernel(run, k) for k in clean)}."
    return _wrap(text)


_COUNTERS = (("refcount", "ref"), ("mapcount", "map"), ("entire_mapcount", "ent"),
             ("pincount", "pin"))


def _cell(v) -> str:
    return "-" if v is None else str(v)


def _counter_rows(run: RunData) -> tuple[list[str], list[tuple]]:
    """Counters shown and one row per (step, page range) at the steps where a
    watched folio's counters moved on some kernel (and the first)."""
    tl = run.timeline
    shown = [(c, short) for c, short in _COUNTERS if c in tl and tl[c].notna().any()]
    cols = [c for c, _ in shown]
    pages = tl.drop_duplicates(["kernel", "step", "map", "page"])
    wide = {k: g.set_index(["step", "map", "page"])[cols] for k, g in pages.groupby("kernel")}
    steps = sorted(set(pages["step"].astype(int)))
    keys = sorted({(m, int(p)) for m, p in zip(pages["map"], pages["page"])},
                  key=lambda mp: (list(run.scenario.maps).index(mp[0])
                                  if mp[0] in run.scenario.maps else 99, mp[1]))
    rows = []
    prev: dict = {}
    for st in steps:
        cur = {}
        for m, p in keys:
            vals = tuple(tuple(None if pd.isna(x) else int(x) for x in wide[k].loc[(st, m, p)])
                         if (st, m, p) in wide[k].index else (None,) * len(cols)
                         for k in run.kernels)
            cur[(m, p)] = vals
        changed = [mp for mp in keys if st == steps[0] or cur[mp] != prev.get(mp)]
        prev = cur
        # consecutive pages with the same values share a row
        group: list = []
        for mp in changed + [None]:
            if group and mp is not None and mp[0] == group[-1][0] and mp[1] == group[-1][1] + 1 \
                    and cur[mp] == cur[group[0]]:
                group.append(mp)
                continue
            if group:
                first, last = group[0], group[-1]
                name = f"{first[0]}:{first[1]}" + (f"-{last[1]}" if last != first else "")
                rows.append((st, name, cur[first]))
            group = [mp] if mp is not None else []
    return [s for _, s in shown], rows


def _counter_table(run: RunData) -> list[str]:
    names, rows = _counter_rows(run)
    if not rows:
        return ["(no watched pages)"]
    actions = {int(r.step): r.action for r in run.steps.itertuples()}
    cell = 5
    block = len(names) * cell + 2
    lead = 6 + 10 + 10
    kernels = run.kernels
    per_table = max(1, (WIDTH - lead) // block)
    out = []
    for start in range(0, len(kernels), per_table):
        ks = kernels[start:start + per_table]
        head1 = f"{'':<{lead}}" + "".join(f"{k[:block - 2]:<{block}}" for k in ks)
        head2 = (f"{'step':>4}  {'action':<9} {'page':<9} "
                 + "".join("".join(f"{n:>{cell}}" for n in names) + "  " for _ in ks))
        out += [head1.rstrip(), head2.rstrip()]
        for st, name, vals in rows:
            line = f"{st:>4}  {actions.get(st, '')[:9]:<9} {name[:9]:<9} "
            for k in ks:
                line += "".join(f"{_cell(v):>{cell}}" for v in vals[kernels.index(k)]) + "  "
            out.append(line.rstrip())
        out.append("")
    full = {"ref": "refcount", "map": "raw _mapcount (-1 = unmapped)",
            "ent": "_entire_mapcount of a large folio", "pin": "_pincount of a large folio"}
    out += _wrap("Columns: " + "; ".join(f"{n} = {full[n]}" for n in names)
                 + "; '-' = the kernel has no such field or the folio is order 0. "
                 "A row is shown where some value changed since the previous step.")
    return out


def _messages(run: RunData) -> list[str]:
    """The kernel's complaints (WARNING, BUG, Oops, "Bad page") and
    memory-management lines (kernel_messages.parquet) per step, trimmed."""
    frames = [f for f in (run.complaints, run.kernel_messages) if f is not None and len(f)]
    if not frames:
        return _wrap("None: the guest kernel printed no WARNING, BUG, Oops, panic, \"Bad "
                     "page\" or memory-management line during the run.")
    c = pd.concat([f[["kernel", "step", "action", "text"]] for f in frames], ignore_index=True)
    c = c.drop_duplicates(["kernel", "step", "text"])
    order = {k: i for i, k in enumerate(run.kernels)}
    c = c.assign(_k=c["kernel"].map(order), _s=c["step"].astype(int)).sort_values(
        ["_k", "_s"], kind="stable")
    out = []
    for (kernel, step), g in c.groupby(["kernel", "_s"], sort=False):
        out.append(f"{_short_kernel(run, kernel)}, step {step} ({g['action'].iloc[0]}):")
        for line in trim_kernel_messages(g["text"]):
            out += _wrap(line, "    ", "  ")
    return out


# Where a stack enters the kernel for the reader: a system call or a fault.
_STACK_ENTRIES = ("__do_sys_", "__x64_sys_", "handle_mm_fault", "do_syscall_64",
                  "exc_page_fault", "ret_from_fork", "kthread", "worker_thread")


def _short_stack(stack: str | None, writer: str | None, head: int = 4) -> str:
    """The shortest useful stack: from the writer outwards, its first *head*
    frames, any device-dax frame after them, and the entry the operation came
    through (a system call or handle_mm_fault), the rest as "...". """
    if not isinstance(stack, str) or not stack:
        return writer or "?"
    names = stack.split(" < ")
    if writer in names:
        names = names[names.index(writer):]
    end = next((i for i, n in enumerate(names) if n.startswith(_STACK_ENTRIES)), len(names) - 1)
    names = names[:end + 1]
    if len(names) <= head + 2:
        return " < ".join(names)
    middle = [n for n in names[head:-1] if "dax" in n]
    return " < ".join([*names[:head], *middle, "...", names[-1]])


def _writers(run: RunData) -> list[str]:
    ev = run.events
    if ev is None:
        return []
    out: list[str] = []
    w = ev[ev["kind"] == "write"]
    if w.empty:
        return out + ["No counter of a watched folio changed."]
    for (kernel, step), g in w.groupby(["kernel", "step"], sort=True):
        out.append(f"{_short_kernel(run, kernel)}, step {step} ({g['action'].iloc[0]}):")
        g = g.assign(path=[_short_stack(s, wr) for s, wr in zip(g["stack"], g["writer"])])
        agg = g.groupby(["field", "delta", "path"], sort=False).size().reset_index(name="n")
        for r in agg.itertuples():
            sign = f"+{r.delta}" if r.delta > 0 else str(r.delta)
            out += _wrap(f"{r.field} {sign} x{r.n}: {r.path}", "      ", "  ")
    lost = ev[ev["kind"] == "lost"]
    if len(lost):
        out.append(f"{len(lost)} change(s) no watchpoint reported (kind 'lost' in events.parquet).")
    return out


def _how(run: RunData) -> list[str]:
    sc = run.scenario
    path = (run.meta.get("scenario") or {}).get("path") or f"scenarios/{sc.name}.toml"
    kernels = run.kernels
    watch = ""
    if run.events is not None:
        watch = " --watch stacks" if run.events["stack"].notna().any() else " --watch"
    lab = ([f"devdax-lab run {shlex.quote(path)}", f"--kernel {kernels[0]}{watch} --out DIR"]
           if len(kernels) == 1 else
           [f"devdax-lab compare {shlex.quote(path)}",
            f"--kernels {','.join(kernels)}{watch} --out DIR"])
    out = [("Without the lab, on a machine with a device-dax device aligned "
           f"{format_size(sc.device)}"), "(as root):", "",
           "  gcc " + " ".join(CFLAGS) + " -o repro repro.c",
           f"  ./repro /dev/{run.device}", ""]
    out += _wrap("repro.c runs the steps above in the same processes and prints one line "
                 "per step; it exits 0 when every step succeeded or failed as in the lab "
                 "run, 1 otherwise. Read the counters with drgn or the kernel's own "
                 "tracing while it runs.")
    out += ["", "With the lab (the scenario file is below):", ""]
    out += ["  " + " ".join(lab)] if len(" ".join(lab)) <= WIDTH - 2 else [
        "  " + lab[0] + " \\", "      " + lab[1]]
    return out


def _header(run: RunData) -> list[str]:
    sc, meta = run.scenario, run.meta
    failures = _failures(run)
    if failures:
        step, k, name, _ = failures[0]
        subject = f"[devdax-lab] {sc.name}: {name} fails at step {step} on " + (
            run.release(run.kernels[k]) if k < len(run.kernels) else "?")
    else:
        subject = (f"[devdax-lab] {sc.name}: no violation on "
                   + ", ".join(run.release(k) for k in run.kernels))
    lines = _wrap(f"Subject: {subject}", "  ")
    lines += ["", *_wrap(f"Scenario: {sc.name}: {sc.title}", "          ")]
    for k in run.kernels:
        lines += _wrap(f"Kernel:   {k}: Linux {run.release(k)}", "          ")
        pkgs = meta.get("kernels", {}).get(k, {}).get("packages") or {}
        for name, version in sorted(pkgs.items()):
            lines += _wrap(f"{name} {version}", "            ", "          ")
    lines += _wrap(f"Device:   /dev/{run.device}, device-dax, {format_size(sc.device)}-aligned",
                   "          ")
    lines += _wrap(f"Run:      {meta.get('date', '?')} under QEMU "
                   f"({meta.get('accelerator', '?')}), devdax-lab {meta.get('devdax_lab', '?')}, "
                   f"drgn {meta.get('drgn', '?')}", "          ")
    return lines


def _steps_words(run: RunData) -> list[str]:
    lines = []
    for s in run.scenario.steps:
        res = []
        for k in run.kernels:
            row = run.steps[(run.steps["kernel"] == k) & (run.steps["step"] == s.index)]
            err = None if row.empty or pd.isna(row["errno"].iloc[0]) else int(row["errno"].iloc[0])
            res.append((k, "ok" if err is None else _errno_name(err)))
        outcome = ("" if all(r == "ok" for _, r in res) else
                   " [" + ", ".join(f"{k}: {r}" for k, r in res) + "]")
        lines += _wrap(f"{s.index:>2}. {_step_line(s)}{outcome}", "    ")
    return lines


def report_sections(run: RunData) -> dict[str, list[str]]:
    """report.txt as its sections, heading -> lines (the header block under
    ""; the watchpoint section only when the run recorded events), each line
    at most 80 columns: for notebook 04, which shows them between plots."""
    sections = {
        "": _header(run),
        "Verdict": _verdict(run),
        "Steps": _steps_words(run),
        "Counters of the watched pages": _counter_table(run),
        "Kernel messages": _messages(run),
    }
    if run.events is not None:
        sections[WRITERS] = _writers(run)
    sections["How to reproduce"] = _how(run)
    sections["The scenario"] = [line for raw in run.scenario.text.rstrip().splitlines()
                                for line in _wrap(raw, "    ", "  ")]
    return sections


WRITERS = "Who changed the counters (watchpoints)"


def report_txt(run: RunData) -> str:
    """The mailing-list report (see module doc); every line at most 80 columns."""
    lines: list[str] = []
    for heading, body in report_sections(run).items():
        lines += (_heading(heading) if heading else []) + body
    return "\n".join(line.rstrip() for line in lines) + "\n"


def _errno_name(no: int) -> str:
    import errno as _errno

    return _errno.errorcode.get(no, f"errno {no}")


def write_writeup(run_dir: str | Path, out: str | Path) -> list[Path]:
    """repro.c and report.txt for the run in *run_dir*, written into *out*
    (which may be *run_dir*). Returns the paths written."""
    run = read_run(run_dir)
    c_text, report = repro_c(run), report_txt(run)  # both made before anything is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "repro.c", out / "report.txt"]
    paths[0].write_text(c_text)
    paths[1].write_text(report)
    return paths
