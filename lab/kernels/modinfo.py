"""Kernel modules: the ``.modinfo`` section read from the ELF file (no
modinfo binary, no kernel headers), names as the kernel folds them, and the
load order from their ``depends`` (pure)."""

from __future__ import annotations

import gzip
import lzma
import posixpath
import struct
from collections.abc import Iterable, Mapping, Sequence

from .errors import KernelError

__all__ = ["decompress_module", "load_order", "module_name", "parse_modinfo"]


def _elf_sections(data: bytes) -> dict[str, bytes]:
    if data[:4] != b"\x7fELF" or len(data) < 64:
        raise KernelError("not an ELF file")
    bits, endian = data[4], {1: "<", 2: ">"}.get(data[5])
    if bits not in (1, 2) or endian is None:
        raise KernelError("unknown ELF class or byte order")
    try:
        if bits == 2:
            (shoff,) = struct.unpack_from(endian + "Q", data, 0x28)
            shentsize, shnum, shstrndx = struct.unpack_from(endian + "HHH", data, 0x3A)
            fmt = endian + "IIQQQQIIQQ"
        else:
            (shoff,) = struct.unpack_from(endian + "I", data, 0x20)
            shentsize, shnum, shstrndx = struct.unpack_from(endian + "HHH", data, 0x2E)
            fmt = endian + "IIIIIIIIII"
        headers = [struct.unpack_from(fmt, data, shoff + i * shentsize) for i in range(shnum)]
        names_off, names_size = headers[shstrndx][4], headers[shstrndx][5]
    except (struct.error, IndexError) as exc:
        raise KernelError("truncated ELF section headers") from exc
    names = data[names_off : names_off + names_size]
    out = {}
    for h in headers:
        name = names[h[0] : names.find(b"\0", h[0])].decode(errors="replace")
        if h[1] != 8:  # SHT_NOBITS has no bytes in the file
            out[name] = data[h[4] : h[4] + h[5]]
    return out


def parse_modinfo(ko: bytes) -> dict[str, list[str]]:
    """The ``.modinfo`` section of a kernel module (``key=value`` strings
    separated by NULs) as ``{key: [values]}``; ``depends`` is split on commas.

    :raises KernelError: if *ko* is not an ELF module with a ``.modinfo``.
    """
    sections = _elf_sections(ko)
    if ".modinfo" not in sections:
        raise KernelError("ELF file has no .modinfo section: not a kernel module")
    out: dict[str, list[str]] = {}
    for item in sections[".modinfo"].split(b"\0"):
        if b"=" not in item:
            continue
        key, _, value = item.decode(errors="replace").partition("=")
        if key == "depends":
            out.setdefault(key, []).extend(d for d in value.split(",") if d)
        else:
            out.setdefault(key, []).append(value)
    out.setdefault("depends", [])
    return out


_MODULE_SUFFIXES = (".ko.xz", ".ko.gz", ".ko")


def module_name(path: str) -> str | None:
    """``nd_pmem`` for ``…/nd_pmem.ko.xz`` (dashes folded to underscores, as
    the kernel does); ``None`` for a path that is not a module."""
    base = posixpath.basename(path)
    for suffix in _MODULE_SUFFIXES:
        if base.endswith(suffix):
            return base[: -len(suffix)].replace("-", "_")
    return None


def decompress_module(path: str, data: bytes) -> bytes:
    if path.endswith(".xz"):
        return lzma.decompress(data)
    if path.endswith(".gz"):
        return gzip.decompress(data)
    return data


def load_order(deps: Mapping[str, Sequence[str]], wanted: Iterable[str]) -> list[str]:
    """The closure of *wanted* under *deps* (module -> modules it needs),
    dependencies first, otherwise in the order wanted.

    :raises KernelError: naming a module that is not in *deps* (and which
        module needs it), or a dependency cycle.
    """
    order: list[str] = []
    state: dict[str, int] = {}  # 1 = on the current path, 2 = placed

    def visit(name: str, chain: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            raise KernelError(f"module dependency cycle: {' -> '.join(chain + [name])}")
        if name not in deps:
            needed = f" (needed by {' <- '.join(reversed(chain))})" if chain else ""
            raise KernelError(f"module {name!r}{needed} is not among the available modules")
        state[name] = 1
        for dep in deps[name]:
            visit(dep.replace("-", "_"), chain + [name])
        state[name] = 2
        order.append(name)

    for w in wanted:
        visit(w.replace("-", "_"), [])
    return order
