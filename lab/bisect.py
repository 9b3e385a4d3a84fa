"""``devdax-lab bisect --tree DIR --good REV --bad REV SCENARIO``: the first
commit of a git tree whose kernel fails a scenario's verdict.

The engine is git's own: each step asks ``git rev-list --bisect-all BAD
--not GOOD...`` for the commits between the known good and bad ones, ranked
by how evenly each splits them (git's ``dist``), and tests the best one not
skipped. Nothing of the bisection is written into the user's repository: no
``refs/bisect/*``, no ``BISECT_LOG``, no checkout; the good, bad and skipped
sets live in this process. (``git bisect`` run in the lab's worktree would
keep them in the repository's git directory, where an interrupted run leaves
a bisection in progress behind, and its answers would have to be parsed
from English.) Skips are handled as git bisect handles them: a commit that
could not be tested (a build or boot failure: verdict 125) is set aside and
the next best candidate is tested (git picks a pseudo-random one near the
best; this takes the next in git's ranking); when only skipped commits are
left between good and bad, the first bad commit is one of them and the bad
one, and the bisection says so.

Each candidate is built by :func:`lab.build.build_kernel` with ``rev=`` in
the tree's one lab-owned worktree and object directory (the user's checkout
is never touched; make recompiles only what differs and ccache has the
rest), registered as ``bisect-<12 hex digits>`` (content-addressed by the
build's cache key: a candidate built before is a cache hit), and judged by
:func:`lab.experiment.verdict` exactly as ``devdax-lab check`` judges a
kernel: 0 good, 1 bad, 125 skip. Its run directory is ``OUT/<12 hex
digits>/``. A registered candidate costs ~90 MB (vmlinux with DWARF) plus
its guest image (~12 MB); the candidates this bisection registered are
removed at the end unless asked to keep them. Candidates boot cold: a saved
warm-start state (~105 MB, a cold boot plus a save) would serve one run.

Candidates are tested one at a time: a kernel build uses every core of the
machine, so building two at once is not faster, and a boot (seconds) is
short next to a build.

Exit status: 0 the first bad commit was found; 125 only skipped commits are
left (it cannot tell which of them is first); 1 the --bad end, judged last
when every candidate was good, holds (there is no first bad commit); 2 bad
input (nothing is built or written).

Pure parts (parsing git's ranking, choosing the next candidate, the step
estimate, the messages) come first; :func:`bisect` does the I/O.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import EXIT_UNTESTABLE, LabFailure, Untestable, UserError, VerdictFailed

__all__ = ["Outcome", "Tested", "bisect", "candidate_name", "cost_line", "estimate_steps",
           "next_candidate", "parse_bisect_all", "progress_line", "result_lines", "search"]

GOOD, BAD, SKIP = 0, 1, EXIT_UNTESTABLE
VERDICT_WORDS = {GOOD: "good", BAD: "bad", SKIP: "skip"}

Say = Callable[[str], None]


# ---------------------------------------------------------------- pure parts

_RANKED = re.compile(r"^([0-9a-f]{7,64})\s+\((?:.*,\s*)?dist=(\d+)\)\s*$")


def parse_bisect_all(lines: Iterable[str]) -> list[tuple[str, int]]:
    """``git rev-list --bisect-all``'s lines (``HASH (dist=N)``, with any
    decoration before ``dist``) as (hash, dist), in git's order: the best
    split first."""
    out = []
    for line in lines:
        if m := _RANKED.match(line.strip()):
            out.append((m[1], int(m[2])))
    return out


def next_candidate(ranked: Sequence[tuple[str, int]], bad: str,
                   skipped: Iterable[str]) -> str | None:
    """The commit to test next: the best-ranked one that is neither the
    known bad one nor skipped; None when none is left."""
    skip = set(skipped)
    for commit, _dist in ranked:
        if commit != bad and commit not in skip:
            return commit
    return None


def estimate_steps(count: int) -> int:
    """Steps left after the next one when *count* commits remain between
    good and bad (the bad one included): git's ``estimate_bisect_steps``
    (bisect.c), so the lab's estimate is the one ``git bisect`` prints."""
    if count < 3:
        return 0
    n = int(math.log2(count))
    e = 1 << n
    x = count - e
    return n if e < 3 * x else n - 1


def candidate_name(commit: str) -> str:
    """The registered kernel name of a candidate commit."""
    return f"bisect-{commit[:12]}"


def progress_line(number: int, total: int, commit: str, subject: str, remaining: int) -> str:
    """``candidate 2 of ~3: 6f3dc90370c8 mm/gup: ... (5 commits left)``."""
    return (f"candidate {number} of ~{max(total, number)}: {commit[:12]} {subject} "
            f"({remaining} commit{'s' if remaining != 1 else ''} left to bisect)")


@dataclass(frozen=True)
class Tested:
    """One candidate built and judged."""

    commit: str
    subject: str
    status: int  # GOOD, BAD or SKIP (the verdict's exit status)
    reason: str  # the first failure (bad), why it could not be tested (skip), or ""
    run_dir: str | None  # the run directory of its verdict run (None: no run reached one)
    build_seconds: float
    test_seconds: float
    built: bool  # False: the kernel was already registered (a cache hit)
    ccache_hits: int = 0
    ccache_misses: int = 0

    @property
    def verdict(self) -> str:
        return VERDICT_WORDS[self.status]


@dataclass(frozen=True)
class Outcome:
    """The end of a bisection: the first bad commit, or (when skipped
    commits hide it) the commits it may be."""

    first_bad: str | None
    subject: str
    tested: tuple[Tested, ...]
    suspects: tuple[str, ...] = ()  # when first_bad is None
    seconds: float = 0.0
    removed: tuple[str, ...] = field(default=())  # candidates unregistered at the end

    @property
    def exit_status(self) -> int:
        """0 found; 125 only skipped commits left; 1 the bad end holds."""
        if self.first_bad:
            return 0
        return SKIP if self.suspects else BAD

    def run_of(self, commit: str | None) -> Tested | None:
        return next((t for t in self.tested if t.commit == commit), None)


def result_lines(outcome: Outcome) -> list[str]:
    """What the bisection ends with: the first bad commit, its report and
    why it is bad; or the commits it may be."""
    if outcome.first_bad is None and not outcome.suspects:
        end = outcome.tested[-1]
        return [f"the bad end {end.commit[:12]} {end.subject} is {end.verdict} under this "
                "scenario, so there is no first bad commit between --good and --bad"
                + (f": {end.reason}" if end.reason else "")]
    if outcome.first_bad is None:
        suspects = ", ".join(c[:12] for c in outcome.suspects)
        return ["only skipped commits are left to test; the first bad commit could be any of: "
                + suspects]
    run = outcome.run_of(outcome.first_bad)
    lines = [f"first bad commit: {outcome.first_bad} {outcome.subject}"]
    if run is not None and run.run_dir:
        lines.append(f"  report: {Path(run.run_dir) / 'report.html'} (violations: "
                     f"{Path(run.run_dir) / 'violations.parquet'})")
    if run is not None and run.reason:
        lines.append(f"  why: {run.reason}")
    lines.append("  " + cost_line(outcome.tested, outcome.seconds))
    return lines


def cost_line(tested: Sequence[Tested], seconds: float) -> str:
    """What the bisection cost: candidates, builds, boots, time, ccache."""
    builds = sum(t.built for t in tested)
    boots = sum(t.run_dir is not None or t.status == BAD for t in tested)
    hits = sum(t.ccache_hits for t in tested)
    compiled = hits + sum(t.ccache_misses for t in tested)
    text = (f"{len(tested)} candidate(s) tested ({builds} built, {boots} booted) in "
            f"{seconds:.0f} s: builds {sum(t.build_seconds for t in tested):.0f} s, "
            f"tests {sum(t.test_seconds for t in tested):.0f} s")
    if compiled:
        text += f"; ccache {hits} of {compiled} compilations hits ({100 * hits / compiled:.0f}%)"
    return text


# ---------------------------------------------------------------- git (I/O)


def _git(tree: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True,
                          check=False)


def _rev_list(tree: Path, *args: str) -> str:
    """``git rev-list`` output; a failure is the lab's, not an empty answer."""
    proc = _git(tree, "rev-list", *args)
    if proc.returncode != 0:
        raise LabFailure(f"`git rev-list {' '.join(args)}` in {tree} failed: "
                         f"{proc.stderr.strip()[-300:]}")
    return proc.stdout


def _in_range(tree: Path, bad: str, goods: Sequence[str]) -> list[str]:
    return _rev_list(tree, bad, "--not", *goods).split()


def _ranked(tree: Path, bad: str, goods: Sequence[str]) -> list[tuple[str, int]]:
    return parse_bisect_all(_rev_list(tree, "--bisect-all", bad, "--not", *goods).splitlines())


def _subject(tree: Path, commit: str) -> str:
    return _git(tree, "log", "-1", "--format=%s", commit).stdout.strip()


def _check_inputs(tree: Path, good: Sequence[str], bad: str) -> tuple[list[str], str]:
    """The good commits and the bad one, resolved.

    :raises UserError: not a git kernel tree, a revision that names no
        commit, or a good commit that is not an ancestor of the bad one."""
    from .build import is_kernel_tree, resolve_commit

    if not tree.is_dir():
        raise UserError(f"--tree {tree}: no such directory")
    if not (tree / ".git").exists():
        raise UserError(f"--tree {tree}: not a git repository (bisect needs the history: "
                        "give the root of a git checkout)")
    if not is_kernel_tree(tree):
        raise UserError(f"--tree {tree}: not a kernel tree (no Makefile, Kconfig and "
                        "scripts/kconfig/merge_config.sh)")
    if not good:
        raise UserError("--good: name at least one commit the scenario holds on")
    if not shutil.which("make"):  # else every candidate would be skipped as unbuildable
        raise UserError("`make` is not installed: run scripts/setup.sh")

    def commit_of(option: str, rev: str) -> str:
        try:
            return resolve_commit(tree, rev)
        except UserError as exc:
            raise UserError(f"{option} {exc}") from None

    bad_commit = commit_of("--bad", bad)
    goods = []
    for rev in good:
        commit = commit_of("--good", rev)
        if commit == bad_commit:
            raise UserError(f"--good {rev} and --bad {bad} are the same commit: "
                            "nothing to bisect")
        if _git(tree, "merge-base", "--is-ancestor", commit, bad_commit).returncode != 0:
            raise UserError(f"--good {rev} ({commit[:12]}) is not an ancestor of --bad {bad} "
                            f"({bad_commit[:12]}): give a good commit older than the bad one")
        goods.append(commit)
    return goods, bad_commit


# ---------------------------------------------------------------- one candidate


def _judge(tree: Path, commit: str, subject: str, scenario: Path, kernel_args: Sequence[str],
           run_dir: Path, say: Say, progress) -> tuple[Tested, str | None]:
    """Build *commit*, run *scenario* on it under the verdict's rules and
    write its run directory; returns the result and the name it registered
    (None: it was registered before)."""
    from .build import BuildError, build_kernel, built_dir, read_manifest
    from .experiment import run_experiment, verdict, write_experiment

    name = candidate_name(commit)
    before = read_manifest(built_dir(name))
    started = time.monotonic()
    try:
        build_kernel(tree, name=name, rev=commit, say=say, progress=progress)
    except (BuildError, UserError) as exc:  # this commit does not build with the lab's config
        reason = f"the kernel could not be built: {(str(exc).splitlines() or ['?'])[0]}"
        return (Tested(commit, subject, SKIP, reason, None, time.monotonic() - started, 0.0,
                       True), None)
    built_s = time.monotonic() - started
    m = read_manifest(built_dir(name)) or {}
    fresh = before is None or before.get("built_at") != m.get("built_at")
    ccache = m.get("ccache", {}) if fresh else {}
    registered = name if before is None else None
    tested = time.monotonic()
    status, reason, written = GOOD, "", None
    try:
        exp = verdict(lambda: run_experiment(scenario, [name], say=lambda *_: None,
                                             progress=progress, cold=True,
                                             kernel_args=kernel_args))
    except Untestable as exc:
        status, reason = SKIP, str(exc)
    except VerdictFailed as exc:  # the scenario crashed the kernel
        status, reason = BAD, str(exc)
    else:
        write_experiment(exp, run_dir)
        written = str(run_dir)
        if exp.failures:
            more = len(exp.failures) - 1
            status = BAD
            reason = exp.failures[0] + (f" (and {more} more)" if more else "")
    return (Tested(commit, subject, status, reason, written, built_s,
                   time.monotonic() - tested, fresh, int(ccache.get("hits", 0)),
                   int(ccache.get("misses", 0))), registered)


# ---------------------------------------------------------------- the loop


Judge = Callable[[str, str], Tested]  # (commit, subject) -> its verdict


def search(tree: Path, goods: Sequence[str], bad: str, judge: Judge, *,
           say: Say = print) -> tuple[str | None, tuple[str, ...], list[Tested]]:
    """Bisect *tree* between *goods* and *bad* (full hashes), asking *judge*
    for each candidate: (first bad commit or None, the commits it may be
    when only skipped ones are left, every candidate judged in order). The
    first bad commit is judged too when it was not a candidate (the --bad
    end), for its report and reason; if it then holds, there is no first
    bad commit (None and no suspects). A --bad end that cannot be tested is
    taken as bad, as git bisect takes the user's word for it."""
    goods = list(goods)
    skipped: list[str] = []
    tested: list[Tested] = []
    while True:
        in_range = _in_range(tree, bad, goods)
        if in_range == [bad]:
            break
        candidate = next_candidate(_ranked(tree, bad, goods), bad, skipped)
        if candidate is None:
            suspects = tuple(c for c in in_range if c in skipped and c != bad) + (bad,)
            return None, suspects, tested
        subject = _subject(tree, candidate)
        left = len(in_range) - len([c for c in in_range if c in skipped])
        say(progress_line(len(tested) + 1, len(tested) + 1 + estimate_steps(left), candidate,
                          subject, left))
        result = judge(candidate, subject)
        tested.append(result)
        say(f"  {candidate[:12]} is {result.verdict}"
            + (f": {result.reason}" if result.reason else "")
            + f" (build {result.build_seconds:.0f} s, test {result.test_seconds:.0f} s)")
        if result.status == GOOD:
            goods.append(candidate)
        elif result.status == BAD:
            bad = candidate
        else:
            skipped.append(candidate)
    if not any(t.commit == bad for t in tested):
        subject = _subject(tree, bad)
        say(f"judging {bad[:12]} {subject} (the bad end, for its report)")
        result = judge(bad, subject)
        tested.append(result)
        if result.status == GOOD:  # the bad end holds: nothing to find
            return None, (), tested
    return bad, (), tested


def bisect(tree: Path | str, good: Sequence[str], bad: str, scenario: Path | str, *,
           out: Path | str | None = None, kernel_args: Sequence[str] = (),
           keep_kernels: bool = False, say: Say = print, build_say: Say | None = None,
           progress=None) -> Outcome:
    """Find the first commit of *tree* between *good* and *bad* whose kernel
    fails *scenario*'s verdict (see the module's docstring). Run
    directories go to *out*/<commit>/ (default: ``bisect-<scenario>`` in
    the current directory), with ``bisect.json`` (every candidate and the
    outcome) beside them.

    :raises UserError: bad tree, revision or scenario (before anything is
        built or written)."""
    from .build import built_dir, read_manifest, remove_built
    from .cache import cache_root
    from .scenario import load_scenario
    from .warm import prune

    tree = Path(tree).expanduser().resolve()
    goods, bad_commit = _check_inputs(tree, good, bad)
    scenario_path = Path(scenario)
    loaded = load_scenario(scenario_path)  # a bad scenario is bad input, before any build
    out_dir = Path(out) if out else Path.cwd() / f"bisect-{loaded.name}"
    started = time.monotonic()
    registered: list[str] = []
    removed: list[str] = []

    def judge(commit: str, subject: str) -> Tested:
        # claimed before the build: a signal while the new candidate boots
        # or runs must still find it here and remove it
        name = candidate_name(commit)
        if read_manifest(built_dir(name)) is None and name not in registered:
            registered.append(name)
        result, _ = _judge(tree, commit, subject, scenario_path, kernel_args,
                           out_dir / commit[:12], build_say or say, progress)
        return result

    try:
        first_bad, suspects, tested = search(tree, goods, bad_commit, judge, say=say)
    finally:
        if not keep_kernels:
            for name in registered:
                if remove_built(name):  # 0: never built (the build failed or was stopped)
                    removed.append(name)
                prune(cache_root() / "warm", name, keep=0, unused_for=0)
    outcome = Outcome(first_bad, _subject(tree, first_bad) if first_bad else "", tuple(tested),
                      suspects, time.monotonic() - started, tuple(removed))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bisect.json").write_text(json.dumps({
        "tree": str(tree), "scenario": str(scenario_path), "kernel_args": list(kernel_args),
        "first_bad": outcome.first_bad, "subject": outcome.subject,
        "suspects": list(outcome.suspects), "seconds": round(outcome.seconds, 1),
        "removed": list(outcome.removed),
        "tested": [asdict(t) | {"verdict": t.verdict} for t in outcome.tested]},
        indent=2) + "\n")
    return outcome
