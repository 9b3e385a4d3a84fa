"""Names of Linux signals and of their si_code values, for the signals a
guest process received (x86-64; include/uapi/asm-generic/siginfo.h).

Pure data: the agent reports numbers, the frames and the report show names.
"""

from __future__ import annotations

import signal as _signal

__all__ = ["signal_name", "si_code_name", "describe_signal"]

# si_code values any signal may carry (sent by a process or the kernel).
_GENERIC = {0: "SI_USER", 0x80: "SI_KERNEL", -1: "SI_QUEUE", -2: "SI_TIMER", -3: "SI_MESGQ",
            -4: "SI_ASYNCIO", -5: "SI_SIGIO", -6: "SI_TKILL", -7: "SI_DETHREAD",
            -60: "SI_ASYNCNL"}
# si_code values of the signals the kernel raises for a fault (> 0).
_BY_SIGNAL = {
    _signal.SIGBUS: {1: "BUS_ADRALN", 2: "BUS_ADRERR", 3: "BUS_OBJERR", 4: "BUS_MCEERR_AR",
                     5: "BUS_MCEERR_AO"},
    _signal.SIGSEGV: {1: "SEGV_MAPERR", 2: "SEGV_ACCERR", 3: "SEGV_BNDERR", 4: "SEGV_PKUERR",
                      5: "SEGV_ACCADI", 6: "SEGV_ADIDERR", 7: "SEGV_ADIPERR", 8: "SEGV_MTEAERR",
                      9: "SEGV_MTESERR", 10: "SEGV_CPERR"},
    _signal.SIGILL: {1: "ILL_ILLOPC", 2: "ILL_ILLOPN", 3: "ILL_ILLADR", 4: "ILL_ILLTRP",
                     5: "ILL_PRVOPC", 6: "ILL_PRVREG", 7: "ILL_COPROC", 8: "ILL_BADSTK",
                     9: "ILL_BADIADDR"},
    _signal.SIGFPE: {1: "FPE_INTDIV", 2: "FPE_INTOVF", 3: "FPE_FLTDIV", 4: "FPE_FLTOVF",
                     5: "FPE_FLTUND", 6: "FPE_FLTRES", 7: "FPE_FLTINV", 8: "FPE_FLTSUB"},
    _signal.SIGTRAP: {1: "TRAP_BRKPT", 2: "TRAP_TRACE", 3: "TRAP_BRANCH", 4: "TRAP_HWBKPT",
                      5: "TRAP_UNK", 6: "TRAP_PERF"},
    _signal.SIGSYS: {1: "SYS_SECCOMP", 2: "SYS_USER_DISPATCH"},
}


def signal_name(signo: int) -> str:
    """``SIGBUS`` for 7 (x86-64 numbering, as the guest's)."""
    try:
        return _signal.Signals(signo).name
    except ValueError:
        return f"SIG{signo}"


def si_code_name(signo: int, code: int | None) -> str | None:
    """The name of *code* for signal *signo* (``BUS_MCEERR_AR`` for SIGBUS 4),
    the number as text when it has none, None when there is no code."""
    if code is None:
        return None
    if code > 0 and code != 0x80:
        return _BY_SIGNAL.get(signo, {}).get(code, str(code))
    return _GENERIC.get(code, str(code))


def describe_signal(signo: int, code: int | None, addr: int | None, survived: bool) -> str:
    """One line: ``SIGBUS BUS_MCEERR_AR at 0x7f0000 (survived)`` or
    ``killed by SIGKILL``."""
    name = signal_name(signo)
    if not survived and code is None:
        return f"killed by {name}"
    text = " ".join(p for p in (name, si_code_name(signo, code)) if p)
    if addr:
        text += f" at {addr:#x}"
    return f"{text} ({'survived' if survived else 'killed it'})"
