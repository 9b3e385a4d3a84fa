"""Where cached things live, and the one discipline every shared cache entry
is made, used and removed under, so that runs side by side (two notebooks,
a CLI run and a test, the cells of a sweep) never trample each other.

An entry is a directory, ``NAME``, with its lock ``.NAME.lock`` next to it
(``flock(2)``: it goes with its holder even when that process is killed).

- Made with :func:`cached_entry`: a use first looks under the shared lock;
  a missing entry is built under the exclusive lock, after looking again
  (another process may have made it while this one waited), under a
  temporary name ``.NAME.partial-*`` renamed into place only when complete.
  So a reader sees either nothing or the whole entry, a crash leaves at most
  a partial directory (removed by the next builder, which holds the lock),
  and two processes never build the same entry twice.
- Never replaced while complete: an entry is immutable once in place. Only an
  incomplete one (of an older layout) is replaced, and no reader uses that.
- Used: every use marks the entry's directory mtime (under the shared lock),
  which is what :func:`prune_unused` goes by.
- Removed only under its lock: by :func:`discard` (of no use), or by
  :func:`prune_unused`: an entry whose lock it gets at once
  (not held: nobody is building it or looking it up) and that nobody used
  for a while; a run that found it marked it first, under the shared lock,
  so the two never cross.

Kernel fetches and kernel builds hold the same locks with :func:`locked`
around their own check of an entry (a manifest verified file by file), and
so do the update of a private apt index and the download of a .deb.
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
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from .errors import LabFailure

__all__ = ["CacheLocked", "atomic_entry", "cache_root", "cached_entry", "discard", "entry_lock", "hash_inputs",
           "locked", "mark_used", "prune_unused", "sha256_file"]

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
           say: Callable[[str], None] | None = None, shared: bool = False) -> Iterator[None]:
    """Hold the exclusive lock *path* (a file, created if missing) for the
    ``with`` block; *what* says what the holder does, for whoever waits.
    *shared*: a shared lock instead (readers; many at once, none while an
    exclusive holder builds or removes).

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
                fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
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
        if not shared:  # the holder's name is for whoever waits on a build
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}{f' ({what})' if what else ''}\n".encode(), 0)
        try:
            yield
        finally:
            if not shared:
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_entry(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes *final* on success.

    On any exception (KeyboardInterrupt included) the temporary directory is
    removed and *final* is left as it was. An existing *final* is replaced:
    call it holding the entry's lock, on an entry no reader uses (missing,
    incomplete, or one the user asked to fetch again).
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


def entry_lock(final: Path) -> Path:
    """The lock of the cache entry *final*: ``.NAME.lock`` next to it."""
    return final.parent / f".{final.name}.lock"


def mark_used(final: Path) -> None:
    """Note that *final* was just used (its directory's mtime), which
    :func:`prune_unused` goes by."""
    with contextlib.suppress(OSError):  # a cache another user owns: never pruned by us either
        os.utime(final)


def _remove_leftovers(final: Path) -> None:
    """The partial and set-aside copies of *final* left by killed processes:
    the caller holds the entry's lock, so no live process owns them."""
    for old in [*final.parent.glob(f".{final.name}.partial-*"),
                *final.parent.glob(f".{final.name}.old-*")]:
        shutil.rmtree(old, ignore_errors=True)


def cached_entry(final: Path, build: Callable[[Path], None], *,
                 complete: Callable[[Path], bool] | None = None, what: str = "",
                 say: Callable[[str], None] | None = None,
                 timeout: float = LOCK_TIMEOUT) -> Path:
    """The cache entry *final*, made now by ``build(tmp)`` if it is missing;
    *build* fills the empty directory *tmp*, which becomes *final* only if it
    returns. *complete(final)* says whether an entry in place is whole (by
    default: it exists; entries appear by rename, so that is enough unless
    an older layout of the same name may be there).

    A complete entry is used as it is, under the shared lock, and marked used
    (:func:`mark_used`). Otherwise the exclusive lock is taken (*say* is
    told once if another process holds it, *what* is what this one does, for
    the others), the entry looked at again, and built only if still missing,
    so processes racing for one entry build it once. A complete entry is never
    replaced: readers may be using it.

    :raises CacheLocked: another process held the lock for *timeout* seconds.
    """
    whole = complete or Path.exists
    lock = entry_lock(final)
    with locked(lock, shared=True, what=what, timeout=timeout, say=say):
        if whole(final):
            mark_used(final)
            return final
    with locked(lock, what=what, timeout=timeout, say=say):
        if whole(final):  # made while this process waited
            mark_used(final)
            return final
        _remove_leftovers(final)
        with atomic_entry(final) as tmp:
            tmp.chmod(0o755)  # readable by whoever runs QEMU and drgn, like the rest
            build(tmp)
    return final


def discard(final: Path) -> None:
    """Remove the entry *final*, found to be of no use (a saved state that
    does not restore), under its lock. A process that has its files open
    keeps them; the next use builds it again."""
    with locked(entry_lock(final), what=f"removing {final.name}"):
        _set_aside_and_remove(final)


def _set_aside_and_remove(final: Path) -> None:
    gone = final.with_name(f".{final.name}.old-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        final.rename(gone)  # out of sight at once, then removed at leisure
    shutil.rmtree(gone, ignore_errors=True)


#: How long an entry must go unused before :func:`prune_unused` may remove
#: it: longer than any run, so that a run never loses an entry it found.
UNUSED_FOR = 86400.0


def prune_unused(entries: Iterable[Path], *, keep: int = 0,
                 unused_for: float = UNUSED_FOR) -> list[Path]:
    """Remove those of *entries* not used (:func:`mark_used`) for
    *unused_for* seconds, except the *keep* most recently used. Each is
    removed holding its lock, taken only if free at once: a held lock is a
    process building or finding it. A reader marks an entry under the shared
    lock before using it, so one it has found is never removed: it is either
    marked before this looks (too recent) or removed before the reader looks
    (and then built again). A process that has the entry's files open keeps
    them until it ends.

    :return: the entries removed.
    """
    dated = []
    for entry in entries:
        with contextlib.suppress(OSError):  # removed meanwhile
            dated.append((entry.stat().st_mtime, entry))
    dated.sort(reverse=True)
    removed = []
    for _, entry in dated[keep:]:
        try:
            with locked(entry_lock(entry), what=f"removing {entry.name}", timeout=0):
                try:
                    if time.time() - entry.stat().st_mtime < unused_for:
                        continue  # used meanwhile
                except OSError:
                    continue
                _set_aside_and_remove(entry)
                removed.append(entry)
        except CacheLocked:
            continue
    return removed


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
