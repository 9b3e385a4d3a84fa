"""Where cached kernels, images and prepared NVDIMM files live, and how an
entry is written so that a crash never leaves a half-written one behind.

An entry is a directory. It is built under a temporary name next to its final
place and renamed into place only when complete, so a reader sees either
nothing or the whole entry.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["cache_root", "atomic_entry", "sha256_file", "hash_inputs"]


def cache_root() -> Path:
    """``$DEVDAX_LAB_CACHE``, else ``$XDG_CACHE_HOME/devdax-lab``, else
    ``~/.cache/devdax-lab``: outside the repository, shared by every clone."""
    explicit = os.environ.get("DEVDAX_LAB_CACHE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(xdg) / "devdax-lab"


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
