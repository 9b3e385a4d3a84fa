"""Cache entries of named kernels: where one lives, its manifest, and its
verification (sizes and sha256 of every file; a stamp of size and mtime per
file keeps a second check from re-hashing 800 MB)."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab.cache import cache_root, sha256_file
from lab.model import KernelArtifacts
from lab.progress import Progress, silent

from .catalog import CatalogEntry

__all__ = [
    "MANIFEST",
    "EntryCheck",
    "artifacts",
    "check_entry",
    "check_manifest",
    "kernel_dir",
    "read_json",
    "stamp_all",
    "verify_entry",
    "write_json",
]


MANIFEST = "manifest.json"


STAMPS = ".verified.json"


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


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.rename(path)


def verify_entry(root: Path, progress: Progress | None = None) -> EntryCheck:
    """Check every file of the entry at *root* against its manifest (exists,
    size, sha256). Files whose size and mtime match the stamp of an earlier
    successful check are not re-hashed; the stamp is updated afterwards."""
    report = progress or silent
    if not (root / MANIFEST).is_file():
        return EntryCheck("missing", ("no manifest",) if root.exists() else ())
    manifest = read_json(root / MANIFEST)
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
    old = read_json(root / STAMPS)
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
            write_json(root / STAMPS, stamps)
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


def artifacts(root: Path, manifest: Mapping[str, Any]) -> KernelArtifacts:
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


def stamp_all(root: Path, manifest: Mapping[str, Any]) -> None:
    stamps = {}
    for rel, rec in manifest["files"].items():
        st = (root / rel).stat()
        stamps[rel] = [rec["size"], st.st_mtime_ns]
    write_json(root / STAMPS, stamps)


def check_entry(entry: CatalogEntry, root: Path, progress: Progress | None) -> EntryCheck:
    check = verify_entry(root, progress)
    if check.state == "cached" and check.manifest is not None:
        why = check_manifest(entry, check.manifest)
        if why:
            return EntryCheck("stale", tuple(why), check.manifest)
    return check
