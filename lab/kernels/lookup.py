"""Kernel names to local files: a catalog name (its verified cache entry,
fetched if needed), a name registered by ``devdax-lab kernel build``, or the
path of a tree built in place; and the offline status of each."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from lab.errors import UserError
from lab.model import KernelArtifacts
from lab.progress import Progress

from .apt import Apt
from .built import MANIFEST, built_artifacts, built_names, built_tree, read_manifest, tree_artifacts
from .catalog import CatalogEntry, load_catalog
from .entries import artifacts, check_entry, kernel_dir
from .errors import KernelError
from .fetching import fetch_entry, newest_plan

__all__ = ["KernelStatus", "fetch", "identity", "identity_mismatch", "known_kernels", "resolve", "status"]


def known_kernels() -> list[str]:
    """The names in ``lab/data/kernel/catalog.toml``, in file order, then the kernels
    built by ``devdax-lab kernel build`` (:mod:`lab.build`), sorted."""
    catalog = list(load_catalog())
    return catalog + [n for n in built_names() if n not in catalog]


def identity(kernel: KernelArtifacts) -> dict:
    """What makes *kernel* the same kernel on another machine, for a sweep's
    workers to check they boot what the driver meant: a catalog kernel's
    Debian packages and versions (the catalog takes the newest ABI in each
    machine's apt index, which can differ), a built kernel's content key
    (its manifest ``key``: the tree's commit or file identity, the patches
    and the config fragment; not the tree's path), or a tree built in place's
    vmlinux digest."""
    if kernel.packages:
        return {"release": kernel.release, "packages": dict(kernel.packages)}
    manifest = read_manifest(kernel.root) if kernel.root and (kernel.root / MANIFEST).is_file() \
        else None
    if manifest is not None:
        return {"release": kernel.release, "build": manifest["key"],
                "source": manifest.get("identity")}
    from lab.cache import sha256_file

    return {"release": kernel.release, "vmlinux_sha256": sha256_file(kernel.vmlinux)}


def identity_mismatch(name: str, wanted: Mapping, have: Mapping) -> str | None:
    """One line saying how the kernel *name* found here differs from the one
    *wanted* (None when they are the same), and what to do about it."""
    if dict(wanted) == dict(have):
        return None
    if "build" in wanted:
        fix = ("build the same commit, patches and config here (`devdax-lab kernel build "
               f"--tree DIR --name {name}`) or share the driver's cache")
    elif "packages" in wanted:
        fix = f"run `devdax-lab fetch --force {name}` on both machines, or share one cache"
    else:
        fix = "give every machine the same built tree"
    differs = sorted(k for k in set(wanted) | set(have) if wanted.get(k) != have.get(k))
    shown = "; ".join(f"{k}: wanted {wanted.get(k)!r}, here {have.get(k)!r}" for k in differs)
    return f"kernel {name!r} here is not the driver's ({shown}): {fix}"


def is_path(name: str) -> bool:
    return os.sep in name or name.startswith((".", "~"))


def local_kernel(name: str, catalog: Mapping[str, CatalogEntry] | None) -> KernelArtifacts | None:
    """A kernel tree built in place (*name* is a path) or one registered by
    ``devdax-lab kernel build``; None for a catalog name."""
    if is_path(name):
        path = Path(name).expanduser()
        if not path.is_dir():
            raise UserError(
                f"{name}: no such directory (kernel trees are given by path: a tree built in "
                "place, or one built with `devdax-lab kernel build --tree DIR`)"
            )
        return tree_artifacts(path)
    if name in (catalog if catalog is not None else load_catalog()):
        return None
    return built_artifacts(name)


def catalog_entry(name: str, catalog: Mapping[str, CatalogEntry] | None = None) -> CatalogEntry:
    catalog = catalog if catalog is not None else load_catalog()
    if name not in catalog:
        built = built_names()
        raise UserError(
            f"unknown kernel {name!r}: known kernels are {', '.join(catalog)}; built: "
            + (", ".join(built) if built else "none yet")
            + "; a path to a built kernel tree is also accepted, or a name registered by "
            "`devdax-lab kernel build --tree DIR --name NAME`"
        )
    return catalog[name]


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
    return fetch_entry(catalog_entry(name, catalog), progress, force, catalog)


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
    if (local := local_kernel(name, catalog)) is not None:
        return local
    entry = catalog_entry(name, catalog)
    root = kernel_dir(entry.name)
    check = check_entry(entry, root, progress)
    if check.state == "cached":
        return artifacts(root, check.manifest)  # type: ignore[arg-type]
    if not fetch:
        detail = f": {'; '.join(check.problems)}" if check.problems else ""
        raise UserError(
            f"kernel {name!r} is {check.state} in {root}{detail}; fetching it was not allowed"
        )
    return fetch_entry(entry, progress, force=check.state != "missing", catalog=catalog)


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
    if (local := local_kernel(name, catalog)) is not None:
        assert local.root is not None
        built = not is_path(name)
        return KernelStatus(
            name=local.name,
            description=f"built from {built_tree(local.root)}" if built else "tree built in place",
            state="cached",
            path=local.root,
            release=local.release,
            source="built" if built else "tree",
        )
    entry = catalog_entry(name, catalog)
    root = kernel_dir(name)
    check = check_entry(entry, root, progress)
    m = check.manifest or {}
    abi, release = m.get("abi"), m.get("release")
    packages = tuple(m.get("packages", {}).items())
    if not abi:
        with contextlib.suppress(KernelError, UserError, OSError):
            apt = Apt(entry.apt)
            if apt.has_index():
                plan = newest_plan(entry, apt)
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
