"""Fetching a named kernel: plan the newest ABI whose packages are all in the
index, download them (reusing a verified .deb left by an interrupted fetch),
extract what the lab uses into a new cache entry and write its manifest.
One fetch of a kernel at a time (:func:`lab.cache.locked`)."""

from __future__ import annotations

import hashlib
import posixpath
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lab.cache import atomic_entry, cache_root, entry_lock, locked, sha256_file
from lab.model import KernelArtifacts
from lab.progress import Progress, silent

from .apt import Apt
from .catalog import ROLES, CatalogEntry
from .entries import MANIFEST, artifacts, check_entry, kernel_dir, stamp_all, write_json
from .errors import CommandError, KernelError
from .extract import FileRecord, TarScan, scan_deb
from .modinfo import load_order, parse_modinfo
from .versions import newest_first

__all__ = ["PRIVATE_INDEX_MAX_AGE", "Plan", "download_all", "fetch_entry", "newest_plan"]


# A private index older than this is refreshed before a fetch (sid moves daily
# and superseded packages leave the pool).
PRIVATE_INDEX_MAX_AGE = 3600.0


@dataclass(frozen=True)
class Plan:
    abi: str
    infos: dict[str, dict[str, str]]  # package -> control fields of the candidate


def newest_plan(entry: CatalogEntry, apt: Apt) -> Plan | None:
    """The newest ABI whose packages are all in the index (None if none is)."""
    for abi in newest_first(apt.names(), entry.abi_regex):
        infos = {pkg: apt.show(pkg) for pkg in entry.package_names(abi)}
        if all(infos.values()):
            return Plan(abi, infos)  # type: ignore[arg-type]
    return None


def planned(entry: CatalogEntry, apt: Apt, report: Progress) -> Plan:
    if not apt.source.is_system and (
        not apt.has_index() or apt.index_age() > PRIVATE_INDEX_MAX_AGE
    ):
        apt.update(report)
    plan = newest_plan(entry, apt)
    if plan is None and not apt.updated:
        apt.update(report)
        plan = newest_plan(entry, apt)
    if plan is None:
        raise KernelError(
            f"kernel {entry.name!r}: no ABI matching {entry.abi_regex} has all of its packages "
            f"({', '.join(entry.packages.values())}) in the {apt.label}"
        )
    return plan


def deb_path(info: Mapping[str, str]) -> Path:
    return cache_root() / "debs" / posixpath.basename(info["Filename"])


def obtain(
    apt: Apt, package: str, info: Mapping[str, str], report: Progress, timings: dict[str, float]
) -> tuple[Path, str]:
    """The verified .deb of *package* in ``cache_root()/debs`` and its sha256:
    one left by an interrupted fetch is reused if it matches the index."""
    deb = deb_path(info)
    deb.parent.mkdir(parents=True, exist_ok=True)
    # Two kernels may share a package: one process downloads it at a time.
    with locked(entry_lock(deb), what=f"downloading {deb.name}"):
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


def download_all(
    entry: CatalogEntry, apt: Apt, report: Progress, timings: dict[str, float]
) -> tuple[Plan, dict[str, tuple[Path, str]]]:
    """Plan and download every package; on a failed download with an index not
    refreshed in this run (the archive moved on), refresh and plan again once."""
    while True:
        plan = planned(entry, apt, report)
        try:
            debs = {
                pkg: obtain(apt, pkg, info, report, timings) for pkg, info in plan.infos.items()
            }
            return plan, debs
        except CommandError:
            if apt.updated:
                raise
            apt.update(report)


def build_entry(
    entry: CatalogEntry,
    plan: Plan,
    debs: Mapping[str, tuple[Path, str]],
    tmp: Path,
    report: Progress,
    timings: dict[str, float],
) -> dict[str, Any]:
    """Extract everything the lab needs from the downloaded packages into
    *tmp*; return the manifest (also written there)."""
    abi = plan.abi
    release = entry.release(abi)
    image, modpkg, dbg = (entry.package(r, abi) for r in ROLES)
    files: dict[str, FileRecord] = {}
    sources: dict[str, str] = {}
    order: list[str] = []
    module_paths: dict[str, str] = {}

    def scan(pkg: str, wants: dict[str, str], **kw: Any) -> TarScan:
        installed = plan.infos[pkg].get("Installed-Size", "")
        estimate = int(installed) * 1024 if installed.isdigit() else None
        started = time.monotonic()
        result = scan_deb(debs[pkg][0], f"extract {pkg}", estimate, report, tmp, wants, **kw)
        if result.missed:  # a wanted link pointed back: one more pass for the targets
            again = scan_deb(
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
                f"lab/data/kernel/catalog.toml)"
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
    write_json(tmp / MANIFEST, manifest)
    return manifest


def fetch_entry(
    entry: CatalogEntry,
    progress: Progress | None,
    force: bool,
    catalog: Mapping[str, CatalogEntry] | None,
) -> KernelArtifacts:
    report = progress or silent
    root = kernel_dir(entry.name)
    waited: list[str] = []  # a wait for another fetch is a step of its own in the progress

    def say(line: str) -> None:
        waited.append(line)
        report(line, 0, 1)

    with locked(entry_lock(root), what=f"fetching kernel {entry.name}", say=say):
        if waited:
            report(waited[0], 1, 1)
        if not force:
            check = check_entry(entry, root, progress)
            if check.state == "cached":
                return artifacts(root, check.manifest)  # type: ignore[arg-type]
        # Holding the lock, leftovers of killed fetches of this kernel are ours.
        for old in root.parent.glob(f".{entry.name}.partial-*"):
            shutil.rmtree(old, ignore_errors=True)
        apt = Apt(entry.apt)
        timings: dict[str, float] = {}
        plan, debs = download_all(entry, apt, report, timings)
        with atomic_entry(root) as tmp:
            tmp.chmod(0o755)  # readable by whoever runs QEMU and drgn, like the rest
            manifest = build_entry(entry, plan, debs, tmp, report, timings)
        stamp_all(root, manifest)
        for deb, _ in debs.values():
            deb.unlink(missing_ok=True)
        return artifacts(root, manifest)

