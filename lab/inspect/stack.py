"""Who is running and how it got there, at a watchpoint hit: the task on a
CPU and the kernel stack unwound by drgn from the registers the gdbstub
reported."""

from __future__ import annotations

import drgn
from drgn import Object, offsetof

__all__ = ["Frame", "task_on_cpu", "kernel_stack", "code_location"]

# struct pt_regs member <- gdb register name (x86-64)
_PT_REGS = (
    ("r15", "r15"), ("r14", "r14"), ("r13", "r13"), ("r12", "r12"), ("bp", "rbp"),
    ("bx", "rbx"), ("r11", "r11"), ("r10", "r10"), ("r9", "r9"), ("r8", "r8"),
    ("ax", "rax"), ("cx", "rcx"), ("dx", "rdx"), ("si", "rsi"), ("di", "rdi"),
    ("ip", "rip"), ("cs", "cs"), ("flags", "eflags"), ("sp", "rsp"), ("ss", "ss"),
)

from ..model import Frame  # (function, "file:line" or None, inlined)


def _cpu_layout(prog: drgn.Program, cpu: int) -> tuple[int, int, int]:
    """(address of rq->curr for *cpu*, offsetof comm, offsetof pid), cached."""
    key = ("devdax-lab.cpu_curr", cpu)
    try:
        return prog.cache[key]
    except KeyError:
        pass
    from drgn.helpers.linux.sched import cpu_rq

    task = prog.type("struct task_struct")
    layout = (cpu_rq(prog, cpu).curr.address_, offsetof(task, "comm"), offsetof(task, "pid"))
    prog.cache[key] = layout
    return layout


def task_on_cpu(prog: drgn.Program, cpu: int) -> tuple[str, int]:
    """(comm, pid) of the task running on *cpu* (its runqueue's ``curr``:
    in an interrupt, the interrupted task). Three raw reads, no objects."""
    curr_addr, comm_off, pid_off = _cpu_layout(prog, cpu)
    task = prog.read_u64(curr_addr)
    comm = prog.read(task + comm_off, 16).split(b"\0", 1)[0].decode(errors="replace")
    return comm, int.from_bytes(prog.read(task + pid_off, 4), "little", signed=True)


def kernel_stack(prog: drgn.Program, regs: dict[str, int], pc: int) -> tuple[Frame, ...]:
    """The kernel stack at a hit, innermost first, inline frames included.

    *pc* replaces the reported rip: the gdbstub reports the instruction after
    the write, and unwinding from inside the writing instruction (rip - 1)
    names the function and line that wrote (the stack is the same: a store
    does not move rsp)."""
    pt_regs = prog.type("struct pt_regs")
    raw = bytearray(pt_regs.size)
    for member, reg in _PT_REGS:
        value = pc if member == "ip" else regs[reg]
        raw[offsetof(pt_regs, member):offsetof(pt_regs, member) + 8] = value.to_bytes(8, "little")
    trace = prog.stack_trace(Object.from_bytes_(prog, pt_regs, bytes(raw)))
    frames = []
    for frame in trace:
        try:
            file, line, _ = frame.source()
            where = f"{_short(file)}:{line}"
        except LookupError:
            where = None
        frames.append((frame.name or f"{frame.pc:#x}", where, frame.is_inline))
    return tuple(frames)


def code_location(prog: drgn.Program, pc: int) -> tuple[Frame, ...]:
    """The function and source line of a code address, with the functions
    it was inlined into (innermost first), as ``addr2line -i`` would."""
    try:
        locations = prog.source_location(pc)
    except LookupError:
        try:
            return ((prog.symbol(pc).name, None, False),)
        except LookupError:
            return ((f"{pc:#x}", None, False),)
    out = []
    for i, loc in enumerate(locations):
        # str(loc) is "function at file:line:column"; the function name is
        # not reliably an attribute in drgn 0.3
        name = str(loc).split(" at ", 1)[0] or f"{pc:#x}"
        where = f"{_short(loc.filename)}:{loc.line}" if loc.filename else None
        out.append((name, where, i < len(locations) - 1))
    return tuple(out)


_TOP_DIRS = ("arch", "block", "drivers", "fs", "include", "init", "io_uring", "ipc", "kernel",
             "lib", "mm", "net")


def _short(path: str) -> str:
    """A kernel source path from the tree's top (DWARF may hold build paths)."""
    parts = path.split("/")
    for i, part in enumerate(parts):
        if part in _TOP_DIRS and i + 1 < len(parts):
            return "/".join(parts[i:])
    return path
