"""Host side of the guest agent protocol (lab/data/vm-images/agent/agent.c).

The guest agent listens on a virtio-serial port and speaks ONE JSON OBJECT PER
LINE in each direction: the host writes ``{"id": 7, "cmd": "touch", ...}`` and
the agent answers ``{"id": 7, "ok": true, ...}`` or ``{"id": 7, "ok": false,
"errno": 14, "error": "..."}``.  A dedicated port, rather than the serial
console, keeps kernel messages and the human's shell out of the data path, and
JSON lines mean the host never scrapes text.

The encoding helpers (:func:`encode_request`, :func:`decode_response`,
:func:`check_response`, :class:`LineBuffer`) are pure.  :class:`AgentClient`
drives one connection synchronously: one request, then its answer.  A request
that timed out may still be answered later; that stale answer is skipped by id.
"""

from __future__ import annotations

import base64
import errno as _errno
import json
import logging
import os
import select
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .errors import LabFailure

__all__ = [
    "AgentClient",
    "AgentDisconnected",
    "AgentError",
    "AgentTimeout",
    "LineBuffer",
    "ProgramResult",
    "check_response",
    "decode_response",
    "encode_request",
]

log = logging.getLogger(__name__)

_U64_MAX = (1 << 64) - 1
_I64_MIN = -(1 << 63)
#: addresses per touch/pagemap request; keeps every reply small enough for
#: the worker channel even where the agent cannot enlarge socket buffers
ADDR_CHUNK = 2048
#: raw bytes per "put" request: 1.33 MiB of base64, well inside the agent's
#: 4 MiB line
PUT_CHUNK = 1 << 20


class AgentError(LabFailure):
    """The agent answered ``ok: false``.

    ``errno`` is the guest's errno (compare with the :mod:`errno` constants),
    ``message`` the agent's explanation, which names the command and the step
    that failed.
    """

    def __init__(self, cmd: str, errno: int, message: str) -> None:
        self.cmd = cmd
        self.errno = errno
        self.message = message
        super().__init__(cmd, errno, message)

    def __str__(self) -> str:
        name = _errno.errorcode.get(self.errno, "?")
        return f"{self.cmd}: {self.message} (errno {self.errno} {name})"


class AgentTimeout(LabFailure, TimeoutError):
    """No answer to *cmd* within *timeout* seconds.  The connection stays
    usable: a late answer is recognised by its id and skipped."""

    def __init__(self, cmd: str, timeout: float) -> None:
        self.cmd = cmd
        self.timeout = timeout
        super().__init__(f"{cmd}: no answer from the guest agent within {timeout:g} s")


class AgentDisconnected(LabFailure, ConnectionError):
    """The connection to the agent closed (guest powered off or crashed)."""


class LineBuffer:
    """Reassembles lines from arbitrary chunks of a byte stream.

    ``feed()`` returns the complete lines seen so far, without their ``\\n``;
    a partial line waits for the next chunk.
    """

    def __init__(self) -> None:
        self._partial = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._partial += data
        if b"\n" not in data:
            return []
        *lines, rest = bytes(self._partial).split(b"\n")
        self._partial = bytearray(rest)
        return lines

    @property
    def pending(self) -> bytes:
        """Bytes of the incomplete last line."""
        return bytes(self._partial)


def _check_arg(key: str, value: Any) -> None:
    """The agent accepts strings, integers, booleans, null, integer arrays and
    string arrays (program arguments)."""
    if value is None or isinstance(value, (bool, str)):
        return
    if isinstance(value, int):
        if not _I64_MIN <= value <= _U64_MAX:
            raise ValueError(f"argument {key!r}: {value} does not fit 64 bits")
        return
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(item, str) for item in value):
            for item in value:
                if "\0" in item:
                    raise ValueError(f"argument {key!r}: {item!r} holds a NUL byte")
            return
        for item in value:
            if isinstance(item, bool) or not isinstance(item, int):
                raise TypeError(f"argument {key!r}: arrays may only hold integers, got {item!r}")
            if not 0 <= item <= _U64_MAX:
                raise ValueError(f"argument {key!r}: {item} is not an unsigned 64-bit integer")
        return
    raise TypeError(f"argument {key!r}: unsupported type {type(value).__name__}")


def encode_request(req_id: int, cmd: str, args: dict[str, Any]) -> bytes:
    """One request line: ``{"id": req_id, "cmd": cmd, **args}`` plus ``\\n``.

    :raises TypeError, ValueError: for arguments the agent could not parse.
    """
    if isinstance(req_id, bool) or not isinstance(req_id, int):
        raise TypeError(f"request id must be an int, not {req_id!r}")
    if not isinstance(cmd, str) or not cmd:
        raise TypeError(f"command must be a non-empty string, not {cmd!r}")
    for key, value in args.items():
        if key in ("id", "cmd"):
            raise ValueError(f"argument name {key!r} is reserved")
        _check_arg(key, value)
    obj = {"id": req_id, "cmd": cmd, **{k: list(v) if isinstance(v, tuple) else v
                                         for k, v in args.items()}}
    # ensure_ascii: the line is pure ASCII, so no encoding question arises.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True).encode("ascii") + b"\n"


def _response_problem(obj: Any) -> str | None:
    """What makes *obj* not a response, or None if it is one."""
    if not isinstance(obj, dict):
        return "agent sent JSON that is not an object"
    if isinstance(obj.get("id"), bool) or not isinstance(obj.get("id"), int):
        return "agent response has no integer id"
    if not isinstance(obj.get("ok"), bool):
        return "agent response has no boolean ok"
    if not obj["ok"] and (
        isinstance(obj.get("errno"), bool)
        or not isinstance(obj.get("errno"), int)
        or not isinstance(obj.get("error"), str)
    ):
        return "agent error response lacks errno/error"
    return None


def decode_response(line: bytes) -> dict[str, Any]:
    """Parse one response line into a dict that has at least ``id`` and ``ok``
    (and ``errno`` and ``error`` when ``ok`` is false).

    :raises ValueError: if the line is not such an object.
    """
    try:
        obj = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"agent sent a line that is not JSON: {line[:200]!r}") from exc
    problem = _response_problem(obj)
    if problem:
        raise ValueError(f"{problem}: {line[:200]!r}")
    return obj


def check_response(cmd: str, resp: dict[str, Any]) -> dict[str, Any]:
    """The results of a decoded response (without ``id`` and ``ok``).

    :raises AgentError: if the response says ``ok: false``.
    """
    if not resp["ok"]:
        raise AgentError(cmd, resp["errno"], resp["error"])
    return {k: v for k, v in resp.items() if k not in ("id", "ok")}


@dataclass(frozen=True)
class ProgramResult:
    """What a program run in the guest by ``AgentClient.run`` did.

    ``status`` is its exit status (None if a signal ended it), ``signal`` the
    signal number (None if it exited), ``timed_out`` whether the agent killed
    it at the timeout.  ``stdout``/``stderr`` hold at most 1 MiB each;
    ``stdout_bytes``/``stderr_bytes`` count everything it wrote.
    """

    status: int | None
    signal: int | None
    timed_out: bool
    elapsed: float
    stdout: bytes
    stderr: bytes
    stdout_bytes: int
    stderr_bytes: int

    @property
    def ok(self) -> bool:
        """Exited with status 0."""
        return self.status == 0


class _Transport(Protocol):
    def recv(self, bufsize: int, /) -> bytes: ...
    def sendall(self, data: bytes, /) -> Any: ...
    def fileno(self) -> int: ...


class _FdTransport:
    """recv/sendall/fileno over a pair of file descriptors (pipes, ttys)."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self._r, self._w = read_fd, write_fd

    def recv(self, bufsize: int) -> bytes:
        return os.read(self._r, bufsize)

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._w, view):]

    def fileno(self) -> int:
        return self._r


def _chunks(seq: Sequence[int], size: int) -> Iterable[list[int]]:
    """Slices of at most *size*; an empty *seq* still gives one (empty)
    request, so the worker is asked and a dead one is reported."""
    for i in range(0, max(len(seq), 1), size):
        yield list(seq[i:i + size])


class AgentClient:
    """Synchronous client for one agent connection.

    *sock* is a connected socket (QEMU's chardev socket for the port) or any
    object with ``recv``, ``sendall`` and ``fileno``.
    """

    def __init__(self, sock: _Transport) -> None:
        self._sock = sock
        self._buf = LineBuffer()
        self._lines: deque[bytes] = deque()
        self._next_id = 1
        self._closed = False
        self._signals: list[dict[str, Any]] = []

    @classmethod
    def from_fds(cls, read_fd: int, write_fd: int) -> AgentClient:
        """A client over two file descriptors, e.g. the ends of two pipes."""
        return cls(_FdTransport(read_fd, write_fd))

    # -- transport ---------------------------------------------------------

    def _send(self, data: bytes) -> None:
        try:
            self._sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError) as exc:
            self._closed = True
            raise AgentDisconnected(f"guest agent connection closed: {exc}") from exc

    def _next_line(self, cmd: str, timeout: float, deadline: float) -> bytes:
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLIN)
        while not self._lines:
            if self._closed:
                raise AgentDisconnected(f"{cmd}: guest agent connection closed")
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                raise AgentTimeout(cmd, timeout)
            try:
                data = self._sock.recv(1 << 20)
            except (ConnectionResetError, BrokenPipeError):
                data = b""
            except BlockingIOError:
                continue
            if not data:
                self._closed = True
                continue
            self._lines.extend(self._buf.feed(data))
        return self._lines.popleft()

    # -- requests ----------------------------------------------------------

    def request(self, cmd: str, timeout: float = 30.0, **args: Any) -> dict[str, Any]:
        """Send one request and wait for its answer.

        :returns: the results, without ``id`` and ``ok``.
        :raises AgentError: the agent answered ``ok: false``.
        :raises AgentTimeout: no answer within *timeout* seconds.
        :raises AgentDisconnected: the connection closed.
        """
        req_id = self._next_id
        self._next_id += 1
        self._send(encode_request(req_id, cmd, args))
        deadline = time.monotonic() + timeout
        while True:
            line = self._next_line(cmd, timeout, deadline)
            try:
                resp = decode_response(line)
            except ValueError as exc:
                log.warning("ignoring garbage from the guest agent: %s", exc)
                continue
            if resp["id"] != req_id:
                log.debug("skipping stale agent response %s", resp["id"])
                self._keep_signals("?", None, resp)  # a late answer still carries them
                continue
            self._keep_signals(cmd, args.get("proc"), resp)
            return check_response(cmd, resp)

    def _keep_signals(self, cmd: str, proc: Any, resp: dict[str, Any]) -> None:
        """Move the signals a worker reports with an answer (success or
        failure) into :meth:`take_signals`'s list, tagged with the process
        and the command they came with."""
        for sig in resp.pop("signals", None) or ():
            self._signals.append({"proc": proc, "cmd": cmd, **sig})
        lost = resp.pop("signals_lost", 0)
        if lost:
            log.warning("worker %s lost %d signal records (its queue was full)", proc, lost)

    def take_signals(self) -> list[dict[str, Any]]:
        """Every signal reported since the last call, oldest first: dicts with
        ``proc``, ``cmd`` (the request whose answer carried it), ``signal``,
        ``code`` (si_code), ``addr`` (si_addr; 0 for a signal sent by a
        process), ``addr_lsb`` (the size of a memory-failure mapping as a
        shift; 0 otherwise) and ``sender`` (the pid of a process that sent
        it; 0 for a signal the kernel raised). The worker survived each one:
        it is alive to report it."""
        out, self._signals = self._signals, []
        return out

    def exchange_raw(self, data: bytes, timeout: float = 10.0) -> dict[str, Any]:
        """Send raw bytes and return the next response line decoded, whatever
        its id (for protocol tests: malformed requests are answered with id -1)."""
        self._send(data)
        return decode_response(self._next_line("raw", timeout, time.monotonic() + timeout))

    # -- commands ----------------------------------------------------------

    def ping(self, timeout: float = 30.0) -> dict[str, Any]:
        """Kernel release and agent pid: ``{"release": str, "pid": int}``."""
        return self.request("ping", timeout=timeout)

    def echo(self, text: str) -> str:
        """The agent sends *text* back (checks string escaping end to end)."""
        return self.request("echo", text=text)["text"]

    def namespaces(self) -> list[dict[str, Any]]:
        """Device-dax devices, sorted by name: dicts with ``name``, ``size``,
        ``align``, ``start`` (physical address) and ``region`` (or None)."""
        return self.request("namespaces")["devices"]

    def procs(self) -> dict[str, int]:
        """Live worker processes: name -> pid."""
        return self.proc_table()[0]

    def proc_table(self) -> tuple[dict[str, int], list[dict[str, Any]]]:
        """Live workers (name -> pid) and the workers that ended, as dicts
        with ``name``, ``pid``, ``status`` (exit status, or None), ``signal``
        (the signal that killed it, or None) and ``core``. A dead worker is
        remembered until its name is used again."""
        resp = self.request("procs")
        return {p["name"]: p["pid"] for p in resp["procs"]}, resp.get("exited", [])

    def signals(self, proc: str) -> list[dict[str, Any]]:
        """The signals *proc* received since its last answer (also kept for
        :meth:`take_signals`)."""
        before = len(self._signals)
        self.request("signals", proc=proc)
        return self._signals[before:]

    def kill(self, proc: str, signal: int = 9) -> int:
        """Send *signal* to the worker *proc*, as another process (or the
        kernel's OOM killer) would; for SIGKILL the answer comes once it is
        gone. Returns its pid."""
        return self.request("kill", proc=proc, signal=signal)["pid"]

    def mmap(self, proc: str, device: str, length: int, offset: int = 0, write: bool = True,
             shared: bool = True, align: int = 0) -> int:
        """Map *length* bytes of /dev/*device* (or ``"anon"`` memory) into the
        worker *proc*, creating the worker if needed.  With *align*, the
        address is a multiple of it.  Returns the address."""
        return self.request("mmap", proc=proc, device=device, length=length, offset=offset,
                            write=write, shared=shared, align=align)["addr"]

    def touch(self, proc: str, addrs: Sequence[int], write: bool) -> int:
        """Fault in each address with one byte store (*write*) or load.
        Returns how many addresses were touched."""
        return sum(self.request("touch", proc=proc, addrs=chunk, write=write)["touched"]
                   for chunk in _chunks(addrs, ADDR_CHUNK))

    def fork(self, proc: str, child: str) -> int:
        """The worker *proc* forks; the child becomes the worker *child*.
        Returns the child's pid."""
        return self.request("fork", proc=proc, child=child)["pid"]

    def munmap(self, proc: str, addr: int, length: int) -> None:
        """munmap(addr, length) in *proc*."""
        self.request("munmap", proc=proc, addr=addr, length=length)

    def madvise(self, proc: str, addr: int, length: int, advice: int) -> None:
        """madvise(addr, length, advice) in *proc*; *advice* is the raw MADV_* number."""
        self.request("madvise", proc=proc, addr=addr, length=length, advice=advice)

    def mprotect(self, proc: str, addr: int, length: int, prot: str) -> None:
        """mprotect in *proc*; *prot* is letters from ``"rwx"``, ``""`` for PROT_NONE."""
        self.request("mprotect", proc=proc, addr=addr, length=length, prot=prot)

    def mremap(self, proc: str, addr: int, old_length: int, new_length: int, *,
               maymove: bool = False, fixed: bool = False, new_addr: int = 0,
               dontunmap: bool = False) -> int:
        """mremap(addr, old_length, new_length, flags, new_addr) in *proc*, flags
        from MREMAP_MAYMOVE / MREMAP_FIXED / MREMAP_DONTUNMAP.  Returns the
        mapping's (new) address.  What device-dax refuses comes back as an
        AgentError with the kernel's errno."""
        return self.request("mremap", proc=proc, addr=addr, old_length=old_length,
                            new_length=new_length, maymove=maymove, fixed=fixed,
                            new_addr=new_addr, dontunmap=dontunmap)["addr"]

    def mlock(self, proc: str, addr: int, length: int, onfault: bool = False) -> None:
        """mlock(addr, length) in *proc*, or mlock2(..., MLOCK_ONFAULT) with *onfault*."""
        self.request("mlock", proc=proc, addr=addr, length=length, onfault=onfault)

    def munlock(self, proc: str, addr: int, length: int) -> None:
        """munlock(addr, length) in *proc*."""
        self.request("munlock", proc=proc, addr=addr, length=length)

    def maps(self, proc: str, smaps: bool = False) -> list[dict[str, Any]]:
        """The VMAs of *proc* from its own /proc/self/maps: dicts with ``start``,
        ``end``, ``perms`` (e.g. ``"rw-s"``), ``offset`` and ``path``.  With
        *smaps*, from /proc/self/smaps, adding ``vmflags`` (e.g. ``"rd wr sh
        lo"``), ``rss`` and ``locked`` in bytes; smaps walks the page tables,
        which zaps a PUD-mapped device-dax range as pagemap does."""
        return self.request("maps", proc=proc, smaps=smaps)["vmas"]

    def exit(self, proc: str, status: int = 0) -> int:
        """The worker exits with *status*; returns its pid."""
        return self.request("exit", proc=proc, status=status)["pid"]

    def pin(self, proc: str, addr: int, length: int) -> int:
        """Long-term pin (io_uring registered buffer) of the range; returns a pin id."""
        return self.request("pin", proc=proc, addr=addr, length=length)["pin"]

    def unpin(self, proc: str, pin: int) -> None:
        """Unregister the buffer and close the ring of *pin*."""
        self.request("unpin", proc=proc, pin=pin)

    def splice(self, proc: str, addr: int, length: int) -> dict[str, int]:
        """vmsplice the range into a new pipe, which then holds page references.
        Returns ``{"pipe": id, "bytes": n}``; *n* may be less than *length* when
        the pipe is full."""
        return self.request("splice", proc=proc, addr=addr, length=length)

    def drain(self, proc: str, pipe: int) -> int:
        """Read the pipe empty and close it; returns the bytes read."""
        return self.request("drain", proc=proc, pipe=pipe)["bytes"]

    def pagemap(self, proc: str, addrs: Sequence[int]) -> list[dict[str, Any]]:
        """/proc/PID/pagemap entries: dicts with ``addr``, ``raw``, ``present``
        and ``pfn`` (None when not present)."""
        out: list[dict[str, Any]] = []
        for chunk in _chunks(addrs, ADDR_CHUNK):
            out += self.request("pagemap", proc=proc, addrs=chunk)["entries"]
        return out

    def kmsg(self, text: str) -> int:
        """Write *text* to the guest kernel's log (/dev/kmsg; a "<N>" prefix
        sets the level). Returns the bytes written."""
        # Without a final newline printk keeps the record open for a
        # continuation and the console prints it only with the next message.
        return int(self.request("kmsg", text=text if text.endswith("\n") else text + "\n")["bytes"])

    def sysfs(self, path: str, text: str) -> int:
        """Write *text* to the file *path* under /sys in the guest (unbind a
        device, say). Returns the bytes written."""
        return int(self.request("sysfs", path=path, text=text)["bytes"])

    def put_file(self, name: str, data: bytes, timeout: float = 60.0) -> int:
        """Write *data* to the file *name* (a plain file name) in the agent's
        files directory (/tmp/devdax-lab, a tmpfs), mode 0700, in chunks of
        :data:`PUT_CHUNK` bytes.  Returns the file's size."""
        size = 0
        for i in range(0, max(len(data), 1), PUT_CHUNK):
            chunk = base64.b64encode(data[i:i + PUT_CHUNK]).decode("ascii")
            size = int(self.request("put", timeout=timeout, name=name, data=chunk,
                                    append=i > 0)["size"])
        return size

    def run(self, name: str, args: Sequence[str] = (), timeout: float = 60.0) -> ProgramResult:
        """Run the file *name* sent with :meth:`put_file`, with *args*, stdin
        /dev/null, in its own process group, from the files directory.  The
        agent kills the group after *timeout* seconds.  The agent answers
        nothing else meanwhile."""
        resp = self.request("run", timeout=timeout + 30.0, name=name, args=list(args),
                            timeout_ms=max(1, round(timeout * 1000)))
        return ProgramResult(
            status=resp["status"], signal=resp["signal"], timed_out=resp["timed_out"],
            elapsed=resp["elapsed_ms"] / 1000, stdout=base64.b64decode(resp["stdout"]),
            stderr=base64.b64decode(resp["stderr"]), stdout_bytes=resp["stdout_bytes"],
            stderr_bytes=resp["stderr_bytes"])

    def run_binary(self, binary: Path | bytes, args: Sequence[str] = (), timeout: float = 60.0,
                   name: str | None = None) -> ProgramResult:
        """Send a program (a path on the host or its bytes) and run it: put_file + run.
        Static binaries only: the guest has busybox and no C library."""
        if isinstance(binary, Path):
            data, name = binary.read_bytes(), name or binary.name
        else:
            data, name = binary, name or "program"
        self.put_file(name, data)
        return self.run(name, args, timeout=timeout)

    def poweroff(self) -> None:
        """Ask the guest to power off (refused with EPERM unless the agent is
        PID 1 or runs with --allow-poweroff).  The connection closes afterwards."""
        self.request("poweroff")
