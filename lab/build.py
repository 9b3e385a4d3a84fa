"""Kernels built from a developer's own (patched) tree: ``devdax-lab kernel
build --tree DIR [--patch FILE ...] [--name NAME]``.

The tree is never written to. Every build compiles a source directory of its
own, ``<work>/src``, into ``<work>/obj``, where ``<work>`` is stable per tree
(``cache_root()/build/<tree name>-<hash of its path>/``), so that make's own
dependency tracking hits on a rebuild and ccache hits across trees (its
``base_dir`` is ``<work>``, so every path it sees is ``../src/...`` whatever
the tree, and ``hash_dir`` is off so that ``-g`` does not key on the object
directory):

- a git tree is checked out at its HEAD commit in a worktree there
  (``git worktree add``), and the patches are applied with ``git am``
  (``git apply`` and a commit for a patch not in ``git format-patch`` form);
  uncommitted changes are not built (commit them, or pass them as a patch).
  A patch that does not apply removes the worktree again;
- any other tree is mirrored there with hard links (``cp -al``; a copy
  across file systems), and patched with ``patch -p1`` after the files each
  patch touches have been made private copies.

The configuration is ``make tinyconfig`` plus ``lab/data/kernel/devdax-lab.config``
merged with the tree's own ``scripts/kconfig/merge_config.sh``; every
``CONFIG_X=y`` line of the fragment must survive into the final ``.config``.

The result is registered in ``cache_root()/built/<NAME>/`` (bzImage, vmlinux,
manifest.json, build.log), written with :func:`lab.cache.atomic_entry`, and
keyed by the tree's identity (git: the commit; otherwise a hash of every
file's path, size and mtime, which a touched file changes), the patches'
sha256 and the fragment's sha256: a second build of the same inputs returns
the entry at once. ``--kernel NAME`` then finds it through
:func:`lab.kernels.resolve`, as does ``--kernel PATH`` for a tree already
built in place (its ``arch/x86/boot/bzImage`` and ``vmlinux``).

Pure parts (fragment parsing, the required-options check, the cache key, the
progress summary of make's output) are separate from the I/O ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from lab.cache import (
    atomic_entry,
    cache_root,
    cached_entry,
    discard,
    entry_lock,
    locked,
    sha256_file,
)
from lab.data import data_path
from lab.errors import LabFailure
from lab.kernels import load_catalog
from lab.kernels.built import (  # the registry's read side, re-exported
    MANIFEST,
    built_artifacts,
    built_dir,
    built_names,
    is_kernel_tree,
    read_manifest,
    tree_artifacts,
)
from lab.model import KernelArtifacts, UserError
from lab.progress import Progress

__all__ = [
    "FRAGMENT_PATH",
    "BuildError",
    "BuildInputs",
    "build_kernel",
    "built_artifacts",
    "built_dir",
    "built_names",
    "cache_key",
    "ccache_env",
    "ccache_hits",
    "check_config",
    "configure",
    "debian_source_git",
    "debian_source_tree",
    "default_name",
    "is_kernel_tree",
    "is_mbox",
    "make",
    "parse_config",
    "patch_failure",
    "patched_paths",
    "remove_built",
    "required_options",
    "resolve_commit",
    "tree_artifacts",
    "tree_identity",
    "worktree_paths",
]

FRAGMENT_PATH = data_path("kernel", "devdax-lab.config")
ARCH = "x86"
#: a build of the same tree by another process may take this long (a cold
#: defconfig build takes about 15 min here)
BUILD_LOCK_TIMEOUT = 7200.0
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")

Say = Callable[[str], None]


class BuildError(LabFailure):
    """``make`` failed: carries the tail of the build log (the CLI prints it
    and exits 1)."""

    def __init__(self, message: str, log: Path | None = None, tail: Sequence[str] = ()) -> None:
        self.log = log
        self.tail = list(tail)
        text = message
        if self.tail:
            text += "\n" + "\n".join(f"  {line}" for line in self.tail)
        if log is not None:
            text += f"\nfull log: {log}"
        super().__init__(text)


# ---------------------------------------------------------------- pure parts

_SET = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_UNSET = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")


def parse_config(text: str) -> dict[str, str]:
    """A .config or fragment as {option: value}; ``# CONFIG_X is not set``
    gives ``"n"``. Other comments and blank lines are ignored."""
    out: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if m := _SET.match(line):
            out[m[1]] = m[2]
        elif m := _UNSET.match(line):
            out[m[1]] = "n"
    return out


def required_options(fragment_text: str) -> list[str]:
    """The options a fragment requires: its ``CONFIG_X=y`` lines, in order."""
    return [k for k, v in parse_config(fragment_text).items() if v == "y"]


def check_config(config_text: str, required: Iterable[str]) -> list[str]:
    """The *required* options that are not ``=y`` in a final .config."""
    have = parse_config(config_text)
    return [opt for opt in required if have.get(opt) != "y"]


@dataclass(frozen=True)
class BuildInputs:
    """What a built kernel is a function of."""

    tree: str  # resolved path of the developer's tree
    identity: str  # "git:<commit>" or "files:<hash of paths, sizes, mtimes>"
    patches: tuple[tuple[str, str], ...]  # (file name, sha256), in application order
    fragment_sha256: str


def cache_key(inputs: BuildInputs) -> str:
    """A short stable key over the inputs (not the tree's path: a tree moved
    elsewhere with the same commit gives the same kernel)."""
    h = hashlib.sha256()
    h.update(f"identity:{inputs.identity}\0".encode())
    for name, digest in inputs.patches:
        h.update(f"patch:{digest}\0".encode())  # content, not name, matters
    h.update(f"fragment:{inputs.fragment_sha256}\0".encode())
    return h.hexdigest()[:16]


def default_name(tree: Path, patches: Sequence[tuple[str, str]]) -> str:
    """The tree's directory name, plus a short hash of the patches if any."""
    base = re.sub(r"[^A-Za-z0-9._+-]", "-", tree.resolve().name).lstrip(".-") or "tree"
    if not patches:
        return base
    h = hashlib.sha256("".join(d for _, d in patches).encode()).hexdigest()[:8]
    return f"{base}-{h}"


def files_identity(entries: Iterable[tuple[str, int, int]]) -> str:
    """Hash of (relative path, size, mtime_ns) triples, in sorted order."""
    h = hashlib.sha256()
    for rel, size, mtime in sorted(entries):
        h.update(f"{rel}\0{size}\0{mtime}\n".encode())
    return "files:" + h.hexdigest()[:24]


_STEP = re.compile(r"^\s{2}([A-Z][A-Z0-9_]*)\s+(\S.*)$")


def make_step(line: str) -> tuple[str, str] | None:
    """(``CC``, ``mm/memremap.o``) for one of kbuild's short lines, else None."""
    m = _STEP.match(line)
    return (m[1], m[2]) if m else None


def ccache_env(src: Path, obj: Path) -> dict[str, str]:
    """ccache settings for compiling *src* in *obj*: paths under their common
    parent become relative (``../src/mm/memremap.c`` from ``<work>/obj``),
    so that a build hits on objects compiled in another work directory; the
    directory compiled in is not hashed (with ``-g`` it would be; the hit
    then keeps the DW_AT_comp_dir of the first build, which drgn does not
    use); and depend mode: a miss runs the compiler once, not the
    preprocessor too (kbuild's ``-Wp,-MMD`` gives ccache the headers)."""
    return {"CCACHE_BASEDIR": os.path.commonpath([src, obj]), "CCACHE_NOHASHDIR": "1",
            "CCACHE_DEPEND": "1"}


def ccache_hits(stats_log: Iterable[str]) -> tuple[int, int]:
    """(hits, misses) of the compilations in a ccache ``stats_log`` (one
    ``# file`` line, then one counter a line, per compilation)."""
    hits = misses = 0
    for line in stats_log:
        word = line.strip()
        if word in ("direct_cache_hit", "preprocessed_cache_hit"):
            hits += 1
        elif word == "cache_miss":
            misses += 1
    return hits, misses


_DIFF_PATH = re.compile(r"^(?:---|\+\+\+) (\S+)")
_GIT_PATH = re.compile(r"^diff --git (\S+) (\S+)$")


def patched_paths(patch_text: str, strip: int = 1) -> list[str]:
    """The files a unified diff touches (old and new names, ``-p``*strip*),
    in order of appearance, without ``/dev/null``."""
    out: list[str] = []
    for line in patch_text.splitlines():
        names: Sequence[str] = ()
        if m := _DIFF_PATH.match(line):
            names = (m[1],)
        elif m := _GIT_PATH.match(line):
            names = (m[1], m[2])
        for name in names:
            if name == "/dev/null":
                continue
            parts = name.split("/")[strip:]
            rel = "/".join(parts)
            if rel and rel not in out:
                out.append(rel)
    return out


def is_mbox(patch_text: str) -> bool:
    """A patch in ``git format-patch`` (mbox) form, which ``git am`` takes."""
    return patch_text.startswith("From ")


_FAILURE = re.compile(r"^(error: .*|can't find file to patch.*|No file to patch.*|"
                      r"patch: \*\*\*\* .*|Reversed \(or previously applied\) patch detected.*)$")
_PATCHING = re.compile(r"^(?:patching|checking) file (.+)$")
_HUNK_FAILED = re.compile(r"^Hunk #\d+ FAILED.*$")
# what git says when its 3-way fallback cannot help, before saying why
_NOISE = re.compile(r"lacks the necessary blob|could not build fake ancestor")


def patch_failure(output: str) -> str:
    """One line out of the output of a failed ``git apply``/``git am``/``patch``:
    its error lines (a failed hunk prefixed with its file) joined with "; ",
    else its last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    picked: list[str] = []
    current = ""
    for line in lines:
        if m := _PATCHING.match(line):
            current = m[1].strip("'")
        elif _HUNK_FAILED.match(line):
            picked.append(f"{current}: {line}" if current else line)
        elif _FAILURE.match(line) and not _NOISE.search(line):
            picked.append(line)
    text = "; ".join(dict.fromkeys(picked)) or (lines[-1] if lines else "no output")
    return text if len(text) <= 300 else text[:297] + "..."


def worktree_paths(porcelain: str) -> list[str]:
    """The paths of ``git worktree list --porcelain``, the main tree first."""
    return [line.removeprefix("worktree ") for line in porcelain.splitlines()
            if line.startswith("worktree ")]


# ---------------------------------------------------------------- trees



def _is_git(path: Path) -> bool:
    return (path / ".git").exists()


def _git(tree: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [
        "git", "-C", str(tree),
        "-c", "user.name=devdax-lab", "-c", "user.email=devdax-lab@localhost",
        # no automatic gc of the user's repository after our commits (git am)
        "-c", "gc.auto=0",
        *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        why = (proc.stderr.strip() or proc.stdout.strip())[-400:]
        raise UserError(f"`git {' '.join(args)}` in {tree} failed: {why}")
    return proc


def _walk_files(tree: Path) -> Iterator[tuple[str, int, int]]:
    for root, dirs, files in os.walk(tree):
        dirs[:] = [d for d in dirs if d != ".git"]
        for f in files:
            p = os.path.join(root, f)
            try:
                st = os.lstat(p)
            except OSError:
                continue
            yield os.path.relpath(p, tree), st.st_size, st.st_mtime_ns


def tree_identity(tree: Path, rev: str | None = None) -> str:
    """``git:<commit>`` for a git tree (its HEAD, or *rev*: see
    :func:`resolve_commit`), else :func:`files_identity` of every file under
    it (``.git`` excluded).

    :raises UserError: *rev* given for a tree that is not a git repository."""
    if _is_git(tree):
        return "git:" + resolve_commit(tree, rev or "HEAD")
    if rev is not None:
        raise UserError(f"{tree} is not a git repository: a revision ({rev}) needs one")
    return files_identity(_walk_files(tree))


def resolve_commit(tree: Path, rev: str) -> str:
    """The full hash of the commit *rev* names in the git tree *tree*
    (``git rev-parse --verify REV^{commit}``: a tag or a branch is peeled to
    its commit).

    :raises UserError: *rev* names no commit there."""
    proc = _git(tree, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise UserError(f"{rev!r} is not a commit of {tree} (git rev-parse --verify "
                        f"'{rev}^{{commit}}' finds none): name a commit, branch or tag there")
    return proc.stdout.strip()


def _in_place_built(tree: Path) -> bool:
    return (tree / ".config").exists() or (tree / "include" / "config").exists()



DEBIAN_SOURCE = Path("/usr/src/linux-source-6.12.tar.xz")


def debian_source_tree(tarball: Path = DEBIAN_SOURCE, *, say: Say = print) -> Path:
    """Debian's ``linux-source-6.12`` unpacked once into
    ``cache_root()/src/<name>/`` (kept across runs: the tests and ``bench
    build`` use it).

    :raises UserError: the package is not installed."""
    name = tarball.name.removesuffix(".tar.xz")
    final = cache_root() / "src" / name
    if not (final / "Makefile").is_file() and not tarball.is_file():
        raise UserError(f"{tarball} is missing: install the Debian package {name} "
                        "(scripts/setup.sh does)")

    def unpack(tmp: Path) -> None:
        say(f"unpacking {tarball} into {final}")
        subprocess.run(["tar", "-xf", str(tarball), "-C", str(tmp), "--strip-components=1"],
                       check=True)

    return cached_entry(final, unpack, complete=lambda e: (e / "Makefile").is_file(),
                        what=f"unpacking {tarball.name}", say=say)


def debian_source_git(tarball: Path = DEBIAN_SOURCE, *, say: Say = print) -> Path:
    """A git repository of :func:`debian_source_tree` (one commit, its files
    hard-linked from the unpacked tree), made once into
    ``cache_root()/src/<name>-git/``: a developer's git tree for the tests
    and benchmarks of the git path.

    :raises UserError: the package is not installed."""
    plain = debian_source_tree(tarball, say=say)
    final = plain.with_name(plain.name + "-git")

    def make_repository(tmp: Path) -> None:
        started = time.monotonic()
        say(f"making a git repository of {plain} in {final}")
        if subprocess.run(["cp", "-al", f"{plain}/.", str(tmp)], check=False,
                          capture_output=True).returncode != 0:
            subprocess.run(["cp", "-a", f"{plain}/.", str(tmp)], check=True)
        # Fast loose objects (a repository made once, read by checkouts),
        # never repacked behind a build's back.
        fast = ("-c", "core.looseCompression=1")
        _git(tmp, "init", "--quiet")
        _git(tmp, "config", "gc.auto", "0")
        # --force: Debian's top-level .gitignore ignores everything (/*)
        _git(tmp, *fast, "add", "--all", "--force")
        _git(tmp, *fast, "commit", "--quiet", "--no-verify", "-m", plain.name)
        say(f"made {final} in {time.monotonic() - started:.0f} s")

    return cached_entry(
        final, make_repository, what=f"making {final.name}", say=say,
        complete=lambda e: (e / ".git" / "HEAD").is_file() and (e / "Makefile").is_file())


# ---------------------------------------------------------------- registry


def remove_built(name: str) -> int:
    """Unregister the built kernel *name*: its registry entry and the guest
    images made for it (``cache_root()/images/<name>-<release>-<key>/``,
    named by :func:`lab.image.build_image`), each removed under its lock
    (:func:`lab.cache.discard`). Returns the bytes freed (0 if there was no
    such kernel)."""
    entry = built_dir(name)
    m = read_manifest(entry)
    if m is None:
        return 0
    doomed = [entry, *(cache_root() / "images").glob(f"{name}-{m.get('release', '')}-*")]
    freed = sum(f.stat().st_size for d in doomed for f in d.rglob("*") if f.is_file())
    for d in doomed:
        discard(d)
    return freed






# ---------------------------------------------------------------- build (I/O)


def _cc() -> str:
    return "ccache gcc" if shutil.which("ccache") else "gcc"


def _make_argv(src: Path, obj: Path, *targets: str) -> list[str]:
    return ["make", "-C", str(src), f"O={obj}", f"ARCH={ARCH}", f"CC={_cc()}",
            f"-j{os.cpu_count() or 1}", *targets]


def _tail(log: Path, n: int = 25) -> list[str]:
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return []
    errors = [i for i, line in enumerate(lines) if re.search(r"\berror\b|Error \d", line)]
    if errors:  # the first error and what follows, rather than make's echo of it
        start = max(0, errors[0] - 3)
        return lines[start:start + n]
    return lines[-n:]


def make(src: Path, obj: Path, targets: Sequence[str], log: Path, *, say: Say = print,
         interval: float = 5.0, env: dict[str, str] | None = None,
         progress: Progress | None = None, stage: str = "", expected: int | None = None) -> float:
    """Run make for *targets* (output appended to *log*, ccache set up by
    :func:`ccache_env`, then *env*), printing a line every *interval*
    seconds: elapsed time, objects compiled, the last step. With *progress*,
    the objects compiled are reported to it instead, as *stage*, out of
    *expected* (see :func:`expected_objects`).
    Returns the elapsed seconds.

    :raises BuildError: make failed (with the tail of the log)."""
    argv = _make_argv(src, obj, *targets)
    started = last = time.monotonic()
    count, step = 0, ""
    with open(log, "a") as out:
        out.write(f"$ {' '.join(argv)}\n")
        out.flush()
        # A process group of its own: stopping the build stops make's
        # children too (sub-makes, compilers), not only make.
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", start_new_session=True,
                                env={**os.environ, **ccache_env(src, obj), **(env or {})})
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                out.write(line)
                if s := make_step(line):
                    step = f"{s[0]} {s[1]}"
                    count += s[0] == "CC"
                    if progress and s[0] == "CC":
                        progress(stage, count, max(expected or 0, count) or None, unit="obj")
                now = time.monotonic()
                if not progress and now - last >= interval:
                    last = now
                    say(f"  [{_mmss(now - started)}] {count} objects compiled; {step}")
            rc = proc.wait()
        except BaseException:
            _stop_make(proc)
            raise
    elapsed = time.monotonic() - started
    if progress and rc == 0:
        progress(stage, count, count, unit="obj")
    if rc != 0:
        raise BuildError(f"`make {' '.join(targets)}` failed (exit status {rc}) after "
                         f"{_mmss(elapsed)}:", log, _tail(log))
    return elapsed


#: how long make gets after SIGTERM to delete its half-written targets
MAKE_STOP_WAIT = 10.0


def _stop_make(proc: subprocess.Popen) -> None:
    """Stop make and every process of its group: SIGTERM first (make then
    deletes the targets it was writing, so the next build does not take a
    truncated object for an up-to-date one), SIGKILL after
    :data:`MAKE_STOP_WAIT`; always reaped."""
    for sig, wait in ((signal.SIGTERM, MAKE_STOP_WAIT), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(ProcessLookupError):  # a child that outlived make
        os.killpg(proc.pid, signal.SIGKILL)


def count_objects(lines: Iterable[str]) -> int:
    """Objects compiled (make's ``CC`` lines) in a build log."""
    return sum(1 for line in lines if (s := make_step(line)) and s[0] == "CC")


def expected_objects(manifests: Iterable[dict], fragment_sha256: str) -> int | None:
    """How many objects a full build with this config fragment compiles: the
    most any registered build with the same fragment compiled (its
    ``objects``; an incremental rebuild compiles fewer, so not the latest),
    None if there is none: the bar of a first build has no total."""
    counts = [m["objects"] for m in manifests
              if m.get("fragment_sha256") == fragment_sha256 and m.get("objects")]
    return max(counts) if counts else None


def _registered_builds() -> Iterator[dict]:
    """The manifests of the registered kernels, with ``objects`` counted from
    their build.log for those registered before it was recorded."""
    for name in built_names():
        m = read_manifest(built_dir(name))
        if m is not None and "objects" not in m:
            m = {**m, "objects": count_objects(_read_lines(built_dir(name) / "build.log"))}
        if m is not None:
            yield m


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except OSError:
        return []


def _mmss(seconds: float) -> str:
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


def configure(src: Path, obj: Path, log: Path, fragment: Path = FRAGMENT_PATH, *,
              say: Say = print) -> None:
    """tinyconfig + *fragment* (merge_config.sh) + olddefconfig in *obj*, then
    check the result.

    :raises UserError: naming every required option the final .config lacks."""
    obj.mkdir(parents=True, exist_ok=True)
    make(src, obj, ["tinyconfig"], log, say=say)
    cmd = [str(src / "scripts" / "kconfig" / "merge_config.sh"), "-m", "-O", str(obj),
           str(obj / ".config"), str(fragment)]
    with open(log, "a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        rc = subprocess.run(cmd, cwd=obj, stdout=out, stderr=subprocess.STDOUT, check=False,
                            env={**os.environ, "ARCH": ARCH}).returncode
    if rc != 0:
        raise BuildError(f"merge_config.sh failed (exit status {rc}):", log, _tail(log))
    make(src, obj, ["olddefconfig"], log, say=say)
    missing = check_config((obj / ".config").read_text(), required_options(fragment.read_text()))
    if missing:
        raise UserError(
            f"the kernel configuration lacks {len(missing)} option(s) the lab needs after merging "
            f"{fragment.name}: {', '.join(missing)} (missing or unmet dependencies in this tree; "
            f"see {obj / '.config'})"
        )



def work_dir(tree: Path) -> Path:
    """The stable work directory of *tree* (its source copy or worktree and
    object directory)."""
    digest = hashlib.sha256(str(tree.resolve()).encode()).hexdigest()[:8]
    return cache_root() / "build" / f"{tree.resolve().name}-{digest}"


def _registered_worktree(tree: Path, src: Path) -> bool:
    porcelain = _git(tree, "worktree", "list", "--porcelain").stdout
    return str(src) in worktree_paths(porcelain) and (src / ".git").is_file()


def _remove_worktree(tree: Path, src: Path) -> None:
    """Unregister *src* from *tree*'s worktrees and delete it (no global
    ``git worktree prune``: the user's other worktrees are not ours)."""
    _git(tree, "worktree", "remove", "--force", str(src), check=False)
    shutil.rmtree(src, ignore_errors=True)
    if str(src) in worktree_paths(_git(tree, "worktree", "list", "--porcelain").stdout):
        _git(tree, "worktree", "prune", check=False)  # only stale entries: src is gone


def _check_patches(tree: Path, commit: str, patches: Sequence[Path]) -> None:
    """Apply *patches* in order to *commit* in a temporary index (``git apply
    --cached --3way``; only objects are written), so that a patch that does
    not apply is found before the worktree is touched (deleting a worktree of
    ~80k files takes minutes on a disk mounted with ``discard``).

    :raises UserError: naming the first patch that does not apply, and why."""
    with tempfile.TemporaryDirectory(prefix="devdax-lab-index-") as tmp:
        env = {**os.environ, "GIT_INDEX_FILE": str(Path(tmp) / "index")}
        base = ["git", "-C", str(tree), "-c", "gc.auto=0"]
        subprocess.run([*base, "read-tree", commit], env=env, check=True, capture_output=True)
        for p in patches:
            proc = subprocess.run([*base, "apply", "--cached", "--3way", str(p)], env=env,
                                  capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise UserError(f"patch {p} does not apply to {commit[:12]} of {tree}: "
                                f"{patch_failure(proc.stdout + proc.stderr)}")


def _git_source(tree: Path, commit: str, patches: Sequence[Path], src: Path, say: Say,
                head: bool = True) -> None:
    _check_patches(tree, commit, patches)
    if head and _git(tree, "status", "--porcelain", "--untracked-files=no").stdout.strip():
        say(f"note: {tree} has uncommitted changes; building its HEAD {commit[:12]} "
            "(commit them or pass them with --patch)")
    if _registered_worktree(tree, src):
        _git(src, "am", "--abort", check=False)
        _git(src, "checkout", "--quiet", "--detach", "--force", commit)
        _git(src, "clean", "-fdxq")
    else:
        shutil.rmtree(src, ignore_errors=True)
        say(f"checking out {commit[:12]} in {src}")
        # --force: a worktree of ours registered earlier whose directory is gone
        _git(tree, "worktree", "add", "--quiet", "--detach", "--force", str(src), commit)
    for p in patches:
        text = p.read_text(errors="replace")
        if is_mbox(text):
            proc = _git(src, "am", "--3way", str(p), check=False)
        else:
            proc = _git(src, "apply", "--index", str(p), check=False)
            if proc.returncode == 0:
                proc = _git(src, "commit", "--quiet", "-m", f"devdax-lab: {p.name}", check=False)
        if proc.returncode != 0:
            # Rare after _check_patches. git am --3way says why it could not
            # merge, not why the patch does not apply: git apply --check does.
            why = _git(src, "apply", "--check", str(p), check=False)
            output = why.stdout + why.stderr if why.returncode else proc.stdout + proc.stderr
            _git(src, "am", "--abort", check=False)
            _remove_worktree(tree, src)
            raise UserError(f"patch {p} does not apply to {commit[:12]} of {tree}: "
                            f"{patch_failure(output)}")


def _private_copy(path: Path) -> None:
    """Replace a hard link of the user's file by a copy of it with a new
    mtime (so that make rebuilds what depended on its former content)."""
    if not path.is_file() or path.is_symlink():
        return
    tmp = path.with_name(f".{path.name}.devdax-lab-tmp")
    shutil.copyfile(path, tmp)
    tmp.chmod(path.stat().st_mode & 0o7777)
    tmp.replace(path)


def _mirror_source(tree: Path, patches: Sequence[Path], src: Path, state: dict,
                   say: Say) -> list[str]:
    """*src* as a hard-linked mirror of *tree* (a copy across file systems)
    with *patches* applied; returns the files the patches touch."""
    touched = [rel for p in patches for rel in patched_paths(p.read_text(errors="replace"))]
    shutil.rmtree(src, ignore_errors=True)
    say(f"mirroring {tree} in {src}")
    proc = subprocess.run(["cp", "-al", f"{tree}/.", str(src)], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:  # another file system: a real copy
        shutil.rmtree(src, ignore_errors=True)
        subprocess.run(["cp", "-a", f"{tree}/.", str(src)], check=True)
    # Files patched last time or now: private, and newer than their objects.
    for rel in dict.fromkeys([*state.get("patched", []), *touched]):
        _private_copy(src / rel)
    for p in patches:
        proc = subprocess.run(["patch", "-p1", "--forward", "--batch", "-d", str(src), "-i",
                               str(p)], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            shutil.rmtree(src, ignore_errors=True)
            raise UserError(f"patch {p} does not apply to {tree}: "
                            f"{patch_failure(proc.stdout + proc.stderr)}")
    return touched


def _prepare_source(tree: Path, identity: str, patches: Sequence[Path],
                    patch_sums: Sequence[tuple[str, str]], work: Path, say: Say,
                    head: bool = True) -> Path:
    """``<work>/src``: a worktree of a git tree (at its HEAD, or at another
    commit when not *head*), or a mirror of another tree, with *patches*
    applied.

    :raises UserError: a tree configured in place, or a patch that does not apply."""
    src = work / "src"
    if identity.startswith("git:"):
        _git_source(tree, identity.removeprefix("git:"), patches, src, say, head)
        return src
    if _in_place_built(tree):
        raise UserError(
            f"{tree} has been configured or built in place (.config or include/config), "
            "so it cannot be built out of tree: run `make mrproper` in it, or boot it as "
            f"built with --kernel {tree}"
        )
    state_file = work / "src.json"
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):
        state = {}
    wanted = {"identity": identity, "patches": [d for _, d in patch_sums]}
    if (src / "Makefile").is_file() and all(state.get(k) == v for k, v in wanted.items()):
        return src  # the mirror is up to date
    state_file.unlink(missing_ok=True)  # a mirror being made is no mirror
    touched = _mirror_source(tree, patches, src, state, say)
    state_file.write_text(json.dumps({**wanted, "patched": touched}) + "\n")
    return src


def build_kernel(tree: Path | str, patches: Sequence[Path | str] = (), name: str | None = None,
                 *, rev: str | None = None, fragment: Path = FRAGMENT_PATH, say: Say = print,
                 progress: Progress | None = None) -> KernelArtifacts:
    """Build *tree* (a git tree: its HEAD, or the commit *rev* names) with
    *patches* and the lab's configuration and register it as *name*; a
    registered kernel of the same inputs is returned at once. Every commit
    of a tree is built in the same worktree and object directory, so a
    build of another commit recompiles only what differs (``lab.bisect``).

    :raises UserError: bad tree, revision, patch, name, or a configuration
        lacking a required option.
    :raises BuildError: make failed."""
    tree = Path(tree).expanduser().resolve()
    if not tree.is_dir():
        raise UserError(f"--tree {tree}: no such directory")
    if not is_kernel_tree(tree):
        raise UserError(f"--tree {tree}: not a kernel tree (no Makefile, Kconfig and "
                        "scripts/kconfig/merge_config.sh)")
    patch_paths = [Path(p).expanduser().resolve() for p in patches]
    for p in patch_paths:
        if not p.is_file():
            raise UserError(f"--patch {p}: no such file")
    patch_sums = tuple((p.name, sha256_file(p)) for p in patch_paths)
    name = name or default_name(tree, patch_sums)
    if not _NAME_RE.match(name):
        raise UserError(f"--name {name!r}: use letters, digits, '.', '_', '+', '-'")
    catalog: list[str] = []
    with contextlib.suppress(UserError):  # an unreadable catalog is not this command's problem
        catalog = list(load_catalog())
    if name in catalog:
        raise UserError(f"--name {name!r} is a kernel of the catalog: choose another name")
    if not shutil.which("make"):
        raise UserError("`make` is not installed: run scripts/setup.sh")

    identity = tree_identity(tree, rev)
    inputs = BuildInputs(str(tree), identity, patch_sums, sha256_file(fragment))
    key = cache_key(inputs)
    entry = built_dir(name)
    m = read_manifest(entry)
    if m is not None and m.get("key") == key and (art := built_artifacts(name)) is not None:
        say(f"{name}: cached ({m['release']}, {entry})")
        return art

    work = work_dir(tree)
    with locked(entry_lock(work), what=f"building {name} from {tree}",
                timeout=BUILD_LOCK_TIMEOUT, say=say):
        work.mkdir(parents=True, exist_ok=True)
        obj = work / "obj"
        log = work / "build.log"
        log.write_text(f"# devdax-lab kernel build {name} at {datetime.now(UTC).isoformat()}\n")
        src = _prepare_source(tree, identity, patch_paths, patch_sums, work, say, rev is None)
        started = time.monotonic()
        say(f"configuring {name} (tinyconfig + {fragment.name}) in {obj}")
        configure(src, obj, log, fragment, say=say)
        say(f"building {name} with {os.cpu_count()} jobs (CC={_cc()}); log: {log}")
        stats_log = work / "ccache-stats.log"
        stats_log.unlink(missing_ok=True)
        expected = expected_objects(_registered_builds(), inputs.fragment_sha256)
        make(src, obj, ["bzImage"], log, say=say, env={"CCACHE_STATSLOG": str(stats_log)},
             progress=progress, stage=f"build {name}", expected=expected)
        objects = count_objects(_read_lines(log))
        elapsed = time.monotonic() - started
        hits, misses = ccache_hits(_read_lines(stats_log))
        if hits + misses:
            say(f"ccache: {hits} of {hits + misses} compilations were hits")
        release = (obj / "include" / "config" / "kernel.release").read_text().strip()
        with atomic_entry(entry) as tmp:
            tmp.chmod(0o755)
            shutil.copy2(obj / "arch" / "x86" / "boot" / "bzImage", tmp / "bzImage")
            shutil.copy2(obj / "vmlinux", tmp / "vmlinux")
            shutil.copy2(obj / ".config", tmp / "config")
            shutil.copy2(log, tmp / "build.log")
            manifest = {
                "format": 1,
                "name": name,
                "key": key,
                "tree": str(tree),
                "identity": identity,
                "patches": [{"file": n, "sha256": d} for n, d in patch_sums],
                "fragment_sha256": inputs.fragment_sha256,
                "release": release,
                "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "build_seconds": round(elapsed, 1),
                "ccache": {"hits": hits, "misses": misses},
                "objects": objects,  # the total of the next build's progress bar
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    say(f"{name}: built {release} in {_mmss(elapsed)}; registered at {entry}")
    art = built_artifacts(name)
    assert art is not None
    return art
