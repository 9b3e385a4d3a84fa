"""Unit tests of lab.kernels: the pure parts (catalog, Debian version order,
modinfo, load order, apt sources, tar selection) and cache verification on a
fake entry. No network, no apt downloads."""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from lab import kernels
from lab.kernels import (
    AptSource,
    CommandError,
    KernelError,
    archive_source,
    compare_versions,
    entries,
    fetching,
    load_catalog,
    load_order,
    module_name,
    newest_first,
    parse_catalog,
    parse_control,
    parse_modinfo,
    pick_newest,
    private_apt_options,
    private_sources_list,
    scan_tar,
    sources_uris,
    verify_entry,
)
from lab.kernels import apt as apt_io
from lab.model import UserError
from lab.progress import Bars

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
ND_E820 = GOLDEN / "nd_e820-6.12.117+deb12-amd64.ko"

MINIMAL = """
modules = ["a"]
[kernels.k]
description = "d"
apt = "system"
abi_regex = '^img-(\\d+)-dbg$'
[kernels.k.packages]
image = "img-{abi}"
modules = "img-{abi}"
dbg = "img-{abi}-dbg"
[kernels.k.paths]
vmlinuz = "boot/vmlinuz-{release}"
vmlinux = "dbg/vmlinux-{release}"
modules = "lib/modules/{release}"
module_debug = "dbg/modules/{release}"
"""


# ---------------------------------------------------------------- catalog


def test_real_catalog_has_before_and_after():
    cat = load_catalog()
    assert list(cat) == ["before", "after"]
    before, after = cat["before"], cat["after"]
    assert before.apt.is_system
    assert after.apt == AptSource("sid", ("main",))
    assert str(after.apt) == "sid main"
    abi = "6.12.117+deb12"
    assert before.release(abi) == "6.12.117+deb12-amd64"
    assert before.package("dbg", abi) == "linux-image-6.12.117+deb12-amd64-dbg"
    assert before.package_names(abi) == [
        "linux-image-6.12.117+deb12-amd64-unsigned",
        "linux-image-6.12.117+deb12-amd64-dbg",
    ]
    assert before.path("vmlinux", abi) == "usr/lib/debug/boot/vmlinux-6.12.117+deb12-amd64"
    assert before.abi_matches(abi)
    assert not before.abi_matches("7.2.13+deb14")
    abi = "7.2.13+deb14"
    assert after.package_names(abi) == [
        "linux-binary-unsigned-7.2.13+deb14-amd64",
        "linux-modules-7.2.13+deb14-amd64",
        "linux-image-7.2.13+deb14-amd64-dbg",
    ]
    assert after.path("vmlinuz", abi) == "usr/lib/modules/7.2.13+deb14-amd64/vmlinuz.unsigned"
    assert after.path("modules", abi) == "usr/lib/modules/7.2.13+deb14-amd64/kernel"
    assert before.modules[0] == "libnvdimm" and "device_dax" in before.modules
    assert "drivers/nvdimm" in before.module_dirs


def test_minimal_catalog_defaults():
    (k,) = parse_catalog(MINIMAL).values()
    assert k.release("5") == "5"  # no release template: the ABI itself
    assert k.module_dirs == ()
    assert k.package_names("5") == ["img-5", "img-5-dbg"]


@pytest.mark.parametrize(
    "change, message",
    [
        (('apt = "system"', ""), "kernels.k.apt is missing"),
        (('apt = "system"', "apt = 3"), "kernels.k.apt must be"),
        (("'^img-(\\d+)-dbg$'", "'^img-\\d+-dbg$'"), "needs a group"),
        (("'^img-(\\d+)-dbg$'", "'^img-(\\d+'"), "not a regex"),
        (('dbg = "img-{abi}-dbg"', 'dbg = "img-{version}-dbg"'), "bad placeholder"),
        (('dbg = "img-{abi}-dbg"', 'dbg = "img-{abi}"'), "must differ"),
        (('vmlinux = "dbg/vmlinux-{release}"\n', ""), "paths.vmlinux is missing"),
        (('modules = ["a"]', "modules = []"), "`modules`"),
        (("[kernels.k]", "[kernels.k\n"), "not valid TOML"),
    ],
)
def test_catalog_errors_name_the_key(change, message):
    with pytest.raises(UserError, match=message):
        parse_catalog(MINIMAL.replace(*change))


# ---------------------------------------------------------------- versions

PAIRS = [
    ("6.12.9", "6.12.117", -1),
    ("6.12.117", "6.12.117", 0),
    ("6.12.0117", "6.12.117", 0),
    ("6.12.117+deb12", "6.12.9+deb12", 1),
    ("1.0~rc1", "1.0", -1),
    ("1.0~~", "1.0~", -1),
    ("1.0~", "1.0", -1),
    ("1.0", "1.0+", -1),
    ("1.0a", "1.0+", -1),  # letters sort before other characters
    ("1.0", "1.0a", -1),
    ("6.12.117-1~deb12u1", "6.12.117-1", -1),
    ("6.12.117-1~deb12u1", "6.12.117-1~deb12u2", -1),
    ("1.0", "1.0-1", -1),
    ("1:1.0", "2.0", 1),
    ("0:2.0", "2.0", 0),
    ("7.2.13-1", "7.2.9-3", 1),
    ("1.2-3-4", "1.2-3-5", -1),  # the revision is after the last hyphen
]


@pytest.mark.parametrize("a, b, expected", PAIRS)
def test_compare_versions(a, b, expected):
    assert compare_versions(a, b) == expected
    assert compare_versions(b, a) == -expected


@pytest.mark.skipif(shutil.which("dpkg") is None, reason="no dpkg to cross-check")
def test_compare_versions_agrees_with_dpkg():
    for a, b, _ in PAIRS:
        for op, want in (("lt", -1), ("eq", 0), ("gt", 1)):
            rc = subprocess.run(["dpkg", "--compare-versions", a, op, b], check=False).returncode
            assert (rc == 0) == (compare_versions(a, b) == want), (a, op, b)


NAMES = [
    "linux-image-6.12-amd64-dbg",  # the meta package: no match
    "linux-image-6.12.9+deb12-amd64-dbg",
    "linux-image-6.12.117+deb12-amd64-dbg",
    "linux-image-6.12.118+deb12-cloud-amd64-dbg",  # other flavour: no match
    "linux-image-6.12.118+deb12-rt-amd64-dbg",
    "linux-image-6.12.22+deb12-amd64-dbg",
    "linux-image-6.12.117+deb12-amd64-unsigned",
    "linux-image-6.13.1+deb12-amd64-dbg",  # another series
]
BEFORE_RX = r"^linux-image-(6\.12\.\d+\+deb12)-amd64-dbg$"


def test_pick_newest_uses_debian_order_not_string_order():
    assert pick_newest(NAMES, BEFORE_RX) == "6.12.117+deb12"
    assert newest_first(NAMES, BEFORE_RX) == ["6.12.117+deb12", "6.12.22+deb12", "6.12.9+deb12"]


def test_pick_newest_tilde_sorts_first():
    names = ["k-7.2~rc3-dbg", "k-7.2-dbg", "k-7.2~rc10-dbg", "k-7.1.9-dbg"]
    assert newest_first(names, r"^k-(.*)-dbg$") == ["7.2", "7.2~rc10", "7.2~rc3", "7.1.9"]


def test_pick_newest_without_match():
    with pytest.raises(KernelError, match="no package"):
        pick_newest(["foo", "bar"], BEFORE_RX)


# ---------------------------------------------------------------- modules


def test_parse_modinfo_on_a_real_debian_module():
    info = parse_modinfo(ND_E820.read_bytes())
    assert info["depends"] == ["libnvdimm"]
    assert info["name"] == ["nd_e820"]
    assert info["vermagic"][0].split()[0] == "6.12.117+deb12-amd64"
    assert info["license"] == ["GPL v2"]


def test_parse_modinfo_rejects_non_modules():
    with pytest.raises(KernelError, match="not an ELF"):
        parse_modinfo(b"hello world" * 10)
    with pytest.raises(KernelError):
        parse_modinfo(ND_E820.read_bytes()[:200])


def test_module_name():
    assert module_name("drivers/nvdimm/nd_pmem.ko.xz") == "nd_pmem"
    assert module_name("x/dax-pmem.ko") == "dax_pmem"
    assert module_name("x/modules.order") is None


# Dependencies as read from Debian 6.12's modules.
DEPS_612 = {
    "libnvdimm": [],
    "nd_btt": ["libnvdimm"],
    "nd_pmem": ["libnvdimm", "nd_btt"],
    "nd_e820": ["libnvdimm"],
    "nfit": ["libnvdimm"],
    "dax_pmem": ["libnvdimm"],
    "device_dax": [],
    "kmem": [],
    "qemu_fw_cfg": [],
    "virtio_pmem": ["nd_virtio", "libnvdimm"],
    "nd_virtio": [],
}


def test_load_order_dependencies_first():
    order = load_order(DEPS_612, ["dax_pmem", "nd_pmem", "device_dax"])
    assert order == ["libnvdimm", "dax_pmem", "nd_btt", "nd_pmem", "device_dax"]
    wanted = load_catalog()["before"].modules
    full = load_order(DEPS_612, wanted)
    assert full[0] == "libnvdimm" and set(full) == set(wanted)
    for name, deps in DEPS_612.items():
        if name in full:
            assert all(full.index(d) < full.index(name) for d in deps)


def test_load_order_names_a_missing_dependency():
    deps = {"nd_pmem": ["libnvdimm", "nd_btt"], "libnvdimm": []}
    with pytest.raises(KernelError, match=r"'nd_btt' \(needed by nd_pmem\)"):
        load_order(deps, ["nd_pmem"])
    with pytest.raises(KernelError, match="'kmem' is not among"):
        load_order(deps, ["kmem"])


def test_load_order_cycle():
    with pytest.raises(KernelError, match="cycle: a -> b -> a"):
        load_order({"a": ["b"], "b": ["a"]}, ["a"])


# ---------------------------------------------------------------- apt sources

DEB822 = """\
Types: deb
# http://snap.example.org/archive/debian/20250520T000000Z
URIs: http://deb.example.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
# http://snap.example.org/archive/debian-security/20250520T000000Z
URIs: http://deb.example.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://off.example.org/debian
Suites: trixie
Components: main
Enabled: no

Types: deb-src
URIs: http://src.example.org/debian
Suites: bookworm
Components: main
"""


def test_sources_uris_deb822():
    got = sources_uris(DEB822)
    assert list(got) == ["http://deb.example.org/debian", "http://deb.example.org/debian-security"]
    assert got["http://deb.example.org/debian"]["suites"] == ["bookworm", "bookworm-updates"]
    assert got["http://deb.example.org/debian-security"]["suites"] == ["bookworm-security"]
    assert archive_source(got) == (
        "http://deb.example.org/debian",
        "/usr/share/keyrings/debian-archive-keyring.gpg",
    )


def test_sources_uris_one_line_and_archive_choice():
    text = (
        "# comment\n"
        "deb http://sec.example.org/debian-security bookworm-security main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://a.example.org/debian/ bookworm main contrib\n"
        "deb-src http://a.example.org/debian bookworm main\n"
    )
    got = sources_uris(text)
    assert got["http://a.example.org/debian"] == {
        "suites": ["bookworm"],
        "components": ["main", "contrib"],
        "signed_by": "/k.gpg",
    }
    assert archive_source(got) == ("http://a.example.org/debian", "/k.gpg")
    only_security = sources_uris(text.splitlines()[1])
    with pytest.raises(UserError, match="no Debian archive"):
        archive_source(only_security)


def test_private_apt_configuration(tmp_path):
    opts = private_apt_options(tmp_path)
    assert opts[::2] == ["-o"] * (len(opts) // 2)
    settings = dict(o.split("=", 1) for o in opts[1::2])
    assert settings["Dir::Etc::sourcelist"] == str(tmp_path / "sources.list")
    assert settings["Dir::State::Lists"] == str(tmp_path / "lists")
    assert settings["Dir::Cache"] == str(tmp_path / "cache")
    assert settings["Dir::State::status"] == "/dev/null"
    assert all(v.startswith(str(tmp_path)) or v in ("/dev/null", "none") for v in settings.values())
    line = private_sources_list("http://a.example.org/debian", "sid", ["main"], "/k.gpg")
    assert line == "deb [signed-by=/k.gpg] http://a.example.org/debian sid main\n"


def test_parse_control():
    text = (
        "Package: linux-modules-7.2.13+deb14-amd64\nVersion: 7.2.13-1\nSize: 110095088\n"
        "Description-en: modules\n more text\n\nPackage: other\nVersion: 1\n"
    )
    c = parse_control(text)
    assert c["Version"] == "7.2.13-1" and c["Size"] == "110095088"
    assert c["Description-en"] == "modules\nmore text"


def test_command_error_carries_command_and_stderr_tail():
    e = CommandError(["apt-get", "download", "x"], 100, "\n".join(f"l{i}" for i in range(40)))
    assert "`apt-get download x` failed with exit status 100" in str(e)
    assert "l39" in str(e) and "l10\n" not in str(e)


# ---------------------------------------------------------------- tar selection


def _tar(members: list[tuple[str, bytes | None, str | None]]) -> io.BytesIO:
    """An in-memory tar: (name, data, None) files and (name, None, target) symlinks."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data, link in members:
            info = tarfile.TarInfo(name)
            if link is not None:
                info.type, info.linkname = tarfile.SYMTYPE, link
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    buf.seek(0)
    return buf


def test_scan_tar_files_links_and_modules(tmp_path):
    ko = ND_E820.read_bytes()
    stream = _tar(
        [
            ("./boot/vmlinuz-1", b"kernel", None),
            ("./usr/lib/debug/lib/modules/1/vmlinux", None, "../../../boot/vmlinux-1"),
            ("./lib/modules/1/kernel/drivers/nvdimm/nd_e820.ko.xz", lzma.compress(ko), None),
            ("./lib/modules/1/kernel/drivers/gpu/big.ko.xz", lzma.compress(b"x"), None),
            ("./lib/modules/1/kernel/fs/kmem.ko", b"wanted by name", None),
            ("./usr/lib/debug/boot/vmlinux-1", b"dwarf", None),
            ("./dbg/m.ko.xz", lzma.compress(b"debug"), None),
        ]
    )
    scan = scan_tar(
        stream,
        tmp_path,
        {
            "boot/vmlinuz-1": "vmlinuz",
            "usr/lib/debug/lib/modules/1/vmlinux": "vmlinux",
            "dbg/m.ko.xz": "debug/m.ko",
        },
        module_root="lib/modules/1/kernel",
        module_dirs=["drivers/nvdimm"],
        module_names=["kmem"],
    )
    assert (tmp_path / "vmlinuz").read_bytes() == b"kernel"
    assert (tmp_path / "vmlinux").read_bytes() == b"dwarf"  # symlink followed forward
    assert (tmp_path / "debug/m.ko").read_bytes() == b"debug"  # .xz decompressed
    assert scan.files["vmlinux"].sha256 == hashlib.sha256(b"dwarf").hexdigest()
    assert scan.sources["vmlinux"] == "usr/lib/debug/boot/vmlinux-1"
    assert scan.files["vmlinuz"].size == 6
    assert set(scan.modules) == {"nd_e820", "kmem"}
    assert scan.modules["nd_e820"] == ("drivers/nvdimm/nd_e820.ko.xz", ko)
    assert not scan.missed and not scan.stopped_early


def test_scan_tar_reports_link_to_a_member_already_passed(tmp_path):
    members = [
        ("./usr/lib/debug/boot/vmlinux-1", b"dwarf", None),
        ("./usr/lib/debug/lib/modules/1/vmlinux", None, "../../../boot/vmlinux-1"),
    ]
    scan = scan_tar(_tar(members), tmp_path, {"usr/lib/debug/lib/modules/1/vmlinux": "vmlinux"})
    assert scan.missed == {"usr/lib/debug/boot/vmlinux-1": "vmlinux"}
    again = scan_tar(_tar(members), tmp_path, scan.missed)
    assert (tmp_path / "vmlinux").read_bytes() == b"dwarf" and again.stopped_early


def test_scan_tar_stops_once_everything_is_found(tmp_path):
    stream = _tar([("./a", b"1", None), ("./b", b"2", None), ("./c", b"3", None)])
    scan = scan_tar(stream, tmp_path, {"a": "x"})
    assert scan.stopped_early and list(scan.files) == ["x"]


# ---------------------------------------------------------------- cache entries

ABI = "6.12.1+deb12"


def make_entry(root: Path, entry: kernels.CatalogEntry, abi: str = ABI) -> dict:
    """A complete fake cache entry for *entry* with small files."""
    root.mkdir(parents=True)
    files = {"vmlinuz": b"bzImage", "vmlinux": b"\x7fELF dwarf"}
    for m in entry.modules:
        files[f"modules/{m}.ko"] = f"module {m}".encode()
        files[f"debug/{m}.ko"] = f"debug {m}".encode()
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    manifest = {
        "format": 1,
        "name": entry.name,
        "abi": abi,
        "release": entry.release(abi),
        "packages": {p: "1-1" for p in entry.package_names(abi)},
        "files": {
            rel: {"size": len(d), "sha256": hashlib.sha256(d).hexdigest()}
            for rel, d in files.items()
        },
        "modules": list(entry.modules),
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return manifest


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DEVDAX_LAB_CACHE", str(tmp_path / "cache"))

    def no_network(*a, **k):
        raise AssertionError("touched the network")

    monkeypatch.setattr(apt_io.Apt, "update", no_network)
    monkeypatch.setattr(apt_io.Apt, "download", no_network)
    return tmp_path / "cache"


def test_verify_good_entry_then_uses_stamps(cache, monkeypatch):
    before = load_catalog()["before"]
    root = kernels.kernel_dir("before")
    make_entry(root, before)
    assert verify_entry(root).state == "cached"
    assert (root / ".verified.json").is_file()
    hashed = []
    real = entries.sha256_file
    monkeypatch.setattr(entries, "sha256_file", lambda p: hashed.append(p) or real(p))
    assert verify_entry(root).state == "cached"
    assert hashed == []  # nothing re-hashed on the second run
    os.utime(root / "vmlinux", ns=(1, 1))  # touched: re-hashed, still good
    assert verify_entry(root).state == "cached"
    assert hashed == [root / "vmlinux"]


def test_flipped_byte_truncation_and_loss_are_corrupt(cache):
    before = load_catalog()["before"]
    root = kernels.kernel_dir("before")
    make_entry(root, before)
    assert verify_entry(root).state == "cached"
    data = bytearray((root / "vmlinux").read_bytes())
    data[3] ^= 0x01
    (root / "vmlinux").write_bytes(bytes(data))  # same size, new mtime
    check = verify_entry(root)
    assert check.state == "corrupt" and check.problems == (
        "vmlinux: sha256 differs from the manifest",
    )
    with open(root / "modules/libnvdimm.ko", "r+b") as f:
        f.truncate(3)
    (root / "debug/kmem.ko").unlink()
    problems = verify_entry(root).problems
    assert "modules/libnvdimm.ko: size 3, expected 16" in problems
    assert "debug/kmem.ko: missing" in problems
    (root / "manifest.json").write_text("{not json")
    assert verify_entry(root).state == "corrupt"
    shutil.rmtree(root)
    assert verify_entry(root).state == "missing"


def test_status_is_offline_and_reports_states(cache, monkeypatch):
    monkeypatch.setattr(apt_io.Apt, "has_index", lambda self: False)
    cat = load_catalog()
    st = kernels.status("after")
    assert st.state == "missing" and st.release is None and st.source == "sid main"
    assert st.path == cache / "kernels" / "after"
    make_entry(kernels.kernel_dir("before"), cat["before"])
    st = kernels.status("before")
    assert (st.state, st.release, st.abi) == ("cached", "6.12.1+deb12-amd64", ABI)
    assert dict(st.packages)["linux-image-6.12.1+deb12-amd64-dbg"] == "1-1"
    (kernels.kernel_dir("before") / "vmlinuz").write_bytes(b"bzImagf")
    assert kernels.status("before").state == "corrupt"


def test_entry_not_matching_the_catalog_is_stale(cache):
    cat = load_catalog()
    root = kernels.kernel_dir("before")
    manifest = make_entry(root, cat["before"])
    manifest["modules"] = manifest["modules"][:-1]  # the catalog now wants one more
    (root / "manifest.json").write_text(json.dumps(manifest))
    st = kernels.status("before")
    assert st.state == "stale" and "qemu_fw_cfg" in st.problems[0]
    shutil.rmtree(root)
    make_entry(root, cat["before"], abi="7.2.1+deb14")
    assert kernels.status("before").state == "stale"


def _fake_fetch(monkeypatch, cache, calls):
    """Replace the apt and dpkg-deb parts of a fetch by fakes."""

    def download_all(entry, apt, report, timings):
        debs = {}
        for pkg in entry.package_names(ABI):
            deb = cache / "debs" / f"{pkg}.deb"
            deb.parent.mkdir(parents=True, exist_ok=True)
            deb.write_bytes(b"deb")
            debs[pkg] = (deb, "0" * 64)
        calls.append(entry.name)
        return fetching.Plan(ABI, {}), debs

    def build_entry(entry, plan, debs, tmp, report, timings):
        shutil.rmtree(tmp)
        manifest = make_entry(tmp, entry)
        return manifest

    monkeypatch.setattr(fetching, "download_all", download_all)
    monkeypatch.setattr(fetching, "build_entry", build_entry)


def test_resolve_refetches_a_corrupt_entry(cache, monkeypatch):
    calls: list[str] = []
    _fake_fetch(monkeypatch, cache, calls)
    art = kernels.resolve("before")
    assert calls == ["before"]
    assert art.release == "6.12.1+deb12-amd64" and art.vmlinux.read_bytes() == b"\x7fELF dwarf"
    assert art.modules[0].name == "libnvdimm.ko"
    assert len(art.module_debug) == len(art.modules)
    assert list((cache / "debs").iterdir()) == []  # .debs deleted after extraction
    assert kernels.resolve("before", fetch=False) == art
    assert calls == ["before"]  # cached: not fetched again

    with open(art.vmlinux, "r+b") as f:
        f.write(b"X")  # flip the first byte
    with pytest.raises(UserError, match="corrupt"):
        kernels.resolve("before", fetch=False)
    art2 = kernels.resolve("before")
    assert calls == ["before", "before"] and art2.vmlinux.read_bytes() == b"\x7fELF dwarf"
    assert kernels.status("before").state == "cached"


def test_interrupted_fetch_leaves_nothing(cache, monkeypatch):
    calls: list[str] = []
    _fake_fetch(monkeypatch, cache, calls)

    def broken(entry, plan, debs, tmp, report, timings):
        (tmp / "vmlinux").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(fetching, "build_entry", broken)
    with pytest.raises(KeyboardInterrupt):
        kernels.fetch("before")
    assert kernels.status("before").state == "missing"
    assert [p.name for p in (cache / "kernels").iterdir()] == [".before.lock"]


def test_unknown_names_and_paths(cache):
    with pytest.raises(UserError, match="known kernels are before, after; built: none yet; a path"):
        kernels.resolve("middle")
    from lab.kernels.built import MANIFEST

    (cache / "built" / "mine").mkdir(parents=True)
    (cache / "built" / "mine" / MANIFEST).write_text("{}")
    with pytest.raises(UserError, match="known kernels are before, after; built: mine; a path"):
        kernels.resolve("middle")
    (cache / "built" / "mine" / MANIFEST).unlink()
    with pytest.raises(UserError, match="kernel trees"):
        kernels.resolve("/src/linux")
    assert kernels.known_kernels() == ["before", "after"]


def test_missing_tool_says_run_doctor(monkeypatch):
    monkeypatch.setattr(apt_io.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="`dpkg-deb` is not installed: run `devdax-lab doctor`"):
        apt_io.tool("dpkg-deb")


class FakeApt:
    """Stands in for lab.kernels.apt.Apt: an index of packages whose .debs hold b"deb"."""

    label = "fake index"

    def __init__(self, names, *, fail_downloads=0):
        self.source, self.updated, self.calls = AptSource(), False, []
        self._names, self.fail_downloads = set(names), fail_downloads

    def has_index(self):
        return True

    def index_age(self):
        return 0.0

    def update(self, report):
        self.calls.append("update")
        self.updated = True

    def names(self):
        return self._names

    def show(self, pkg):
        if pkg not in self._names:
            return None
        data = b"deb"
        return {
            "Version": "1-1",
            "Size": str(len(data)),
            "Installed-Size": "1",
            "SHA256": hashlib.sha256(data).hexdigest(),
            "Filename": f"pool/{pkg}_1-1.deb",
        }

    def download(self, pkg, info, dest, report):
        self.calls.append(f"download {pkg}")
        if self.fail_downloads:
            self.fail_downloads -= 1
            raise CommandError(["apt-get", "download", pkg], 100, "E: 404  Not Found")
        dest.write_bytes(b"deb")


def test_download_all_picks_newest_complete_abi_and_retries_after_update(cache):
    entry = load_catalog()["before"]
    names = [p for abi in ("6.12.9+deb12", "6.12.30+deb12") for p in entry.package_names(abi)]
    names.append("linux-image-6.12.40+deb12-amd64-dbg")  # newer, but its image is missing
    apt = FakeApt(names, fail_downloads=1)
    plan, debs = fetching.download_all(entry, apt, lambda *a: None, {})
    assert plan.abi == "6.12.30+deb12"
    assert apt.calls[:2] == ["download linux-image-6.12.30+deb12-amd64-unsigned", "update"]
    assert all(path.read_bytes() == b"deb" for path, _ in debs.values())
    apt.calls.clear()  # a second fetch reuses the .debs left by the first (hash checked)
    fetching.download_all(entry, apt, lambda *a: None, {})
    assert apt.calls == []


def test_download_all_gives_up_after_one_update(cache):
    entry = load_catalog()["before"]
    apt = FakeApt(entry.package_names("6.12.9+deb12"), fail_downloads=5)
    with pytest.raises(CommandError, match="404"):
        fetching.download_all(entry, apt, lambda *a: None, {})
    assert apt.calls.count("update") == 1
    with pytest.raises(KernelError, match="no ABI matching"):
        fetching.download_all(entry, FakeApt(["unrelated"]), lambda *a: None, {})


def test_a_second_fetch_waits_for_the_first_and_says_for_whom(cache, monkeypatch):
    """Two processes fetching one kernel: the second waits on the kernel's
    lock (naming the holder in its progress), then finds or makes the entry."""
    calls: list[str] = []
    _fake_fetch(monkeypatch, cache, calls)
    lock = cache / "kernels" / ".before.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", ("import sys, time\nfrom pathlib import Path\nfrom lab.cache import locked\n"
                                "with locked(Path(sys.argv[1]), what='fetching kernel before'):\n"
                                "    print('held', flush=True); time.sleep(1.5)"), str(lock)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert holder.stdout.readline() == "held\n"
        out = io.StringIO()
        art = kernels.fetch("before", progress=Bars(out, tty=False, notebook=False))
    finally:
        holder.kill()
        holder.wait()
    wait = f"waiting for pid {holder.pid} (fetching kernel before) (lock {lock})"
    lines = out.getvalue().splitlines()
    assert lines[0].startswith(f"{wait}: running [") and lines[1].startswith(f"{wait}: done [")
    assert calls == ["before"] and art.release == "6.12.1+deb12-amd64"
