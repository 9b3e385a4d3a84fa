"""Every change of a watched folio's counters, with who made it: write
watchpoints through QEMU's gdbstub (``rsp``: the protocol; ``watcher``: the
one owner of the connection)."""

from .rsp import GdbRemote, RspError, RspRefused, RspTimeout, StopReply
from .watcher import Counter, Event, EventsError, Watcher

__all__ = ["Counter", "Event", "EventsError", "GdbRemote", "RspError", "RspRefused", "RspTimeout", "StopReply",
           "Watcher"]
