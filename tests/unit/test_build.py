"""lab.build's pure parts (fragment parsing, the required-options check, the
cache key, names, make's progress lines) and its bad-input paths, which fail
before anything is built or registered."""

from __future__ import annotations

import json
import subprocess

import pytest

from lab import build, kernels
from lab.build import BuildInputs
from lab.cli import main
from lab.model import UserError


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DEVDAX_LAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


FRAGMENT = """\
# comment
CONFIG_64BIT=y
CONFIG_PRINTK=y
# CONFIG_SLUB_TINY is not set
CONFIG_LOG_BUF_SHIFT=17
CONFIG_CMDLINE="console=ttyS0"
"""


def test_parse_config_values_and_unset():
    assert build.parse_config(FRAGMENT) == {
        "CONFIG_64BIT": "y",
        "CONFIG_PRINTK": "y",
        "CONFIG_SLUB_TINY": "n",
        "CONFIG_LOG_BUF_SHIFT": "17",
        "CONFIG_CMDLINE": '"console=ttyS0"',
    }


def test_required_options_are_the_y_lines_in_order():
    assert build.required_options(FRAGMENT) == ["CONFIG_64BIT", "CONFIG_PRINTK"]


def test_check_config_names_each_missing_option():
    final = "CONFIG_64BIT=y\n# CONFIG_PRINTK is not set\nCONFIG_DEV_DAX=m\n"
    assert build.check_config(final, ["CONFIG_64BIT", "CONFIG_PRINTK", "CONFIG_DEV_DAX",
                                      "CONFIG_ZONE_DEVICE"]) == [
        "CONFIG_PRINTK", "CONFIG_DEV_DAX", "CONFIG_ZONE_DEVICE"]
    assert build.check_config(final, ["CONFIG_64BIT"]) == []


def test_shipped_fragment_requires_what_the_lab_needs():
    req = build.required_options(build.FRAGMENT_PATH.read_text())
    for opt in ("64BIT", "PVH", "DEV_DAX", "DEV_DAX_PMEM", "ACPI_NFIT", "ZONE_DEVICE",
                "FW_CFG_SYSFS", "PROC_KCORE", "UNWINDER_ORC", "DEBUG_INFO_DWARF5",
                "VIRTIO_CONSOLE", "IO_URING", "PROC_PAGE_MONITOR", "TRANSPARENT_HUGEPAGE"):
        assert f"CONFIG_{opt}" in req
    assert build.parse_config(build.FRAGMENT_PATH.read_text())["CONFIG_DEBUG_INFO_REDUCED"] == "n"


def test_cache_key_depends_on_identity_patches_and_fragment_not_path():
    a = BuildInputs("/src/linux", "git:abc", (("x.patch", "11"),), "f1")
    assert build.cache_key(a) == build.cache_key(BuildInputs("/elsewhere", "git:abc",
                                                             (("y.patch", "11"),), "f1"))
    for other in (BuildInputs("/src/linux", "git:abd", (("x.patch", "11"),), "f1"),
                  BuildInputs("/src/linux", "git:abc", (("x.patch", "12"),), "f1"),
                  BuildInputs("/src/linux", "git:abc", (), "f1"),
                  BuildInputs("/src/linux", "git:abc", (("x.patch", "11"),), "f2")):
        assert build.cache_key(other) != build.cache_key(a)
    two = BuildInputs("/s", "git:abc", (("a", "1"), ("b", "2")), "f")
    swapped = BuildInputs("/s", "git:abc", (("b", "2"), ("a", "1")), "f")
    assert build.cache_key(two) != build.cache_key(swapped)  # order of application matters


def test_files_identity_sees_size_and_mtime_not_order():
    files = [("Makefile", 10, 1), ("mm/memremap.c", 20, 2)]
    assert build.files_identity(files) == build.files_identity(list(reversed(files)))
    assert build.files_identity(files) != build.files_identity([("Makefile", 10, 1),
                                                                ("mm/memremap.c", 20, 3)])
    assert build.files_identity(files).startswith("files:")


def test_default_name(tmp_path):
    tree = tmp_path / "linux-6.12"
    tree.mkdir()
    assert build.default_name(tree, ()) == "linux-6.12"
    patched = build.default_name(tree, (("a.patch", "ab" * 32),))
    assert patched.startswith("linux-6.12-") and len(patched) == len("linux-6.12-") + 8
    assert patched != build.default_name(tree, (("a.patch", "cd" * 32),))


def test_make_step_lines():
    assert build.make_step("  CC      mm/memremap.o") == ("CC", "mm/memremap.o")
    assert build.make_step("  LD [M]  foo.ko") == ("LD", "[M]  foo.ko")
    assert build.make_step("make[1]: Entering directory") is None


def test_tree_identity_of_git_and_plain_trees(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "a").write_text("1")
    first = build.tree_identity(plain)
    (plain / "a").write_text("22")
    assert build.tree_identity(plain) != first
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "a").write_text("1")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "a"], check=True)
    subprocess.run([*git, "commit", "-qm", "a"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert build.tree_identity(repo) == f"git:{head}"


def _fake_tree(path):
    (path / "scripts" / "kconfig").mkdir(parents=True)
    (path / "scripts" / "kconfig" / "merge_config.sh").write_text("#!/bin/sh\n")
    (path / "Makefile").write_text("all:\n")
    (path / "Kconfig").write_text("")
    return path


def test_bad_trees_and_patches_are_user_errors(cache, tmp_path):
    with pytest.raises(UserError, match="no such directory"):
        build.build_kernel(tmp_path / "nope")
    with pytest.raises(UserError, match="not a kernel tree"):
        build.build_kernel(tmp_path)
    tree = _fake_tree(tmp_path / "linux")
    with pytest.raises(UserError, match="--patch .*: no such file"):
        build.build_kernel(tree, [tmp_path / "missing.patch"])
    with pytest.raises(UserError, match="a kernel of the catalog"):
        build.build_kernel(tree, name="before")
    with pytest.raises(UserError, match="--name"):
        build.build_kernel(tree, name="../x")
    (tree / ".config").write_text("")
    with pytest.raises(UserError, match="built in place"):
        build.build_kernel(tree, say=lambda *_: None)
    bad = tmp_path / "bad.patch"
    bad.write_text("--- a/nothere\n+++ b/nothere\n@@ -1 +1 @@\n-x\n+y\n")
    (tree / ".config").unlink()
    with pytest.raises(UserError, match="does not apply"):
        build.build_kernel(tree, [bad], say=lambda *_: None)
    assert not (cache / "built").exists() or not any((cache / "built").iterdir())


def test_cli_exit_status_2_for_a_bad_tree(cache, tmp_path, capsys):
    assert main(["kernel", "build", "--tree", str(tmp_path)]) == 2
    assert "not a kernel tree" in capsys.readouterr().err


def test_build_error_is_exit_1_with_the_log_tail(cache, tmp_path, monkeypatch, capsys):
    tree = _fake_tree(tmp_path / "linux")

    def failing(*a, **k):
        raise build.BuildError("`make bzImage` failed (exit status 2):", tmp_path / "log",
                               ["mm/memremap.c:1:1: error: expected ';'"])

    monkeypatch.setattr(build, "configure", failing)
    assert main(["kernel", "build", "--tree", str(tree)]) == 1
    err = capsys.readouterr().err
    assert "failed (exit status 2)" in err and "error: expected ';'" in err
    assert not (cache / "built" / "linux").exists()


def _register(cache, name, release="6.12.117"):
    root = cache / "built" / name
    root.mkdir(parents=True)
    (root / "bzImage").write_bytes(b"bz")
    (root / "vmlinux").write_bytes(b"elf")
    (root / "manifest.json").write_text(json.dumps({"name": name, "release": release,
                                                    "tree": "/src/linux", "patches": []}))
    return root


def test_registered_kernels_resolve_and_list(cache):
    root = _register(cache, "mine")
    assert kernels.known_kernels() == ["before", "after", "mine"]
    k = kernels.resolve("mine", fetch=False)
    assert (k.name, k.release, k.vmlinuz, k.vmlinux, k.modules) == (
        "mine", "6.12.117", root / "bzImage", root / "vmlinux", ())
    st = kernels.status("mine")
    assert (st.state, st.release, st.source) == ("cached", "6.12.117", "built")
    assert "/src/linux" in st.description
    (root / "vmlinux").unlink()  # incomplete: not a kernel
    with pytest.raises(UserError, match="unknown kernel 'mine'"):
        kernels.resolve("mine")


def test_cached_build_returns_at_once(cache, tmp_path, monkeypatch):
    tree = _fake_tree(tmp_path / "linux")
    inputs = BuildInputs(str(tree), build.tree_identity(tree), (),
                         build.sha256_file(build.FRAGMENT_PATH))
    root = _register(cache, "linux")
    m = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps({**m, "key": build.cache_key(inputs)}))
    monkeypatch.setattr(build, "configure", lambda *a, **k: pytest.fail("rebuilt"))
    assert build.build_kernel(tree, say=lambda *_: None).vmlinux == root / "vmlinux"


def test_a_tree_built_in_place_resolves_by_path(cache, tmp_path):
    tree = _fake_tree(tmp_path / "linux")
    with pytest.raises(UserError, match="not built in place"):
        kernels.resolve(str(tree))
    (tree / "arch" / "x86" / "boot").mkdir(parents=True)
    (tree / "arch" / "x86" / "boot" / "bzImage").write_bytes(b"bz")
    (tree / "vmlinux").write_bytes(b"elf")
    (tree / "include" / "config").mkdir(parents=True)
    (tree / "include" / "config" / "kernel.release").write_text("6.12.0-dirty\n")
    k = kernels.resolve(str(tree))
    assert (k.name, k.release, k.vmlinux, k.modules) == ("linux", "6.12.0-dirty",
                                                         tree / "vmlinux", ())
    assert kernels.status(str(tree)).source == "tree"
    with pytest.raises(UserError, match="not a kernel tree"):
        kernels.resolve(str(tmp_path / "linux" / "arch"))
