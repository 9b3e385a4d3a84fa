"""Where cached things live, how an entry is written so that a crash never
leaves a half-written one behind, and the one lock that serialises the
processes sharing an entry.

An entry is a directory. It is built under a temporary name next to its final
place and renamed into place only when complete, so a reader sees either
nothing or the whole entry. Two processes that would build the same entry
(two notebooks fetching ``after``, a CLI run and a test) take its lock first
(:func:`locked`): the second waits, then finds the entry made.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import LabFailure

__all__ = ["CacheLocked", "atomic_entry", "cache_root", "hash_inputs", "locked", "sha256_file"]

#: How long :func:`locked` waits by default: longer than any fetch, image or
#: NVDIMM preparation takes here; a kernel build passes its own.
LOCK_TIMEOUT = 1800.0
_POLL = 0.2


class CacheLocked(LabFailure):
    """Another process held a cache lock for longer than the wait allowed."""


def cache_root() -> Path:
    """``$DEVDAX_LAB_CACHE``, else ``$XDG_CACHE_HOME/devdax-lab``, else
    ``~/.cache/devdax-lab``: outside the repository, shared by every clone."""
    explicit = os.environ.get("DEVDAX_LAB_CACHE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(xdg) / "devdax-lab"


def _holder(fd: int) -> str:
    """What the lock file says about the process holding it (its pid and what
    it does), for the messages of a waiter."""
    with contextlib.suppress(OSError, UnicodeDecodeError):
        text = os.pread(fd, 4096, 0).decode().strip()
        if text:
            return text
    return "another process"


@contextlib.contextmanager
def locked(path: Path, *, what: str = "", timeout: float = LOCK_TIMEOUT,
           say: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the exclusive lock *path* (a file, created if missing) for the
    ``with`` block; *what* says what the holder does, for whoever waits.

    The lock is ``flock(2)`` on the file, so it goes with its holder even when
    that process is killed. A waiter calls *say* once with who holds it, then
    waits up to *timeout* seconds.

    :raises CacheLocked: still held after *timeout* seconds, naming the holder.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        deadline = time.monotonic() + timeout
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            if not told and say is not None:
                say(f"waiting for {_holder(fd)} (lock {path})")
                told = True
            if time.monotonic() >= deadline:
                raise CacheLocked(
                    f"{path} is still locked after {timeout:g} s by {_holder(fd)}: wait for it "
                    "to finish, or stop that process (the lock goes with it)")
            time.sleep(_POLL)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}{f' ({what})' if what else ''}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_entry(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes *final* on success.

    On any exception (KeyboardInterrupt included) the temporary directory is
    removed and *final* is left as it was. An existing *final* is replaced.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's contents."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_inputs(*parts: bytes | str | Path) -> str:
    """A short stable key over strings, bytes and file contents (for cache keys)."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            h.update(b"file:" + str(part.name).encode() + b"\0")
            h.update(part.read_bytes())
        elif isinstance(part, str):
            h.update(b"str:" + part.encode() + b"\0")
        else:
            h.update(b"bytes:" + part + b"\0")
    return h.hexdigest()[:16]
