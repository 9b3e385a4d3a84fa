"""A sweep's worker checks that the kernel it resolved is the driver's:
lab.kernels.identity (packages, build key, vmlinux digest) and the one line
naming what differs."""

from __future__ import annotations

import json
from pathlib import Path

from lab import kernels
from lab.model import KernelArtifacts


def _built(tmp_path: Path, key: str) -> KernelArtifacts:
    root = tmp_path / key
    root.mkdir()
    (root / "vmlinux").write_bytes(b"\x7fELF" + key.encode())
    (root / "manifest.json").write_text(json.dumps({"key": key, "identity": "git:abc"}))
    return KernelArtifacts(name="mine", release="6.12.0", vmlinuz=root / "bzImage",
                           vmlinux=root / "vmlinux", root=root)


def test_a_catalog_kernel_is_its_packages():
    k = KernelArtifacts(name="before", release="6.12.1", vmlinuz=Path("/x"), vmlinux=Path("/y"),
                        packages=(("linux-image-6.12.1", "6.12.1-1"),))
    assert kernels.identity(k) == {"release": "6.12.1",
                                   "packages": {"linux-image-6.12.1": "6.12.1-1"}}


def test_a_built_kernel_is_its_content_key_not_its_path(tmp_path):
    one, other = _built(tmp_path, "k1"), _built(tmp_path, "k2")
    assert kernels.identity(one)["build"] == "k1"
    line = kernels.identity_mismatch("mine", kernels.identity(one), kernels.identity(other))
    assert line.startswith("kernel 'mine' here is not the driver's (build: wanted 'k1', here 'k2')")
    assert "devdax-lab kernel build" in line
    assert kernels.identity_mismatch("mine", kernels.identity(one), kernels.identity(one)) is None


def test_a_tree_built_in_place_is_its_vmlinux(tmp_path):
    (tmp_path / "vmlinux").write_bytes(b"one")
    k = KernelArtifacts(name="t", release="6.13", vmlinuz=tmp_path / "bz",
                        vmlinux=tmp_path / "vmlinux", root=tmp_path)
    first = kernels.identity(k)
    (tmp_path / "vmlinux").write_bytes(b"two")
    assert kernels.identity_mismatch("t", first, kernels.identity(k)) is not None
