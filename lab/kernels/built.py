"""Kernels of your own, as the resolver sees them: the registry that
``devdax-lab kernel build`` (:mod:`lab.build`) writes under
``cache_root()/built/NAME/``, and trees built in place, booted by path.
Reading only: building and registering is :mod:`lab.build`'s job."""

from __future__ import annotations

import json
from pathlib import Path

from lab.cache import cache_root
from lab.errors import UserError
from lab.model import KernelArtifacts

__all__ = [
    "MANIFEST",
    "built_artifacts",
    "built_dir",
    "built_names",
    "built_tree",
    "is_kernel_tree",
    "read_manifest",
    "tree_artifacts",
]

MANIFEST = "manifest.json"


def is_kernel_tree(path: Path) -> bool:
    return (path / "Makefile").is_file() and (path / "Kconfig").is_file() and (
        path / "scripts" / "kconfig" / "merge_config.sh"
    ).is_file()


def tree_artifacts(tree: Path) -> KernelArtifacts:
    """A tree already built in place, as the lab boots it: its bzImage and
    vmlinux, no modules.

    :raises UserError: not a kernel tree, or not built."""
    tree = tree.expanduser().resolve()
    if not tree.is_dir():
        raise UserError(f"{tree}: no such directory")
    bz, vmlinux = tree / "arch" / "x86" / "boot" / "bzImage", tree / "vmlinux"
    if not (bz.is_file() and vmlinux.is_file()):
        if is_kernel_tree(tree):
            raise UserError(
                f"{tree}: a kernel tree, but not built in place (no arch/x86/boot/bzImage and "
                f"vmlinux): run `devdax-lab kernel build --tree {tree}` and use the name it prints"
            )
        raise UserError(f"{tree}: not a kernel tree (no Makefile, Kconfig, scripts/kconfig)")
    rel = tree / "include" / "config" / "kernel.release"
    release = rel.read_text().strip() if rel.is_file() else "unknown"
    return KernelArtifacts(name=tree.name, release=release, vmlinuz=bz, vmlinux=vmlinux, root=tree)


def built_dir(name: str) -> Path:
    return cache_root() / "built" / name


def built_names() -> list[str]:
    root = cache_root() / "built"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / MANIFEST).is_file())


def read_manifest(root: Path) -> dict | None:
    try:
        return json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def built_artifacts(name: str) -> KernelArtifacts | None:
    """The registered built kernel *name*, or None if there is none."""
    root = built_dir(name)
    m = read_manifest(root)
    if m is None or not (root / "bzImage").is_file() or not (root / "vmlinux").is_file():
        return None
    return KernelArtifacts(
        name=name, release=m["release"], vmlinuz=root / "bzImage", vmlinux=root / "vmlinux",
        root=root,
    )


def built_tree(root: Path) -> str:
    """What a registered kernel was built from: its tree and patch count."""
    m = read_manifest(root)
    if m is None:
        return "?"
    patches = len(m.get("patches", []))
    return m.get("tree", "?") + (f" + {patches} patch(es)" if patches else "")
