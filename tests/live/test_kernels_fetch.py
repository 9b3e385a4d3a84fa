"""Live test of lab.kernels: resolve ``before`` and ``after`` for real (through
apt, into the real cache: the first run downloads about 2.4 GB and takes a few
minutes; later runs only verify the cached entries)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from lab import kernels
from lab.progress import bars

pytestmark = pytest.mark.live


def elf_section_names(path: Path) -> set[str]:
    """Section names of a 64-bit little-endian ELF file, reading only its headers."""
    with open(path, "rb") as f:
        head = f.read(64)
        assert head[:4] == b"\x7fELF" and head[4] == 2 and head[5] == 1
        (shoff,) = struct.unpack_from("<Q", head, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", head, 0x3A)
        f.seek(shoff)
        table = f.read(shentsize * shnum)
        headers = [struct.unpack_from("<IIQQQQIIQQ", table, i * shentsize) for i in range(shnum)]
        f.seek(headers[shstrndx][4])
        names = f.read(headers[shstrndx][5])
    return {names[h[0] : names.index(b"\0", h[0])].decode() for h in headers}


@pytest.mark.parametrize("name", ["before", "after"])
def test_resolve_for_real(name):
    art = kernels.resolve(name, progress=bars())
    entry = kernels.load_catalog()[name]
    assert art.name == name and art.root == kernels.kernel_dir(name)
    assert ".debug_info" in elf_section_names(art.vmlinux)
    assert art.vmlinuz.stat().st_size > 1 << 20
    assert art.vmlinuz.read_bytes()[0x202:0x206] == b"HdrS"  # an x86 bzImage
    order = [p.name.removesuffix(".ko") for p in art.modules]
    assert order[0] == "libnvdimm"
    assert {"device_dax", "dax_pmem"} <= set(order)
    assert set(entry.modules) <= set(order)
    assert [p.name for p in art.module_debug] == [p.name for p in art.modules]
    for ko, dbg in zip(art.modules, art.module_debug):
        info = kernels.parse_modinfo(ko.read_bytes())
        assert info["vermagic"][0].split()[0] == art.release
        assert all(order.index(d) < order.index(ko.stem) for d in info["depends"])
        assert ".debug_info" in elf_section_names(dbg), dbg
    manifest = json.loads((art.root / "manifest.json").read_text())
    assert manifest["release"] == art.release == entry.release(manifest["abi"])
    upstream = manifest["abi"].split("+")[0]  # 6.12.117 of 6.12.117+deb12
    for pkg, version in manifest["packages"].items():
        assert manifest["abi"] in pkg and version.startswith(upstream + "-")
    assert dict(art.packages) == manifest["packages"]
    st = kernels.status(name)
    assert (st.state, st.release) == ("cached", art.release)
