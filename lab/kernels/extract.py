"""Extraction from a .deb in one streaming pass: ``dpkg-deb --fsys-tarfile``
piped into :func:`scan_tar`, which writes the wanted members (hashing them on
the way) and keeps the wanted modules in memory. :func:`scan_tar` is pure
over a stream; :func:`scan_deb` owns the dpkg-deb process."""

from __future__ import annotations

import contextlib
import hashlib
import lzma
import posixpath
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from lab.progress import Progress

from .apt import tool
from .errors import CommandError
from .modinfo import decompress_module, module_name

__all__ = ["CHUNK", "FileRecord", "TarScan", "scan_deb", "scan_tar"]


CHUNK = 1 << 20


@dataclass(frozen=True)
class FileRecord:
    size: int
    sha256: str


@dataclass
class TarScan:
    """What one pass over a package's tar stream found."""

    files: dict[str, FileRecord] = field(default_factory=dict)  # dest relpath -> record
    sources: dict[str, str] = field(default_factory=dict)  # dest relpath -> archive path
    # Wanted paths that are links to members already streamed past: target -> dest.
    missed: dict[str, str] = field(default_factory=dict)
    modules: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # name -> (relpath, .ko)
    stopped_early: bool = False


def _norm(name: str) -> str:
    n = posixpath.normpath(name.lstrip("/"))
    return "" if n == "." else n


def _write_member(src: IO[bytes], dest: Path, decompress: bool) -> FileRecord:
    dest.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    size = 0
    with contextlib.ExitStack() as stack:
        reader = stack.enter_context(lzma.LZMAFile(src)) if decompress else src
        out = stack.enter_context(open(dest, "wb"))
        while block := reader.read(CHUNK):
            h.update(block)
            out.write(block)
            size += len(block)
    return FileRecord(size, h.hexdigest())


def scan_tar(
    stream: IO[bytes],
    dest: Path,
    files: Mapping[str, str],
    *,
    module_root: str | None = None,
    module_dirs: Sequence[str] = (),
    module_names: Iterable[str] = (),
) -> TarScan:
    """One streaming pass over a tar: write the members named in *files*
    (archive path -> relpath under *dest*; a ``.xz`` member whose relpath lacks
    ``.xz`` is decompressed) and keep, in memory and decompressed, every module
    under *module_root* that lies in one of *module_dirs* or is named in
    *module_names*.

    Wanted paths that are symlinks or hard links are followed inside the
    archive: a target still ahead is taken in the same pass, one already
    streamed past is reported in ``missed`` for a second pass. When no modules
    are collected the pass stops as soon as every wanted file is written.
    """
    wanted = {_norm(k): v for k, v in files.items()}
    names = set(module_names)
    root = _norm(module_root) if module_root is not None else None
    scan = TarScan()
    seen: set[str] = set()
    with tarfile.open(fileobj=stream, mode="r|", bufsize=CHUNK) as tf:
        for member in tf:
            path = _norm(member.name)
            if path in wanted and (member.issym() or member.islnk()):
                relpath = wanted.pop(path)
                if member.issym():
                    target = _norm(posixpath.join(posixpath.dirname(path), member.linkname))
                    if member.linkname.startswith("/"):
                        target = _norm(member.linkname)
                else:
                    target = _norm(member.linkname)
                if target in seen:
                    scan.missed[target] = relpath
                else:
                    wanted[target] = relpath
            elif path in wanted and member.isfile():
                relpath = wanted.pop(path)
                decompress = path.endswith(".xz") and not relpath.endswith(".xz")
                scan.files[relpath] = _write_member(
                    tf.extractfile(member), dest / relpath, decompress
                )
                scan.sources[relpath] = path
            elif root is not None and member.isfile() and path.startswith(root + "/"):
                rel = path[len(root) + 1 :]
                name = module_name(rel)
                if name and (name in names or any(rel.startswith(d + "/") for d in module_dirs)):
                    data = tf.extractfile(member).read()
                    scan.modules[name] = (rel, decompress_module(rel, data))
            seen.add(path)
            if root is None and not wanted:
                scan.stopped_early = True
                break
    return scan


class CountingReader:
    """A read-only stream that reports how many bytes went through it."""

    def __init__(self, raw: IO[bytes], stage: str, total: int | None, report: Progress) -> None:
        self.raw, self.stage, self.total, self.report = raw, stage, total, report
        self.count = 0
        self._next = 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.count += len(data)
        if self.count >= self._next:
            self.report(self.stage, self.count, max(self.total or 0, self.count) or None)
            self._next = self.count + (16 << 20)
        return data


def scan_deb(
    deb: Path,
    stage: str,
    estimate: int | None,
    report: Progress,
    dest: Path,
    files: Mapping[str, str],
    **kw: Any,
) -> TarScan:
    """:func:`scan_tar` over ``dpkg-deb --fsys-tarfile deb``."""
    cmd = [tool("dpkg-deb"), "--fsys-tarfile", str(deb)]
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err)
        assert proc.stdout is not None
        reader = CountingReader(proc.stdout, stage, estimate, report)
        try:
            scan = scan_tar(reader, dest, files, **kw)  # type: ignore[arg-type]
            if not scan.stopped_early:
                while proc.stdout.read(CHUNK):
                    pass
        except BaseException as e:
            proc.stdout.close()
            proc.kill()
            proc.wait()
            if isinstance(e, tarfile.TarError):
                err.seek(0)
                raise CommandError(
                    cmd,
                    proc.returncode,
                    err.read().decode(errors="replace") + f"\nreading its tar stream: {e}",
                ) from e
            raise
        proc.stdout.close()
        rc = proc.wait()
        if rc != 0 and not scan.stopped_early:
            err.seek(0)
            raise CommandError(cmd, rc, err.read().decode(errors="replace"))
    report(stage, reader.count, reader.count)
    return scan
