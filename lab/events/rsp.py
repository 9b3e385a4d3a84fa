"""A small client of the GDB remote serial protocol: what the lab needs from
QEMU's gdbstub and nothing more (write watchpoints, registers, memory,
continue, interrupt, detach), over a Unix socket, with no gdb binary.

Why not an existing package: the one maintained Python client found
(PyGdbRemoteClient) speaks TCP only and has no notion of asynchronous stop
replies or of interrupting a running target, which is all this is about.

Framing is pure (:func:`frame`, :class:`PacketReader`, :func:`parse_stop`,
:func:`parse_x86_64_registers`) and tested on recorded exchanges with QEMU
(tests/golden/gdb/). :class:`GdbRemote` does the socket I/O and can record
every byte it sends and receives (``transcript``), which is how those
recordings were made.

QEMU's gdbstub behaviour the lab relies on (QEMU 7.2, TCG):

- connecting stops the guest (and may send an unsolicited stop reply);
- while the guest runs, any byte received stops it: only ``\\x03`` may be
  sent then, and it is answered by a ``T02`` stop reply;
- a write watchpoint stops the guest after the write, with
  ``T05thread:pXX.YY;watch:ADDR;`` (the pc is the next instruction);
- ``D`` (detach) removes every breakpoint and watchpoint and continues.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import LabFailure

__all__ = [
    "GdbRemote",
    "PacketReader",
    "RspError",
    "RspRefused",
    "RspTimeout",
    "StopReply",
    "X86_64_REGISTERS",
    "checksum",
    "frame",
    "parse_stop",
    "parse_x86_64_registers",
]

INTERRUPT = b"\x03"
WATCH_KINDS = {"write": "2", "read": "3", "access": "4"}


class RspError(LabFailure):
    """The stub refused a request, or the conversation broke."""


class RspTimeout(RspError, TimeoutError):
    """The stub did not answer in time."""


class RspRefused(RspError):
    """The stub answered a request with an error (``Exx``): e.g. memory it
    cannot read. The conversation itself is fine."""


def checksum(payload: bytes) -> int:
    return sum(payload) & 0xFF


def frame(payload: bytes) -> bytes:
    """``$payload#cs`` with '#', '$', '}' and '*' escaped as the protocol says."""
    escaped = bytearray()
    for b in payload:
        if b in b"#$}*":
            escaped += bytes((0x7D, b ^ 0x20))
        else:
            escaped.append(b)
    return b"$" + bytes(escaped) + b"#%02x" % checksum(bytes(escaped))


def _unescape(data: bytes) -> bytes:
    """Undo '}' escaping and expand run-length encoding ('X*n')."""
    out = bytearray()
    i = 0
    while i < len(data):
        b = data[i]
        if b == 0x7D and i + 1 < len(data):
            out.append(data[i + 1] ^ 0x20)
            i += 2
        elif b == 0x2A and out and i + 1 < len(data):
            out += bytes((out[-1],)) * (data[i + 1] - 29)
            i += 2
        else:
            out.append(b)
            i += 1
    return bytes(out)


class PacketReader:
    """Turns a byte stream into packets, acks and naks (pure)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[str, bytes]]:
        """Every complete item in the stream so far: ("packet", payload),
        ("ack", b"+"), ("nak", b"-"). A packet with a bad checksum raises."""
        self._buf += data
        items: list[tuple[str, bytes]] = []
        while self._buf:
            c = self._buf[0]
            if c == ord("+"):
                items.append(("ack", b"+"))
                del self._buf[0]
            elif c == ord("-"):
                items.append(("nak", b"-"))
                del self._buf[0]
            elif c == ord("$"):
                end = self._buf.find(b"#")
                if end < 0 or len(self._buf) < end + 3:
                    break
                raw = bytes(self._buf[1:end])
                want = int(self._buf[end + 1:end + 3], 16)
                del self._buf[:end + 3]
                if checksum(raw) != want:
                    raise RspError(f"bad checksum on packet {raw[:40]!r}")
                items.append(("packet", _unescape(raw)))
            else:  # noise between packets
                del self._buf[0]
        return items


@dataclass(frozen=True)
class StopReply:
    """Why the target stopped: a signal, and for a watchpoint its address."""

    signal: int
    thread: int | None = None  # QEMU's thread id: CPU index + 1
    watch: int | None = None  # the watchpoint's address
    watch_kind: str | None = None  # "watch" (write), "rwatch", "awatch"
    exited: bool = False

    @property
    def cpu(self) -> int | None:
        return None if self.thread is None else self.thread - 1


def parse_stop(payload: bytes) -> StopReply | None:
    """A stop reply (``S``, ``T``, ``W``, ``X``), or None for anything else."""
    text = payload.decode("ascii", "replace")
    if not text or text[0] not in "STWX" or len(text) < 3:
        return None
    try:
        sig = int(text[1:3], 16)
    except ValueError:
        return None
    if text[0] in "WX":
        return StopReply(signal=sig, exited=True)
    thread = watch = kind = None
    for part in text[3:].split(";"):
        key, _, value = part.partition(":")
        if key == "thread":
            # "pPID.TID" (multiprocess) or "TID"
            tid = value.rsplit(".", 1)[-1].lstrip("p")
            thread = int(tid, 16)
        elif key in ("watch", "rwatch", "awatch"):
            watch, kind = int(value, 16), key
    return StopReply(signal=sig, thread=thread, watch=watch, watch_kind=kind)


# The start of QEMU's x86-64 'g' packet (gdb-xml/i386-64bit.xml): 16 GPRs in
# gdb's order, rip, eflags and the segment selectors. The rest (fs_base...,
# control registers, FPU) is not needed to unwind a kernel stack.
X86_64_REGISTERS = (
    ("rax", 8), ("rbx", 8), ("rcx", 8), ("rdx", 8), ("rsi", 8), ("rdi", 8), ("rbp", 8),
    ("rsp", 8), ("r8", 8), ("r9", 8), ("r10", 8), ("r11", 8), ("r12", 8), ("r13", 8),
    ("r14", 8), ("r15", 8), ("rip", 8), ("eflags", 4), ("cs", 4), ("ss", 4), ("ds", 4),
    ("es", 4), ("fs", 4), ("gs", 4),
)


def parse_x86_64_registers(hex_payload: bytes) -> dict[str, int]:
    """The general registers from a 'g' reply (little-endian hex)."""
    raw = bytes.fromhex(hex_payload.decode("ascii"))
    need = sum(size for _, size in X86_64_REGISTERS)
    if len(raw) < need:
        raise RspError(f"register packet too short ({len(raw)} bytes, need {need})")
    regs, off = {}, 0
    for name, size in X86_64_REGISTERS:
        regs[name] = int.from_bytes(raw[off:off + size], "little")
        off += size
    return regs


class GdbRemote:
    """One connection to a gdbstub. Requests are synchronous; a running
    target is waited on with :meth:`wait_stop`. Thread use: one thread
    converses; :meth:`interrupt` may be called from another (writes are
    serialised, and a ``\\x03`` never lands inside a packet)."""

    def __init__(self, sock: socket.socket, *, timeout: float = 5.0, record: bool = False):
        self._sock = sock
        self._reader = PacketReader()
        self._pending: list[tuple[str, bytes]] = []
        self._write_lock = threading.Lock()
        self.timeout = timeout
        self.ack_mode = True
        self.transcript: list[tuple[str, bytes]] | None = [] if record else None

    @classmethod
    def connect(cls, path: Path | str, *, timeout: float = 5.0, record: bool = False) -> GdbRemote:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except OSError as exc:
            sock.close()
            raise RspError(f"cannot connect to the gdbstub at {path}: {exc.strerror or exc}") from exc
        return cls(sock, timeout=timeout, record=record)

    # -- bytes -----------------------------------------------------------------
    def _write(self, data: bytes) -> None:
        with self._write_lock:
            if self.transcript is not None:
                self.transcript.append(("send", data))
            try:
                self._sock.sendall(data)
            except OSError as exc:
                raise RspError(f"gdbstub connection lost: {exc}") from exc

    def _next_item(self, deadline: float | None) -> tuple[str, bytes]:
        while not self._pending:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise RspTimeout("the gdbstub did not answer in time")
            self._sock.settimeout(remaining)
            try:
                data = self._sock.recv(65536)
            except TimeoutError as exc:
                raise RspTimeout("the gdbstub did not answer in time") from exc
            except OSError as exc:
                raise RspError(f"gdbstub connection lost: {exc}") from exc
            if not data:
                raise RspError("the gdbstub closed the connection")
            if self.transcript is not None:
                self.transcript.append(("recv", data))
            self._pending.extend(self._reader.feed(data))
        return self._pending.pop(0)

    def _next_packet(self, deadline: float | None) -> bytes:
        while True:
            kind, payload = self._next_item(deadline)
            if kind == "packet":
                if self.ack_mode:
                    self._write(b"+")
                return payload

    def _deadline(self, timeout: float | None) -> float | None:
        timeout = self.timeout if timeout is None else timeout
        return None if timeout == float("inf") else time.monotonic() + timeout

    # -- requests --------------------------------------------------------------
    def send(self, payload: str | bytes) -> None:
        """Send one packet. Its ack is not waited for: on a local socket
        nothing is corrupted, and the reader skips acks (in ack mode a '+'
        arrives before every reply), which saves a round trip on 'c'."""
        data = payload.encode() if isinstance(payload, str) else payload
        self._write(frame(data))

    def request(self, payload: str | bytes, *, timeout: float | None = None,
                skip_stops: bool = False) -> bytes:
        """Send *payload*, return the reply. With *skip_stops*, stop replies
        that arrive first (QEMU sends one when a client connects) are dropped."""
        self.send(payload)
        deadline = self._deadline(timeout)
        while True:
            reply = self._next_packet(deadline)
            if skip_stops and parse_stop(reply) is not None:
                continue
            return reply

    def _ok(self, payload: str) -> None:
        reply = self.request(payload)
        if reply != b"OK":
            raise RspError(f"gdbstub refused {payload!r}: {reply.decode(errors='replace') or 'unsupported'}")

    def start(self) -> StopReply:
        """Set up a fresh connection: no-ack mode, then the stop status
        (QEMU stops the guest when a client connects)."""
        reply = self.request("QStartNoAckMode", skip_stops=True)
        if reply == b"OK":
            self.ack_mode = False
        # Reading the target description makes QEMU (7.2) answer 'p' (one
        # register), which costs a third of a 'g' at every hit.
        self.request("qXfer:features:read:target.xml:0,ffb")
        status = parse_stop(self.request("?"))
        if status is None:
            raise RspError("the gdbstub gave no stop status after connecting")
        return status

    def insert_watchpoint(self, address: int, length: int, kind: str = "write") -> None:
        self._ok(f"Z{WATCH_KINDS[kind]},{address:x},{length:x}")

    def remove_watchpoint(self, address: int, length: int, kind: str = "write") -> None:
        self._ok(f"z{WATCH_KINDS[kind]},{address:x},{length:x}")

    def read_memory(self, address: int, length: int) -> bytes:
        reply = self.request(f"m{address:x},{length:x}")
        if reply.startswith(b"E") and len(reply) == 3:
            raise RspRefused(f"cannot read {length} bytes at {address:#x} ({reply.decode()})")
        try:
            return bytes.fromhex(reply.decode("ascii"))
        except ValueError as exc:
            raise RspError(f"not a memory reply: {reply[:40]!r}") from exc

    def read_register(self, number: int) -> int | None:
        """One register by gdb number (x86-64: 16 is rip): a short reply.
        None if the stub will not say (QEMU 7.2 answers 'p' only to a client
        that has read its target description)."""
        reply = self.request(f"p{number:x}")
        if not reply or (reply.startswith(b"E") and len(reply) == 3):
            return None
        return int.from_bytes(bytes.fromhex(reply.decode("ascii")), "little")

    def read_registers(self) -> dict[str, int]:
        """The general registers of the CPU that stopped (QEMU selects it)."""
        return parse_x86_64_registers(self.request("g"))

    def cont(self) -> None:
        """Let the guest run; its next stop arrives through :meth:`wait_stop`."""
        self.send("c")

    def interrupt(self) -> None:
        """Ask a running guest to stop (answered by a stop reply)."""
        self._write(INTERRUPT)

    def wait_stop(self, timeout: float | None = None) -> StopReply:
        """The next stop reply; other packets in between are an error."""
        deadline = self._deadline(timeout)
        while True:
            payload = self._next_packet(deadline)
            stop = parse_stop(payload)
            if stop is not None:
                return stop
            raise RspError(f"expected a stop reply, got {payload[:60]!r}")

    def detach(self) -> None:
        """Remove every watchpoint and let the guest run (``D``)."""
        self._ok("D")

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass
