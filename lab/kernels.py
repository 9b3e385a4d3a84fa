"""Named kernels from Debian's archive, fetched once into the cache.

The lab compares two kernels: ``before`` (Debian 12's 6.12, without "device/dax:
properly refcount device dax pages when mapping") and ``after`` (Debian sid's
7.2, with it). Building them would take an hour; Debian ships the exact
binaries with full DWARF, so this module downloads them with apt and keeps
only what the lab uses: the bzImage, the DWARF vmlinux, the device-dax
modules (decompressed, in load order) and their debug files.

Nothing is hard-coded about versions: ``kernel/catalog.toml`` gives a regex
over package names and templates, and the newest matching ABI in the apt
index is taken. ``before`` comes through the machine's apt configuration;
``after`` through a private apt configuration under the cache (the machine's
sources are never changed).

An entry is written with :func:`lab.cache.atomic_entry`, so an interrupted
fetch leaves nothing half-written, and verified on every use against its
manifest (sizes and sha256; a stamp of size and mtime per file keeps a second
run from re-hashing 800 MB).

Pure parts (catalog, Debian version order, modinfo, load order, apt option
and source parsing, tar selection) are separated from the I/O ones (apt,
dpkg-deb, the cache) so that they can be tested without a network.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import gzip
import hashlib
import json
import lzma
import os
import posixpath
import re
import shutil
import struct
import subprocess
import tarfile
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from lab.cache import atomic_entry, cache_root, sha256_file
from lab.errors import LabFailure
from lab.model import KernelArtifacts, UserError

__all__ = [
    "CATALOG_PATH",
    "AptSource",
    "CatalogEntry",
    "CommandError",
    "EntryCheck",
    "FileRecord",
    "KernelError",
    "KernelStatus",
    "TarScan",
    "archive_source",
    "check_manifest",
    "compare_versions",
    "fetch",
    "kernel_dir",
    "known_kernels",
    "load_catalog",
    "load_order",
    "module_name",
    "newest_first",
    "parse_catalog",
    "parse_control",
    "parse_modinfo",
    "pick_newest",
    "private_apt_options",
    "private_sources_list",
    "resolve",
    "scan_tar",
    "sources_uris",
    "status",
    "verify_entry",
]

CATALOG_PATH = Path(__file__).resolve().parent.parent / "kernel" / "catalog.toml"
MANIFEST = "manifest.json"
STAMPS = ".verified.json"
DEFAULT_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
# A private index older than this is refreshed before a fetch (sid moves daily
# and superseded packages leave the pool).
PRIVATE_INDEX_MAX_AGE = 3600.0
_CHUNK = 1 << 20

Progress = Callable[[str, int, "int | None"], None]


def _silent(stage: str, done: int, total: int | None) -> None:
    pass


# ---------------------------------------------------------------- errors


class KernelError(LabFailure):
    """Fetching or unpacking a kernel failed for a reason other than bad input."""


class CommandError(KernelError):
    """A subprocess failed: carries the command and the tail of its stderr."""

    def __init__(self, cmd: Sequence[str], returncode: int, stderr: str) -> None:
        self.cmd = list(cmd)
        self.returncode = returncode
        self.stderr = stderr
        tail = "\n".join(stderr.strip().splitlines()[-12:])
        super().__init__(
            f"`{' '.join(self.cmd)}` failed with exit status {returncode}"
            + (f":\n{tail}" if tail else " (no stderr)")
        )


# ---------------------------------------------------------------- catalog


@dataclass(frozen=True)
class AptSource:
    """Where a kernel's packages come from: the machine's apt configuration
    (``suite is None``) or a private one for one suite of the Debian archive."""

    suite: str | None = None
    components: tuple[str, ...] = ("main",)

    @property
    def is_system(self) -> bool:
        return self.suite is None

    def __str__(self) -> str:
        return "system" if self.suite is None else f"{self.suite} {' '.join(self.components)}"


_ROLES = ("image", "modules", "dbg")
_PATHS = ("vmlinuz", "vmlinux", "modules", "module_debug")


@dataclass(frozen=True)
class CatalogEntry:
    """One named kernel of ``kernel/catalog.toml``."""

    name: str
    description: str
    apt: AptSource
    abi_regex: str
    release_template: str
    packages: Mapping[str, str]  # role (image, modules, dbg) -> name template
    paths: Mapping[str, str]  # vmlinuz, vmlinux, modules, module_debug -> template
    modules: tuple[str, ...]
    module_dirs: tuple[str, ...]

    def release(self, abi: str) -> str:
        """``uname -r`` of the kernel with this ABI."""
        return self.release_template.format(abi=abi)

    def package(self, role: str, abi: str) -> str:
        return self.packages[role].format(abi=abi, release=self.release(abi))

    def path(self, key: str, abi: str) -> str:
        return self.paths[key].format(abi=abi, release=self.release(abi)).strip("/")

    def package_names(self, abi: str) -> list[str]:
        """The distinct packages, in processing order (image, modules, dbg)."""
        names: list[str] = []
        for role in _ROLES:
            if (pkg := self.package(role, abi)) not in names:
                names.append(pkg)
        return names

    def abi_matches(self, abi: str) -> bool:
        """Whether *abi* is one this entry could resolve to."""
        rx = re.compile(self.abi_regex)
        return any(
            (m := rx.fullmatch(self.package(role, abi))) and m.group(1) == abi for role in _ROLES
        )


def _check_template(where: str, template: Any, allowed: Iterable[str]) -> str:
    if not isinstance(template, str) or not template:
        raise UserError(f"catalog: {where} must be a non-empty string")
    try:
        template.format(**{k: "x" for k in allowed})
    except (KeyError, IndexError, ValueError) as e:
        raise UserError(
            f"catalog: {where} = {template!r}: bad placeholder {e} "
            f"(allowed: {', '.join('{' + k + '}' for k in allowed)})"
        ) from e
    return template


def parse_catalog(text: str) -> dict[str, CatalogEntry]:
    """The named kernels of a catalog's TOML *text*, in file order.

    :raises UserError: naming the key that is missing or malformed.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"catalog: not valid TOML: {e}") from e
    modules = data.get("modules")
    if not isinstance(modules, list) or not modules or not all(isinstance(m, str) for m in modules):
        raise UserError("catalog: top-level `modules` must be a non-empty list of module names")
    module_dirs = data.get("module_dirs", [])
    if not isinstance(module_dirs, list) or not all(isinstance(d, str) for d in module_dirs):
        raise UserError("catalog: `module_dirs` must be a list of directories")
    kernels = data.get("kernels")
    if not isinstance(kernels, dict) or not kernels:
        raise UserError("catalog: no [kernels.NAME] tables")
    out: dict[str, CatalogEntry] = {}
    for name, k in kernels.items():
        where = f"kernels.{name}"
        if not isinstance(k, dict):
            raise UserError(f"catalog: {where} must be a table")
        for key in ("description", "apt", "abi_regex", "packages", "paths"):
            if key not in k:
                raise UserError(f"catalog: {where}.{key} is missing")
        apt = k["apt"]
        if apt == "system":
            source = AptSource()
        elif isinstance(apt, dict) and isinstance(apt.get("suite"), str):
            comps = apt.get("components", ["main"])
            if isinstance(comps, str):
                comps = comps.split()
            source = AptSource(apt["suite"], tuple(comps))
        else:
            raise UserError(f'catalog: {where}.apt must be "system" or {{ suite = "…" }}')
        try:
            rx = re.compile(k["abi_regex"])
        except (re.error, TypeError) as e:
            raise UserError(f"catalog: {where}.abi_regex is not a regex: {e}") from e
        if rx.groups < 1:
            raise UserError(f"catalog: {where}.abi_regex needs a group capturing the ABI")
        release = _check_template(f"{where}.release", k.get("release", "{abi}"), ["abi"])
        packages, paths = k["packages"], k["paths"]
        if not isinstance(packages, dict) or not isinstance(paths, dict):
            raise UserError(f"catalog: {where}.packages and {where}.paths must be tables")
        for role in _ROLES:
            if role not in packages:
                raise UserError(f"catalog: {where}.packages.{role} is missing")
            _check_template(f"{where}.packages.{role}", packages[role], ["abi", "release"])
        if packages["dbg"] == packages["modules"]:
            raise UserError(f"catalog: {where}: the dbg package must differ from the modules one")
        for key in _PATHS:
            if key not in paths:
                raise UserError(f"catalog: {where}.paths.{key} is missing")
            _check_template(f"{where}.paths.{key}", paths[key], ["abi", "release"])
        out[name] = CatalogEntry(
            name=name,
            description=str(k["description"]),
            apt=source,
            abi_regex=k["abi_regex"],
            release_template=release,
            packages={r: packages[r] for r in _ROLES},
            paths={p: paths[p] for p in _PATHS},
            modules=tuple(m.replace("-", "_") for m in modules),
            module_dirs=tuple(d.strip("/") for d in module_dirs),
        )
    return out


def load_catalog(path: Path | None = None) -> dict[str, CatalogEntry]:
    """:func:`parse_catalog` of ``kernel/catalog.toml`` (or *path*)."""
    path = path or CATALOG_PATH
    try:
        text = path.read_text()
    except OSError as e:
        raise UserError(f"cannot read the kernel catalog {path}: {e.strerror}") from e
    return parse_catalog(text)


# ---------------------------------------------------------------- Debian versions


def _order(c: str) -> int:
    # dpkg's order(): digits (and the end) sort as 0, '~' before everything,
    # letters before other characters.
    if c == "~":
        return -1
    if c in "0123456789":
        return 0
    if c.isascii() and c.isalpha():
        return ord(c)
    return ord(c) + 256


def _verrevcmp(a: str, b: str) -> int:
    i = j = 0
    digits = "0123456789"
    while i < len(a) or j < len(b):
        while (i < len(a) and a[i] not in digits) or (j < len(b) and b[j] not in digits):
            ac = _order(a[i]) if i < len(a) else 0
            bc = _order(b[j]) if j < len(b) else 0
            if ac != bc:
                return -1 if ac < bc else 1
            i += 1
            j += 1
        while i < len(a) and a[i] == "0":
            i += 1
        while j < len(b) and b[j] == "0":
            j += 1
        first_diff = 0
        while i < len(a) and a[i] in digits and j < len(b) and b[j] in digits:
            if not first_diff:
                first_diff = ord(a[i]) - ord(b[j])
            i += 1
            j += 1
        if i < len(a) and a[i] in digits:
            return 1
        if j < len(b) and b[j] in digits:
            return -1
        if first_diff:
            return -1 if first_diff < 0 else 1
    return 0


def _split_version(v: str) -> tuple[int, str, str]:
    epoch, _, rest = v.rpartition(":") if ":" in v else ("0", "", v)
    upstream, sep, revision = rest.rpartition("-")
    if not sep:
        upstream, revision = rest, ""
    return int(epoch or 0), upstream, revision


def compare_versions(a: str, b: str) -> int:
    """Debian version order (as ``dpkg --compare-versions``): -1, 0 or 1."""
    ea, ua, ra = _split_version(a)
    eb, ub, rb = _split_version(b)
    if ea != eb:
        return -1 if ea < eb else 1
    return _verrevcmp(ua, ub) or _verrevcmp(ra, rb)


def newest_first(names: Iterable[str], regex: str) -> list[str]:
    """The distinct first groups of *regex* over *names*, newest first."""
    rx = re.compile(regex)
    found = {m.group(1) for n in names if (m := rx.fullmatch(n))}
    return sorted(found, key=functools.cmp_to_key(compare_versions), reverse=True)


def pick_newest(names: Iterable[str], regex: str) -> str:
    """The newest ABI (first group of *regex*) among package *names*.

    :raises KernelError: if no name matches.
    """
    found = newest_first(names, regex)
    if not found:
        raise KernelError(f"no package in the apt index matches {regex}")
    return found[0]


# ---------------------------------------------------------------- apt sources


def _one_line_source(line: str) -> dict[str, Any] | None:
    m = re.match(r"^deb\s+(?:\[([^\]]*)\]\s+)?(\S+)\s+(\S+)((?:\s+\S+)*)\s*$", line)
    if not m:
        return None
    options = dict(o.split("=", 1) for o in (m.group(1) or "").split() if "=" in o)
    return {
        "uris": [m.group(2)],
        "suites": [m.group(3)],
        "components": m.group(4).split(),
        "signed_by": options.get("signed-by"),
    }


def _deb822_paragraphs(text: str) -> Iterator[dict[str, str]]:
    para: dict[str, str] = {}
    key = None
    for raw in text.splitlines() + [""]:
        if raw.startswith("#"):
            continue
        if not raw.strip():
            if para:
                yield para
            para, key = {}, None
        elif raw[0] in " \t" and key:
            para[key] += "\n" + raw.strip()
        elif ":" in raw:
            key, _, value = raw.partition(":")
            key = key.strip().lower()
            para[key] = value.strip()
    return


def sources_uris(text: str) -> dict[str, dict[str, Any]]:
    """The enabled ``deb`` sources of an apt sources file (deb822 ``.sources``
    or one-line ``.list``): ``{uri: {"suites", "components", "signed_by"}}``,
    URIs without a trailing slash, in file order."""
    entries: list[dict[str, Any]] = []
    lines = [ln.strip() for ln in text.splitlines()]
    if any(ln.startswith(("deb ", "deb\t")) for ln in lines):
        entries = [e for ln in lines if (e := _one_line_source(ln.split("#", 1)[0].strip()))]
    else:
        for p in _deb822_paragraphs(text):
            if "deb" not in p.get("types", "").split():
                continue
            if p.get("enabled", "yes").strip().lower() == "no":
                continue
            signed = p.get("signed-by")
            entries.append(
                {
                    "uris": p.get("uris", "").split(),
                    "suites": p.get("suites", "").split(),
                    "components": p.get("components", "").split(),
                    "signed_by": signed if signed and "\n" not in signed else None,
                }
            )
    out: dict[str, dict[str, Any]] = {}
    for e in entries:
        for uri in e["uris"]:
            slot = out.setdefault(
                uri.rstrip("/"), {"suites": [], "components": [], "signed_by": e["signed_by"]}
            )
            slot["suites"] += [s for s in e["suites"] if s not in slot["suites"]]
            slot["components"] += [c for c in e["components"] if c not in slot["components"]]
    return out


def archive_source(sources: Mapping[str, Mapping[str, Any]]) -> tuple[str, str]:
    """``(uri, keyring)`` of the Debian archive among *sources*: the first URI
    carrying a release suite (``bookworm``, not ``bookworm-security``).

    :raises UserError: if there is none.
    """
    for uri, info in sources.items():
        if any("-" not in s and "/" not in s for s in info["suites"]):
            return uri, info.get("signed_by") or DEFAULT_KEYRING
    raise UserError(
        "no Debian archive in the system's apt sources (looked for a URI with a release "
        "suite such as bookworm in /etc/apt/sources.list{,.d/*}): add one"
    )


def private_sources_list(uri: str, suite: str, components: Sequence[str], keyring: str) -> str:
    """The one-line sources file of a private apt configuration."""
    return f"deb [signed-by={keyring}] {uri} {suite} {' '.join(components)}\n"


def private_apt_options(root: Path) -> list[str]:
    """apt-get/apt-cache options that confine apt to *root*: its sources file,
    lists and cache; no system status, preferences or source parts."""
    opts = {
        "Dir::Etc::sourcelist": root / "sources.list",
        "Dir::Etc::sourceparts": root / "empty.d",
        "Dir::Etc::preferences": root / "empty.d" / "none",
        "Dir::Etc::preferencesparts": root / "empty.d",
        "Dir::State::Lists": root / "lists",
        "Dir::Cache": root / "cache",
        "Dir::State::status": "/dev/null",
        "Acquire::Languages": "none",
    }
    return [arg for k, v in opts.items() for arg in ("-o", f"{k}={v}")]


def parse_control(text: str) -> dict[str, str]:
    """The first paragraph of deb822 *text* (``apt-cache show``) as a dict
    keyed by field name as written."""
    out: dict[str, str] = {}
    key = None
    for line in text.splitlines():
        if not line.strip():
            if out:
                break
            continue
        if line[0] in " \t" and key:
            out[key] += "\n" + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


# ---------------------------------------------------------------- modules


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


def _decompress_module(path: str, data: bytes) -> bytes:
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


# ---------------------------------------------------------------- tar selection


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
        while block := reader.read(_CHUNK):
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
    with tarfile.open(fileobj=stream, mode="r|", bufsize=_CHUNK) as tf:
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
                    scan.modules[name] = (rel, _decompress_module(rel, data))
            seen.add(path)
            if root is None and not wanted:
                scan.stopped_early = True
                break
    return scan


# ---------------------------------------------------------------- cache entries


def kernel_dir(name: str) -> Path:
    """``cache_root()/kernels/<name>``: the cache entry of a named kernel."""
    return cache_root() / "kernels" / name


@dataclass(frozen=True)
class EntryCheck:
    """The result of verifying one cache entry."""

    state: str  # "cached", "missing" or "corrupt"
    problems: tuple[str, ...] = ()
    manifest: Mapping[str, Any] | None = None


def _required_files(manifest: Mapping[str, Any]) -> list[str]:
    mods = manifest.get("modules", [])
    return (
        ["vmlinuz", "vmlinux"] + [f"modules/{m}.ko" for m in mods] + [f"debug/{m}.ko" for m in mods]
    )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.rename(path)


def verify_entry(root: Path, progress: Progress | None = None) -> EntryCheck:
    """Check every file of the entry at *root* against its manifest (exists,
    size, sha256). Files whose size and mtime match the stamp of an earlier
    successful check are not re-hashed; the stamp is updated afterwards."""
    report = progress or _silent
    if not (root / MANIFEST).is_file():
        return EntryCheck("missing", ("no manifest",) if root.exists() else ())
    manifest = _read_json(root / MANIFEST)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (
        not isinstance(files, dict)
        or not isinstance(manifest.get("modules"), list)
        or not all(
            isinstance(r, dict)
            and isinstance(r.get("size"), int)
            and isinstance(r.get("sha256"), str)
            for r in files.values()
        )
        or not all(isinstance(manifest.get(k), str) for k in ("name", "release", "abi"))
        or not isinstance(manifest.get("packages"), dict)
    ):
        return EntryCheck("corrupt", ("manifest.json is unreadable or incomplete",))
    problems = [
        f"{rel}: not in the manifest" for rel in _required_files(manifest) if rel not in files
    ]
    old = _read_json(root / STAMPS)
    old = old if isinstance(old, dict) else {}
    stamps: dict[str, list[int]] = {}
    to_hash: list[tuple[str, Path, int]] = []
    for rel, rec in files.items():
        path = root / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            problems.append(f"{rel}: path outside the entry")
            continue
        try:
            st = path.stat()
        except OSError:
            problems.append(f"{rel}: missing")
            continue
        if st.st_size != rec["size"]:
            problems.append(f"{rel}: size {st.st_size}, expected {rec['size']}")
            continue
        stamp = [st.st_size, st.st_mtime_ns]
        if old.get(rel) == stamp:
            stamps[rel] = stamp
        else:
            to_hash.append((rel, path, st.st_mtime_ns))
    total = sum(files[rel]["size"] for rel, _, _ in to_hash)
    done = 0
    for rel, path, mtime in to_hash:
        if sha256_file(path) != files[rel]["sha256"]:
            problems.append(f"{rel}: sha256 differs from the manifest")
        else:
            stamps[rel] = [files[rel]["size"], mtime]
        done += files[rel]["size"]
        report(f"verify {root.name}", done, total)
    if stamps != old:
        with contextlib.suppress(OSError):
            _write_json(root / STAMPS, stamps)
    if problems:
        return EntryCheck("corrupt", tuple(problems), manifest)
    return EntryCheck("cached", (), manifest)


def check_manifest(entry: CatalogEntry, manifest: Mapping[str, Any]) -> list[str]:
    """Why a verified entry no longer fits the catalog (empty if it does):
    another ABI pattern, other packages or fewer modules than wanted."""
    abi = manifest.get("abi", "")
    why = []
    if not abi or not entry.abi_matches(abi):
        why.append(f"ABI {abi!r} does not match {entry.abi_regex}")
    elif set(manifest.get("packages", {})) != set(entry.package_names(abi)):
        why.append("packages differ from the catalog's")
    missing = [m for m in entry.modules if m not in manifest.get("modules", [])]
    if missing:
        why.append(f"modules not in the entry: {', '.join(missing)}")
    return why


def _artifacts(root: Path, manifest: Mapping[str, Any]) -> KernelArtifacts:
    mods = list(manifest["modules"])
    return KernelArtifacts(
        name=manifest["name"],
        release=manifest["release"],
        vmlinuz=root / "vmlinuz",
        vmlinux=root / "vmlinux",
        modules=tuple(root / "modules" / f"{m}.ko" for m in mods),
        module_debug=tuple(root / "debug" / f"{m}.ko" for m in mods),
        packages=tuple(manifest["packages"].items()),
        root=root,
    )


# ---------------------------------------------------------------- apt (I/O)


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise UserError(f"`{name}` is not installed: run `devdax-lab doctor`")
    return path


def _run(cmd: Sequence[str], *, cwd: Path | None = None) -> str:
    proc = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise CommandError(cmd, proc.returncode, proc.stderr)
    return proc.stdout


def _system_sources() -> dict[str, dict[str, Any]]:
    merged: dict[str, dict[str, Any]] = {}
    etc = Path("/etc/apt")
    files = (
        [etc / "sources.list"]
        + sorted((etc / "sources.list.d").glob("*.list"))
        + sorted((etc / "sources.list.d").glob("*.sources"))
    )
    for f in files:
        with contextlib.suppress(OSError):
            for uri, info in sources_uris(f.read_text()).items():
                merged.setdefault(uri, info)
    return merged


class _Apt:
    """apt-get and apt-cache with either the system's configuration or a
    private one under ``cache_root()/apt/<suite>``."""

    def __init__(self, source: AptSource) -> None:
        self.source = source
        self.root = None if source.is_system else cache_root() / "apt" / source.suite
        self.options = [] if self.root is None else private_apt_options(self.root)
        self.label = "system apt index" if self.root is None else f"{source.suite} index"
        self.updated = False

    # root downloads into a directory the _apt user cannot enter (the cache is
    # under ~root): apt would fall back to root with a warning; say so up front.
    def _sandbox(self) -> list[str]:
        return ["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else []

    def has_index(self) -> bool:
        if self.root is None:
            return True
        lists = self.root / "lists"
        return (self.root / "sources.list").is_file() and any(lists.glob("*_Packages*"))

    def index_age(self) -> float:
        assert self.root is not None
        mtimes = [p.stat().st_mtime for p in (self.root / "lists").glob("*_Packages*")]
        return time.time() - max(mtimes) if mtimes else float("inf")

    def update(self, report: Progress) -> None:
        report(f"update {self.label}", 0, 1)
        if self.root is None:
            _run([_tool("apt-get"), "update", "-q"])
        else:
            uri, keyring = archive_source(_system_sources())
            text = private_sources_list(uri, self.source.suite, self.source.components, keyring)
            for d in ("lists/partial", "cache/archives/partial", "empty.d"):
                (self.root / d).mkdir(parents=True, exist_ok=True)
            if (
                not (self.root / "sources.list").is_file()
                or (self.root / "sources.list").read_text() != text
            ):
                (self.root / "sources.list").write_text(text)
            _run([_tool("apt-get"), *self.options, *self._sandbox(), "update", "-q"])
        self.updated = True
        report(f"update {self.label}", 1, 1)

    def names(self) -> set[str]:
        if not self.has_index():
            return set()
        return set(_run([_tool("apt-cache"), *self.options, "pkgnames"]).split())

    def show(self, package: str) -> dict[str, str] | None:
        """The candidate version's control fields, or None if unknown."""
        if not self.has_index():
            return None
        cmd = [_tool("apt-cache"), *self.options, "show", "--no-all-versions", package]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not proc.stdout.strip():
            return None
        return parse_control(proc.stdout)

    def download(self, package: str, info: Mapping[str, str], dest: Path, report: Progress) -> None:
        """``apt-get download package=version`` into *dest*, reporting the
        growing file's size."""
        stage = f"download {package}"
        size = int(info["Size"])
        work = dest.parent / f".download-{package}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        cmd = [
            _tool("apt-get"),
            *self.options,
            *self._sandbox(),
            "download",
            "-q",
            f"{package}={info['Version']}",
        ]
        try:
            with tempfile.TemporaryFile() as err:
                proc = subprocess.Popen(cmd, cwd=work, stdout=subprocess.DEVNULL, stderr=err)
                try:
                    while proc.poll() is None:
                        report(stage, _dir_bytes(work), size)
                        time.sleep(0.25)
                except BaseException:
                    proc.terminate()
                    proc.wait()
                    raise
                if proc.returncode != 0:
                    err.seek(0)
                    raise CommandError(cmd, proc.returncode, err.read().decode(errors="replace"))
            debs = list(work.glob("*.deb"))
            if len(debs) != 1:
                raise KernelError(f"{' '.join(cmd)} left {len(debs)} .deb files in {work}")
            debs[0].rename(dest)
            report(stage, size, size)
        finally:
            shutil.rmtree(work, ignore_errors=True)


def _dir_bytes(d: Path) -> int:
    total = 0
    for p in d.rglob("*"):
        with contextlib.suppress(OSError):
            if p.is_file():
                total += p.stat().st_size
    return total


# ---------------------------------------------------------------- fetch (I/O)


@dataclass(frozen=True)
class _Plan:
    abi: str
    infos: dict[str, dict[str, str]]  # package -> control fields of the candidate


def _plan(entry: CatalogEntry, apt: _Apt) -> _Plan | None:
    """The newest ABI whose packages are all in the index (None if none is)."""
    for abi in newest_first(apt.names(), entry.abi_regex):
        infos = {pkg: apt.show(pkg) for pkg in entry.package_names(abi)}
        if all(infos.values()):
            return _Plan(abi, infos)  # type: ignore[arg-type]
    return None


def _planned(entry: CatalogEntry, apt: _Apt, report: Progress) -> _Plan:
    if not apt.source.is_system and (
        not apt.has_index() or apt.index_age() > PRIVATE_INDEX_MAX_AGE
    ):
        apt.update(report)
    plan = _plan(entry, apt)
    if plan is None and not apt.updated:
        apt.update(report)
        plan = _plan(entry, apt)
    if plan is None:
        raise KernelError(
            f"kernel {entry.name!r}: no ABI matching {entry.abi_regex} has all of its packages "
            f"({', '.join(entry.packages.values())}) in the {apt.label}"
        )
    return plan


class _CountingReader:
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


def _scan_deb(
    deb: Path,
    stage: str,
    estimate: int | None,
    report: Progress,
    dest: Path,
    files: Mapping[str, str],
    **kw: Any,
) -> TarScan:
    """:func:`scan_tar` over ``dpkg-deb --fsys-tarfile deb``."""
    cmd = [_tool("dpkg-deb"), "--fsys-tarfile", str(deb)]
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err)
        assert proc.stdout is not None
        reader = _CountingReader(proc.stdout, stage, estimate, report)
        try:
            scan = scan_tar(reader, dest, files, **kw)  # type: ignore[arg-type]
            if not scan.stopped_early:
                while proc.stdout.read(_CHUNK):
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


def _deb_path(info: Mapping[str, str]) -> Path:
    return cache_root() / "debs" / posixpath.basename(info["Filename"])


def _obtain(
    apt: _Apt, package: str, info: Mapping[str, str], report: Progress, timings: dict[str, float]
) -> tuple[Path, str]:
    """The verified .deb of *package* in ``cache_root()/debs`` and its sha256:
    one left by an interrupted fetch is reused if it matches the index."""
    deb = _deb_path(info)
    deb.parent.mkdir(parents=True, exist_ok=True)
    expected = info.get("SHA256")
    if deb.is_file() and deb.stat().st_size == int(info["Size"]):
        digest = sha256_file(deb)
        if digest == expected:
            report(f"download {package}", deb.stat().st_size, int(info["Size"]))
            return deb, digest
    deb.unlink(missing_ok=True)
    started = time.monotonic()
    apt.download(package, info, deb, report)
    timings[f"download {package}"] = round(time.monotonic() - started, 2)
    digest = sha256_file(deb)
    if expected and digest != expected:
        deb.unlink(missing_ok=True)
        raise KernelError(f"{deb.name}: sha256 {digest} differs from the index's {expected}")
    return deb, digest


def _download_all(
    entry: CatalogEntry, apt: _Apt, report: Progress, timings: dict[str, float]
) -> tuple[_Plan, dict[str, tuple[Path, str]]]:
    """Plan and download every package; on a failed download with an index not
    refreshed in this run (the archive moved on), refresh and plan again once."""
    while True:
        plan = _planned(entry, apt, report)
        try:
            debs = {
                pkg: _obtain(apt, pkg, info, report, timings) for pkg, info in plan.infos.items()
            }
            return plan, debs
        except CommandError:
            if apt.updated:
                raise
            apt.update(report)


def _build_entry(
    entry: CatalogEntry,
    plan: _Plan,
    debs: Mapping[str, tuple[Path, str]],
    tmp: Path,
    report: Progress,
    timings: dict[str, float],
) -> dict[str, Any]:
    """Extract everything the lab needs from the downloaded packages into
    *tmp*; return the manifest (also written there)."""
    abi = plan.abi
    release = entry.release(abi)
    image, modpkg, dbg = (entry.package(r, abi) for r in _ROLES)
    files: dict[str, FileRecord] = {}
    sources: dict[str, str] = {}
    order: list[str] = []
    module_paths: dict[str, str] = {}

    def scan(pkg: str, wants: dict[str, str], **kw: Any) -> TarScan:
        installed = plan.infos[pkg].get("Installed-Size", "")
        estimate = int(installed) * 1024 if installed.isdigit() else None
        started = time.monotonic()
        result = _scan_deb(debs[pkg][0], f"extract {pkg}", estimate, report, tmp, wants, **kw)
        if result.missed:  # a wanted link pointed back: one more pass for the targets
            again = _scan_deb(
                debs[pkg][0], f"extract {pkg} (links)", estimate, report, tmp, result.missed
            )
            result.files.update(again.files)
            result.sources.update(again.sources)
        timings[f"extract {pkg}"] = round(time.monotonic() - started, 2)
        files.update(result.files)
        sources.update({rel: f"{pkg}:{path}" for rel, path in result.sources.items()})
        lost = [rel for rel in wants.values() if rel not in result.files]
        if lost:
            raise KernelError(
                f"{pkg}: not found in the package: "
                + ", ".join(f"{p} (for {r})" for p, r in wants.items() if r in lost)
            )
        return result

    for pkg in entry.package_names(abi):
        if pkg == dbg:
            continue
        wants = {}
        if pkg == image:
            wants[entry.path("vmlinuz", abi)] = "vmlinuz"
        kw: dict[str, Any] = {}
        if pkg == modpkg:
            kw = {
                "module_root": entry.path("modules", abi),
                "module_dirs": entry.module_dirs,
                "module_names": entry.modules,
            }
        result = scan(pkg, wants, **kw)
        if pkg != modpkg:
            continue
        deps = {n: parse_modinfo(ko) for n, (_, ko) in result.modules.items()}
        try:
            order = load_order({n: i["depends"] for n, i in deps.items()}, entry.modules)
        except KernelError as e:
            raise KernelError(
                f"{pkg}: {e}; modules were read from {', '.join(entry.module_dirs)} under "
                f"{entry.path('modules', abi)} (add its directory to module_dirs in "
                f"kernel/catalog.toml)"
            ) from e
        for name in order:
            rel, ko = result.modules[name]
            vermagic = (deps[name].get("vermagic") or [""])[0].split(" ")[0]
            if vermagic != release:
                raise KernelError(f"{pkg}: {rel} is built for {vermagic!r}, not {release!r}")
            relpath = f"modules/{name}.ko"
            (tmp / "modules").mkdir(exist_ok=True)
            (tmp / relpath).write_bytes(ko)
            files[relpath] = FileRecord(len(ko), hashlib.sha256(ko).hexdigest())
            sources[relpath] = f"{pkg}:{entry.path('modules', abi)}/{rel}"
            module_paths[name] = rel
    wants = {entry.path("vmlinux", abi): "vmlinux"}
    for name in order:
        base = module_paths[name]
        for suffix in (".xz", ".gz"):
            base = base.removesuffix(suffix)
        wants[f"{entry.path('module_debug', abi)}/{base}"] = f"debug/{name}.ko"
    scan(dbg, wants)

    manifest = {
        "format": 1,
        "name": entry.name,
        "description": entry.description,
        "abi": abi,
        "release": release,
        "apt": str(entry.apt),
        "packages": {pkg: plan.infos[pkg]["Version"] for pkg in entry.package_names(abi)},
        "debs": {
            debs[p][0].name: {"sha256": debs[p][1], "size": int(plan.infos[p]["Size"])}
            for p in entry.package_names(abi)
        },
        "files": {rel: {"size": r.size, "sha256": r.sha256} for rel, r in sorted(files.items())},
        "sources": dict(sorted(sources.items())),
        "modules": order,
        "wanted_modules": list(entry.modules),
        "fetched_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "timings": timings,
    }
    _write_json(tmp / MANIFEST, manifest)
    return manifest


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    lock = cache_root() / "kernels" / f".{name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _stamp_all(root: Path, manifest: Mapping[str, Any]) -> None:
    stamps = {}
    for rel, rec in manifest["files"].items():
        st = (root / rel).stat()
        stamps[rel] = [rec["size"], st.st_mtime_ns]
    _write_json(root / STAMPS, stamps)


# ---------------------------------------------------------------- public API


def known_kernels() -> list[str]:
    """The names in ``kernel/catalog.toml``, in file order, then the kernels
    built by ``devdax-lab kernel build`` (:mod:`lab.build`), sorted."""
    from lab import build

    catalog = list(load_catalog())
    return catalog + [n for n in build.built_names() if n not in catalog]


def _is_path(name: str) -> bool:
    return os.sep in name or name.startswith((".", "~"))


def _local(name: str, catalog: Mapping[str, CatalogEntry] | None) -> KernelArtifacts | None:
    """A kernel tree built in place (*name* is a path) or one registered by
    ``devdax-lab kernel build``; None for a catalog name."""
    from lab import build

    if _is_path(name):
        path = Path(name).expanduser()
        if not path.is_dir():
            raise UserError(
                f"{name}: no such directory (kernel trees are given by path: a tree built in "
                "place, or one built with `devdax-lab kernel build --tree DIR`)"
            )
        return build.tree_artifacts(path)
    if name in (catalog if catalog is not None else load_catalog()):
        return None
    return build.built_artifacts(name)


def _entry(name: str, catalog: Mapping[str, CatalogEntry] | None = None) -> CatalogEntry:
    catalog = catalog if catalog is not None else load_catalog()
    if name not in catalog:
        raise UserError(
            f"unknown kernel {name!r}: known kernels are {', '.join(catalog)}; "
            "a path to a built kernel tree is also accepted, or a name registered by "
            "`devdax-lab kernel build`"
        )
    return catalog[name]


def _check(entry: CatalogEntry, root: Path, progress: Progress | None) -> EntryCheck:
    check = verify_entry(root, progress)
    if check.state == "cached" and check.manifest is not None:
        why = check_manifest(entry, check.manifest)
        if why:
            return EntryCheck("stale", tuple(why), check.manifest)
    return check


def _fetch_entry(
    entry: CatalogEntry,
    progress: Progress | None,
    force: bool,
    catalog: Mapping[str, CatalogEntry] | None,
) -> KernelArtifacts:
    report = progress or _silent
    root = kernel_dir(entry.name)
    with _locked(entry.name):
        if not force:
            check = _check(entry, root, progress)
            if check.state == "cached":
                return _artifacts(root, check.manifest)  # type: ignore[arg-type]
        # Holding the lock, leftovers of killed fetches of this kernel are ours.
        for old in root.parent.glob(f".{entry.name}.partial-*"):
            shutil.rmtree(old, ignore_errors=True)
        apt = _Apt(entry.apt)
        timings: dict[str, float] = {}
        plan, debs = _download_all(entry, apt, report, timings)
        with atomic_entry(root) as tmp:
            tmp.chmod(0o755)  # readable by whoever runs QEMU and drgn, like the rest
            manifest = _build_entry(entry, plan, debs, tmp, report, timings)
        _stamp_all(root, manifest)
        for deb, _ in debs.values():
            deb.unlink(missing_ok=True)
        return _artifacts(root, manifest)


def fetch(
    name: str,
    progress: Progress | None = None,
    force: bool = False,
    *,
    catalog: Mapping[str, CatalogEntry] | None = None,
) -> KernelArtifacts:
    """Download and unpack the named kernel into its cache entry, unless a
    verified entry that fits the catalog is already there (*force* fetches
    anyway: the way to move to a newer ABI). Uses the network through apt.

    :raises UserError: unknown name, missing tool.
    :raises KernelError: apt, dpkg-deb or the packages' contents failed us.
    """
    return _fetch_entry(_entry(name, catalog), progress, force, catalog)


def resolve(
    name: str,
    *,
    fetch: bool = True,
    progress: Progress | None = None,
    catalog: Mapping[str, CatalogEntry] | None = None,
) -> KernelArtifacts:
    """The local files of the named kernel: the verified cache entry, or a
    fresh one fetched now (if *fetch*; otherwise a missing, corrupt or stale
    entry is a :class:`UserError`). A path to a kernel tree built in place, or
    a name registered by ``devdax-lab kernel build``, gives its bzImage and
    vmlinux (no modules)."""
    if (local := _local(name, catalog)) is not None:
        return local
    entry = _entry(name, catalog)
    root = kernel_dir(entry.name)
    check = _check(entry, root, progress)
    if check.state == "cached":
        return _artifacts(root, check.manifest)  # type: ignore[arg-type]
    if not fetch:
        detail = f": {'; '.join(check.problems)}" if check.problems else ""
        raise UserError(
            f"kernel {name!r} is {check.state} in {root}{detail}; fetching it was not allowed"
        )
    return _fetch_entry(entry, progress, force=check.state != "missing", catalog=catalog)


@dataclass(frozen=True)
class KernelStatus:
    """One line of ``devdax-lab kernels``: what a named kernel is and whether
    its cache entry is usable."""

    name: str
    description: str
    state: str  # "cached", "missing", "corrupt" or "stale" (cached, but not what the catalog says)
    path: Path
    release: str | None = None  # of the cached entry, else of the newest ABI in the local index
    abi: str | None = None
    packages: tuple[tuple[str, str], ...] = ()  # (package, version) of the cached entry
    source: str = "system"
    problems: tuple[str, ...] = ()


def status(
    name: str,
    *,
    catalog: Mapping[str, CatalogEntry] | None = None,
    progress: Progress | None = None,
) -> KernelStatus:
    """The state of the named kernel's cache entry. Never touches the network:
    when nothing usable is cached, the release is the newest one in the apt
    index already on this machine (None if there is none)."""
    if (local := _local(name, catalog)) is not None:
        assert local.root is not None
        built = not _is_path(name)
        return KernelStatus(
            name=local.name,
            description=f"built from {_built_tree(local.root)}" if built else "tree built in place",
            state="cached",
            path=local.root,
            release=local.release,
            source="built" if built else "tree",
        )
    entry = _entry(name, catalog)
    root = kernel_dir(name)
    check = _check(entry, root, progress)
    m = check.manifest or {}
    abi, release = m.get("abi"), m.get("release")
    packages = tuple(m.get("packages", {}).items())
    if not abi:
        with contextlib.suppress(KernelError, UserError, OSError):
            apt = _Apt(entry.apt)
            if apt.has_index():
                plan = _plan(entry, apt)
                if plan is not None:
                    abi, release = plan.abi, entry.release(plan.abi)
                    packages = tuple((p, i["Version"]) for p, i in plan.infos.items())
    return KernelStatus(
        name=name,
        description=entry.description,
        state=check.state,
        path=root,
        release=release,
        abi=abi,
        packages=packages,
        source=str(entry.apt),
        problems=check.problems,
    )


def _built_tree(root: Path) -> str:
    try:
        m = json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError):
        return "?"
    patches = len(m.get("patches", []))
    return m.get("tree", "?") + (f" + {patches} patch(es)" if patches else "")
