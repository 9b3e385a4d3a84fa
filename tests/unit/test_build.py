"""lab.build's pure parts (fragment parsing, the required-options check, the
cache key, names, make's progress lines) and its bad-input paths, which fail
before anything is built or registered."""

from __future__ import annotations

import json
import os
import re
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


# ---------------------------------------------------------------- ccache, patches, worktrees

def test_ccache_env_makes_paths_relative_to_the_work_directory(tmp_path):
    env = build.ccache_env(tmp_path / "w" / "src", tmp_path / "w" / "obj")
    assert env == {"CCACHE_BASEDIR": str(tmp_path / "w"), "CCACHE_NOHASHDIR": "1",
                   "CCACHE_DEPEND": "1"}


# A stats_log of ccache 4.7 (CCACHE_STATSLOG): a miss, then a direct hit of
# the same file compiled in another directory.
STATS_LOG = """\
# ../src/f.c
cache_miss
direct_cache_miss
local_storage_miss
local_storage_read_miss
local_storage_read_miss
local_storage_write
local_storage_write
preprocessed_cache_miss
# ../src/f.c
direct_cache_hit
local_storage_hit
local_storage_read_hit
local_storage_read_hit
# ../src/g.c
preprocessed_cache_hit
"""


def test_ccache_hits_counts_compilations():
    assert build.ccache_hits(STATS_LOG.splitlines()) == (2, 1)
    assert build.ccache_hits([]) == (0, 0)


FORMAT_PATCH = """\
From 1234567890abcdef1234567890abcdef12345678 Mon Sep 17 00:00:00 2001
From: devdax-lab <devdax-lab@localhost>
Date: Mon, 1 Jan 2024 00:00:00 +0000
Subject: [PATCH] dax: say hello

---
 drivers/dax/device.c | 1 +
 drivers/dax/new.c    | 1 +
 2 files changed, 2 insertions(+)

diff --git a/drivers/dax/device.c b/drivers/dax/device.c
index 1111111..2222222 100644
--- a/drivers/dax/device.c
+++ b/drivers/dax/device.c
@@ -1 +1,2 @@
 x
+y
diff --git a/drivers/dax/new.c b/drivers/dax/new.c
new file mode 100644
--- /dev/null
+++ b/drivers/dax/new.c
@@ -0,0 +1 @@
+z
--
2.39.5
"""


def test_patched_paths_of_a_format_patch_and_a_plain_diff():
    assert build.patched_paths(FORMAT_PATCH) == ["drivers/dax/device.c", "drivers/dax/new.c"]
    plain = "--- linux.orig/mm/memremap.c\n+++ linux/mm/memremap.c\n@@ -1 +1 @@\n-a\n+b\n"
    assert build.patched_paths(plain) == ["mm/memremap.c"]
    renamed = "diff --git a/old.c b/new.c\nsimilarity index 100%\nrename from old.c\n"
    assert build.patched_paths(renamed) == ["old.c", "new.c"]
    assert build.is_mbox(FORMAT_PATCH) and not build.is_mbox(plain)


def test_patch_failure_is_one_line():
    # git apply --check, which the git path runs after git am fails
    assert build.patch_failure("error: nothere.c: No such file or directory\n") == (
        "error: nothere.c: No such file or directory")
    assert build.patch_failure("error: patch failed: f.c:1\nerror: f.c: patch does not apply\n"
                               ) == "error: patch failed: f.c:1; error: f.c: patch does not apply"
    assert build.patch_failure(  # git apply --cached --3way, which checks first
        "error: repository lacks the necessary blob to perform 3-way merge.\n"
        "Falling back to direct application...\nerror: patch failed: f.c:1\n"
        "error: f.c: patch does not apply\n") == (
        "error: patch failed: f.c:1; error: f.c: patch does not apply")
    # patch -p1 --batch
    out = ("patching file f.c\nHunk #1 FAILED at 1.\n"
           "1 out of 1 hunk FAILED -- saving rejects to file f.c.rej\n")
    assert build.patch_failure(out) == "f.c: Hunk #1 FAILED at 1."
    assert build.patch_failure("something odd\nlast words\n") == "last words"
    assert "\n" not in build.patch_failure("error: x\n" * 3 + "error: y\n")
    assert len(build.patch_failure("error: " + "x" * 1000)) == 300


def test_worktree_paths():
    porcelain = ("worktree /src/linux\nHEAD 1234\nbranch refs/heads/main\n\n"
                 "worktree /cache/build/linux-1/src\nHEAD 1234\ndetached\n\n")
    assert build.worktree_paths(porcelain) == ["/src/linux", "/cache/build/linux-1/src"]


def _git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t",
                           *args], capture_output=True, text=True, check=True).stdout


def _fake_git_tree(path):
    _fake_tree(path)
    (path / "drivers").mkdir()
    (path / "drivers" / "device.c").write_text("a\nb\nc\n")
    _git(path, "init", "-q")
    _git(path, "add", "-A")
    _git(path, "commit", "-qm", "base")
    return path


def _format_patch(repo, rel, old, new, tmp_path, name="good.patch"):
    """A `git format-patch` of a commit changing *rel*, made without touching
    *repo*'s index, HEAD or files (a temporary index)."""
    env = {"GIT_INDEX_FILE": str(tmp_path / "index.tmp")}
    text = (repo / rel).read_text().replace(old, new)
    run = lambda *a, **k: subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c",
                                          "user.email=t@t", *a], capture_output=True, text=True,
                                         check=True, env={**os.environ, **env},
                                         **k).stdout.strip()
    run("read-tree", "HEAD")
    blob = run("hash-object", "-w", "--stdin", input=text)
    run("update-index", "--cacheinfo", f"100644,{blob},{rel}")
    commit = run("commit-tree", run("write-tree"), "-p", "HEAD", "-m", f"change {rel}")
    patch = tmp_path / name
    patch.write_text(run("format-patch", "-1", "--stdout", commit) + "\n")
    return patch


def _stop_after_source(monkeypatch, seen):
    def stop(src, obj, log, fragment=None, **k):
        seen["src"] = src
        raise build.BuildError("stopped before make (test)")

    monkeypatch.setattr(build, "configure", stop)


def test_git_tree_worktree_with_git_am_and_the_tree_untouched(cache, tmp_path, monkeypatch):
    tree = _fake_git_tree(tmp_path / "linux")
    head = _git(tree, "rev-parse", "HEAD")
    patch = _format_patch(tree, "drivers/device.c", "b\n", "b patched\n", tmp_path)
    seen = {}
    _stop_after_source(monkeypatch, seen)
    with pytest.raises(build.BuildError):
        build.build_kernel(tree, [patch], name="mine", say=lambda *_: None)
    src = seen["src"]
    assert src == build.work_dir(tree) / "src"
    assert (src / "drivers" / "device.c").read_text() == "a\nb patched\nc\n"
    assert _git(src, "log", "-1", "--format=%s").strip() == "change drivers/device.c"
    assert (tree / "drivers" / "device.c").read_text() == "a\nb\nc\n"
    assert _git(tree, "rev-parse", "HEAD") == head and _git(tree, "status", "--porcelain") == ""
    assert str(src) in build.worktree_paths(_git(tree, "worktree", "list", "--porcelain"))
    # The same worktree again, without the patch: back at HEAD
    with pytest.raises(build.BuildError):
        build.build_kernel(tree, [], name="mine", say=lambda *_: None)
    assert (src / "drivers" / "device.c").read_text() == "a\nb\nc\n"
    assert not (cache / "built" / "mine").exists()


def test_git_tree_patch_that_does_not_apply_leaves_no_worktree(cache, tmp_path, monkeypatch,
                                                                capsys):
    tree = _fake_git_tree(tmp_path / "linux")
    bad = _format_patch(tree, "drivers/device.c", "b\n", "B\n", tmp_path, "bad.patch")
    # context the file lacks, and blobs git does not have (no 3-way merge)
    text = bad.read_text().replace("\n a\n", "\n not in the file\n")
    bad.write_text(re.sub(r"^index \w+\.\.\w+", "index 1111111..2222222", text, flags=re.MULTILINE))
    monkeypatch.setattr(build, "configure", lambda *a, **k: pytest.fail("configured"))
    assert main(["kernel", "build", "--tree", str(tree), "--patch", str(bad), "--name", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # progress lines, then the error
    assert err[-1].startswith("devdax-lab: patch ") and sum("devdax-lab:" in e for e in err) == 1
    assert "does not apply" in err[-1] and "drivers/device.c" in err[-1], err
    assert build.worktree_paths(_git(tree, "worktree", "list", "--porcelain")) == [str(tree)]
    assert not (build.work_dir(tree) / "src").exists()
    assert not (cache / "built" / "x").exists()
    assert _git(tree, "status", "--porcelain") == ""


def test_plain_tree_mirror_is_patched_without_writing_the_tree(cache, tmp_path, monkeypatch):
    tree = _fake_tree(tmp_path / "linux")
    (tree / "drivers").mkdir()
    original = tree / "drivers" / "device.c"
    original.write_text("a\nb\nc\n")
    patch = tmp_path / "p.diff"
    patch.write_text("--- a/drivers/device.c\n+++ b/drivers/device.c\n@@ -1,3 +1,3 @@\n a\n-b\n"
                     "+B\n c\n")
    seen = {}
    _stop_after_source(monkeypatch, seen)
    with pytest.raises(build.BuildError):
        build.build_kernel(tree, [patch], say=lambda *_: None)
    src = seen["src"]
    assert (src / "drivers" / "device.c").read_text() == "a\nB\nc\n"
    assert original.read_text() == "a\nb\nc\n"
    assert (src / "Makefile").stat().st_ino == (tree / "Makefile").stat().st_ino  # hard link
    # Unpatched again: the file is the tree's, newer than what was built from the patch
    patched_mtime = (src / "drivers" / "device.c").stat().st_mtime_ns
    with pytest.raises(build.BuildError):
        build.build_kernel(tree, [], say=lambda *_: None)
    assert (src / "drivers" / "device.c").read_text() == "a\nb\nc\n"
    assert (src / "drivers" / "device.c").stat().st_mtime_ns >= patched_mtime
    assert original.stat().st_mtime_ns < patched_mtime


def test_objects_counted_and_expected_from_builds_of_the_same_config():
    log = ["  HOSTCC  scripts/basic/fixdep", "  CC      mm/memremap.o", "  AR      mm/built-in.a",
           "  CC      mm/gup.o", "  LD      vmlinux"]
    assert build.count_objects(log) == 2
    manifests = [{"fragment_sha256": "a", "objects": 900, "built_at": "2026-01-01T00:00:00"},
                 {"fragment_sha256": "a", "objects": 950, "built_at": "2026-02-01T00:00:00"},
                 {"fragment_sha256": "b", "objects": 5000, "built_at": "2026-03-01T00:00:00"},
                 {"fragment_sha256": "a", "built_at": "2026-04-01T00:00:00"}]  # older format
    assert build.expected_objects(manifests, "a") == 950
    manifests.append({"fragment_sha256": "a", "objects": 3, "built_at": "2026-05-01T00:00:00"})
    assert build.expected_objects(manifests, "a") == 950  # an incremental rebuild: not the total
    assert build.expected_objects(manifests, "c") is None


def test_make_reports_objects_to_progress(tmp_path):
    """A real make over a Makefile that prints kbuild's lines: the objects
    compiled reach the progress callback as "obj" units, out of *expected*,
    and the stage ends at the count."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "Makefile").write_text(
        "bzImage:\n\t@echo '  CC      mm/memremap.o'\n\t@echo '  AR      mm/built-in.a'\n"
        "\t@echo '  CC      mm/gup.o'\n\t@echo '  CC      mm/memory.o'\n")
    reports = []
    build.make(src, tmp_path / "obj", ["bzImage"], tmp_path / "build.log", say=reports.append,
               progress=lambda *a, **k: reports.append((a, k)), stage="build x", expected=2)
    assert reports == [(("build x", 1, 2), {"unit": "obj"}), (("build x", 2, 2), {"unit": "obj"}),
                       (("build x", 3, 3), {"unit": "obj"}), (("build x", 3, 3), {"unit": "obj"})]
    assert build.count_objects((tmp_path / "build.log").read_text().splitlines()) == 3


def test_resolve_commit_peels_revisions_and_refuses_unknown_ones(tmp_path):
    from lab.build import resolve_commit, tree_identity

    repo = tmp_path / "r"
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@l", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@l", "PATH": "/usr/bin:/bin"}

    def git(*args):
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                              check=True, env=env).stdout.strip()

    repo.mkdir()
    git("init", "-q")
    for i in range(2):
        git("commit", "-q", "--allow-empty", "-m", f"c{i}")
    git("tag", "-a", "-m", "annotated", "v1", "HEAD~1")
    first, head = git("rev-parse", "HEAD~1"), git("rev-parse", "HEAD")
    assert resolve_commit(repo, "v1") == first  # an annotated tag peeled to its commit
    assert resolve_commit(repo, "HEAD") == head == resolve_commit(repo, head[:7])
    assert tree_identity(repo, "HEAD~1") == f"git:{first}" and tree_identity(repo) == f"git:{head}"
    with pytest.raises(UserError, match="'nope' is not a commit of"):
        resolve_commit(repo, "nope")
    tree = git("rev-parse", "HEAD^{tree}")
    with pytest.raises(UserError, match="is not a commit"):  # a tree object is not a commit
        resolve_commit(repo, tree)
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(UserError, match="not a git repository"):
        tree_identity(plain, "HEAD")
