"""Build the guest initramfs for one kernel: busybox, ndctl/daxctl with their
libraries, the kernel's device-dax modules in load order, the static guest
agent and /init. Cached by a hash of every input, so a rebuild happens only
when something that goes into the image changed.

The cpio archive is written here in Python (``newc`` format, every mtime 0)
so the same inputs give the same bytes.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .cache import cache_root, cached_entry, hash_inputs, prune_unused, sha256_file
from .data import data_path
from .errors import LabFailure
from .model import KernelArtifacts, UserError

__all__ = [
    "IMAGE_DIR",
    "ImageError",
    "CpioEntry",
    "write_cpio",
    "parse_ldd",
    "build_agent",
    "build_image",
]

IMAGE_DIR = data_path("vm-images")


class ImageError(LabFailure):
    """Building the guest image failed (a compiler or ldd error): carries the
    command and its output."""


@dataclass(frozen=True)
class CpioEntry:
    """One member of the archive: a directory, a regular file or a symlink."""

    path: str  # inside the archive, no leading slash
    mode: int  # including the file type bits
    data: bytes = b""  # file contents, or the symlink target


def _cpio_header(ino: int, entry: CpioEntry, namesize: int, filesize: int) -> bytes:
    fields = [ino, entry.mode, 0, 0, 1, 0, filesize, 0, 0, 0, 0, namesize, 0]
    return b"070701" + b"".join(b"%08X" % f for f in fields)


def _pad4(n: int) -> bytes:
    return b"\0" * ((4 - n % 4) % 4)


def write_cpio(entries: Iterable[CpioEntry]) -> bytes:
    """Serialise *entries* as a ``newc`` cpio archive (what the kernel unpacks
    as an initramfs). Pure: equal entries give equal bytes."""
    out = bytearray()
    for ino, entry in enumerate([*entries, CpioEntry("TRAILER!!!", 0)], start=1):
        name = entry.path.encode() + b"\0"
        header = _cpio_header(ino if entry.mode else 0, entry, len(name), len(entry.data))
        out += header + name
        out += _pad4(len(header) + len(name))
        out += entry.data + _pad4(len(entry.data))
    return bytes(out)


_LDD_LINE = re.compile(r"^\s*(?:\S+\s+=>\s+)?(/\S+)\s+\(0x[0-9a-f]+\)\s*$")


def parse_ldd(lines: Iterable[str]) -> list[str]:
    """Absolute paths of the shared objects in ``ldd`` output (the vdso has no
    file and is skipped)."""
    found = []
    for line in lines:
        m = _LDD_LINE.match(line)
        if m and m.group(1) not in found:
            found.append(m.group(1))
    return found


def _run(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise UserError(f"{argv[0]} is not installed: run `devdax-lab doctor`") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-20:])
        raise ImageError(f"{' '.join(argv)} failed with exit {proc.returncode}:\n{tail}")
    return proc.stdout


def _recipe() -> dict:
    return tomllib.loads((IMAGE_DIR / "image.toml").read_text())


def build_agent(recipe: dict | None = None) -> Path:
    """Compile the guest agent statically, cached by its source and flags."""
    recipe = recipe or _recipe()
    source = IMAGE_DIR / recipe["agent_source"]
    flags = list(recipe["agent_cflags"])
    key = hash_inputs(source, " ".join(flags), _run(["gcc", "--version"]).splitlines()[0])
    final = cached_entry(cache_root() / "agent" / key,
                         lambda tmp: _run(["gcc", *flags, "-o", str(tmp / "agent"), str(source)]),
                         complete=lambda e: (e / "agent").exists(),
                         what="compiling the guest agent")
    return final / "agent"


def _file_entries(host_path: str, guest_path: str) -> list[CpioEntry]:
    """The file at *host_path* (following symlinks) stored at *guest_path*."""
    data = Path(host_path).read_bytes()
    mode = stat.S_IFREG | (os.stat(host_path).st_mode & 0o777)
    return [CpioEntry(guest_path.lstrip("/"), mode, data)]


def _dirs_for(paths: Iterable[str]) -> list[CpioEntry]:
    dirs = set()
    for p in paths:
        parent = Path(p).parent
        while str(parent) not in ("", ".", "/"):
            dirs.add(str(parent))
            parent = parent.parent
    return [CpioEntry(d, stat.S_IFDIR | 0o755) for d in sorted(dirs)]


def image_entries(kernel: KernelArtifacts, agent: Path, recipe: dict) -> list[CpioEntry]:
    """Every member of the initramfs of *kernel*, directories first."""
    files: list[CpioEntry] = []
    files += _file_entries(recipe["busybox"], "bin/busybox")
    files += _file_entries(str(agent), "bin/agent")
    files += _file_entries(str(IMAGE_DIR / recipe["init"]), "init")
    libs: list[str] = []
    for program in recipe["programs"]:
        files += _file_entries(program, "usr/bin/" + Path(program).name)
        for lib in parse_ldd(_run(["ldd", program]).splitlines()):
            if lib not in libs:
                libs.append(lib)
    for lib in libs:
        files += _file_entries(lib, lib)
    order = []
    for module in kernel.modules:
        name = module.name.removesuffix(".ko")
        order.append(name)
        files += _file_entries(str(module), f"lib/modules/{name}.ko")
    files.append(
        CpioEntry("etc/devdax-lab/modules.order", stat.S_IFREG | 0o644, "\n".join(order).encode() + b"\n")
    )
    links = [CpioEntry("sbin", stat.S_IFLNK | 0o777, b"bin")]
    fixed_dirs = [CpioEntry(d, stat.S_IFDIR | 0o755) for d in ("dev", "proc", "sys", "tmp", "run")]
    dirs = _dirs_for(e.path for e in files)
    return fixed_dirs + dirs + links + files


def build_image(kernel: KernelArtifacts) -> Path:
    """The initramfs for *kernel*, built if its inputs changed since last time.

    :return: path of the cached ``initramfs.cpio``
    """
    recipe = _recipe()
    missing = [p for p in [recipe["busybox"], *recipe["programs"]] if not Path(p).exists()]
    if missing:
        pkgs = ", ".join(recipe["packages"].get(p, p) for p in missing)
        raise UserError(f"missing {', '.join(missing)} (Debian: {pkgs}): run `devdax-lab doctor`")
    agent = build_agent(recipe)
    inputs: list = [(IMAGE_DIR / "image.toml"), (IMAGE_DIR / recipe["init"]), sha256_file(agent)]
    inputs += [sha256_file(Path(p)) for p in [recipe["busybox"], *recipe["programs"]]]
    inputs += [f"{m.name}:{sha256_file(m)}" for m in kernel.modules]
    inputs.append(Path(__file__).read_text())
    key = hash_inputs(*inputs)
    name = f"{kernel.name}-{kernel.release}"

    def build(tmp: Path) -> None:
        (tmp / "initramfs.cpio").write_bytes(write_cpio(image_entries(kernel, agent, recipe)))

    final = cached_entry(cache_root() / "images" / f"{name}-{key}", build,
                         complete=lambda e: (e / "initramfs.cpio").exists(),
                         what=f"building the guest image of {name}")
    _prune_old_images(final)
    return final / "initramfs.cpio"


def _prune_old_images(current: Path) -> None:
    """Remove the other images of the same kernel and release (a few MB each:
    an input changed) that no run used for a day.

    Not at once: two checkouts of the lab side by side (another branch, a CI
    job) share the cache but differ in an input, each with its image of the
    same kernel in use, and a run may be about to boot an image another run
    would call old; :func:`lab.cache.prune_unused` removes only an entry no
    one has used for a day, holding its lock."""
    mine = re.compile(re.escape(current.name.rsplit("-", 1)[0]) + r"-[0-9a-f]{16}")
    prune_unused(p for p in current.parent.iterdir() if p != current and mine.fullmatch(p.name))
