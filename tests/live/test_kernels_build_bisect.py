"""`devdax-lab bisect` names the commit that planted a counting bug.

The history: five commits made by this test on top of Debian's
linux-source-6.12 (the git repository of it that test_kernels_build makes
and caches). They are written with ``git commit-tree`` and a temporary index
under ``refs/devdax-lab-test/bisect``: the repository's branches, HEAD,
index and files stay as they are. Their dates are fixed, so the commits (and
the kernels built from them) are the same on every run. One of them makes
``gup_put_folio()`` give back one reference too few when a pin of a
ZONE_DEVICE folio is released; scenarios/pin-longterm.toml's expectation
"unpin gives the bias back" (refcount 1 at step 5) and the no-leak invariant
catch it.

The repository is the one the CI kernel build used (this file is named to
run after test_kernels_build.py), so bisect builds in the same worktree and
object directory (``build.work_dir``): a candidate recompiles the few files
that differ (ccache has the rest) and relinks. Measured here: three
candidates, 62 s in all, ccache 337 of 349 compilations hits.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from lab import build, kernels
from lab.cache import cache_root

pytestmark = pytest.mark.live

ROOT = Path(__file__).resolve().parents[2]
REF = "refs/devdax-lab-test/bisect"
SCENARIO = ROOT / "scenarios" / "pin-longterm.toml"
# the planted bug: an order-0 pin of a ZONE_DEVICE folio gives back one
# reference less than it took (GUP_PIN_COUNTING_BIAS)
BUGGY = ("\t\telse\n\t\t\trefs *= GUP_PIN_COUNTING_BIAS;\n",
         "\t\telse\n\t\t\trefs = refs * GUP_PIN_COUNTING_BIAS - folio_is_zone_device(folio);\n")
HISTORY = [  # (subject, file, old, new); the third plants the bug
    ("Documentation/mm: say where device-dax pins are counted", "Documentation/mm/index.rst",
     None, "\n.. device-dax pins: see mm/gup.c\n"),
    ("mm/gup: say why an order-0 pin counts GUP_PIN_COUNTING_BIAS", "mm/gup.c",
     "static void gup_put_folio(struct folio *folio, int refs, unsigned int flags)\n{\n",
     ("/* an order-0 folio has no _pincount: its pins live in the refcount */\n"
      "static void gup_put_folio(struct folio *folio, int refs, unsigned int flags)\n{\n")),
    ("mm/gup: release ZONE_DEVICE pins through the same path", "mm/gup.c", *BUGGY),
    ("device-dax: say which probe runs the device", "drivers/dax/device.c",
     "\trun_dax(dax_dev);\n", "\t/* the device is live from here */\n\trun_dax(dax_dev);\n"),
    ("Documentation/mm: a second note", "Documentation/mm/index.rst",
     None, "\n.. and a second one\n"),
]
PLANTED = 2


def _git(repo: Path, *args: str, env: dict | None = None, input: str | None = None) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "gc.auto=0", *args], capture_output=True,
                          text=True, check=True, env=env, input=input).stdout.strip()


def plant_history(repo: Path) -> list[str]:
    """The commits of HISTORY on top of *repo*'s HEAD (made once: the same
    hashes every time), the base first; the tip is kept under REF."""
    base = _git(repo, "rev-parse", "HEAD")
    commits = [base]
    with tempfile.TemporaryDirectory(prefix="devdax-lab-test-index-") as tmp:
        env = {**os.environ, "GIT_INDEX_FILE": str(Path(tmp) / "index"),
               "GIT_AUTHOR_NAME": "devdax-lab", "GIT_AUTHOR_EMAIL": "devdax-lab@localhost",
               "GIT_COMMITTER_NAME": "devdax-lab", "GIT_COMMITTER_EMAIL": "devdax-lab@localhost",
               "GIT_AUTHOR_DATE": "2026-01-01T00:00:00Z",
               "GIT_COMMITTER_DATE": "2026-01-01T00:00:00Z"}
        _git(repo, "read-tree", base, env=env)
        for subject, rel, old, new in HISTORY:
            text = subprocess.run(["git", "-C", str(repo), "show", f"{commits[-1]}:{rel}"],
                                  capture_output=True, text=True, check=True).stdout
            if old is None:
                text += new
            else:
                assert text.count(old) == 1, (rel, old)
                text = text.replace(old, new)
            blob = _git(repo, "hash-object", "-w", "--stdin", input=text, env=env)
            _git(repo, "update-index", "--cacheinfo", f"100644,{blob},{rel}", env=env)
            tree = _git(repo, "write-tree", env=env)
            commits.append(_git(repo, "commit-tree", tree, "-p", commits[-1], "-m", subject,
                                env=env))
    _git(repo, "update-ref", REF, commits[-1])
    return commits


def _state(repo: Path) -> tuple:
    """What bisect must not change in the user's repository: HEAD, its
    branches and tags, status, worktrees, bisection state."""
    git_dir = Path(_git(repo, "rev-parse", "--absolute-git-dir"))
    return (_git(repo, "rev-parse", "HEAD"),
            _git(repo, "for-each-ref", "--format=%(refname) %(objectname)", "refs/heads",
                 "refs/tags", "refs/bisect"),
            _git(repo, "status", "--porcelain"),
            build.worktree_paths(_git(repo, "worktree", "list", "--porcelain")),
            (git_dir / "BISECT_LOG").exists())


@pytest.fixture(scope="module")
def repo():
    return build.debian_source_git(say=lambda *_: None)


def test_bisect_names_the_planted_commit(repo, tmp_path):
    commits = plant_history(repo)
    good, bad, planted = commits[0], commits[-1], commits[1 + PLANTED]
    assert _git(repo, "rev-parse", REF) == bad
    names = {f"bisect-{c[:12]}" for c in commits}
    already = names & set(kernels.known_kernels())
    before = _state(repo)
    out = tmp_path / "out"
    t = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "lab.cli", "-q", "bisect", "--tree", str(repo),
                           "--good", good, "--bad", REF, "--out", str(out), str(SCENARIO)],
                          capture_output=True, text=True, timeout=3600, cwd=ROOT, check=False)
    elapsed = time.monotonic() - t
    print(proc.stdout, proc.stderr[-3000:], sep="\n")
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    subject = HISTORY[PLANTED][0]
    assert f"first bad commit: {planted} {subject}" in lines, proc.stdout
    assert any(line.startswith("devdax-lab: candidate 1 of ~") for line in lines), proc.stdout

    summary = json.loads((out / "bisect.json").read_text())
    assert summary["first_bad"] == planted and summary["suspects"] == []
    tested = {t["commit"]: t for t in summary["tested"]}
    assert tested[planted]["verdict"] == "bad"
    # every verdict is the truth of the history: bad from the planted commit on
    for commit, t in tested.items():
        assert t["verdict"] == ("bad" if commits.index(commit) > PLANTED else "good"), t
    assert 2 <= len(tested) <= 3  # log2 of 5 commits, plus the planted one when it is the end
    # the report of the first bad commit, and the failure the planted bug causes
    run_dir = out / planted[:12]
    assert f"  report: {run_dir / 'report.html'} (violations: {run_dir / 'violations.parquet'})" \
        in lines
    assert (run_dir / "report.html").stat().st_size > 10_000
    assert any(re.match(r"  \d candidate\(s\) tested \(\d built, \d booted\) in \d+ s: ", line)
               for line in lines), proc.stdout
    why = next(line for line in lines if line.startswith("  why: "))
    assert "step 5" in why and "refcount" in why, why
    violations = pd.read_parquet(run_dir / "violations.parquet")
    assert {"refs", "no-leak"} <= set(violations["invariant"]), violations
    good_runs = [t for t in tested.values() if t["verdict"] == "good"]
    assert good_runs and all(
        pd.read_parquet(Path(t["run_dir"]) / "violations.parquet").empty for t in good_runs)

    # the builds reuse the CI build's object directory and ccache
    hits = sum(t["ccache_hits"] for t in tested.values())
    misses = sum(t["ccache_misses"] for t in tested.values())
    builds = sum(t["built"] for t in tested.values())
    print(f"bisect: {len(tested)} candidates, {builds} builds, {elapsed:.0f} s in all; "
          f"build {[round(t['build_seconds']) for t in tested.values()]} s, "
          f"test {[round(t['test_seconds']) for t in tested.values()]} s; "
          f"ccache {hits} hits, {misses} misses")
    if hits + misses:
        assert hits / (hits + misses) > 0.8, (hits, misses)

    # the user's repository is as it was; the lab's worktree is the only one added
    after = _state(repo)
    assert after[:3] == before[:3] and not after[4]
    assert set(after[3]) - set(before[3]) <= {str(build.work_dir(repo) / "src")}
    # the candidates it registered are gone, with their images and warm states
    assert names & set(kernels.known_kernels()) == already
    cache = cache_root()
    for name in names - already:
        assert not list((cache / "images").glob(f"{name}-*"))
        assert not list((cache / "warm").glob(f"{name}-*"))
    assert set(summary["removed"]) == {f"bisect-{c[:12]}" for c in tested} - already


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that mention *text* (a build's make
    or compiler, a QEMU of a candidate)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{proc.name}: {cmdline[:200]}")
    return found


def test_sigterm_mid_bisection_stops_it_and_unregisters_its_candidates(repo, tmp_path):
    """SIGTERM (timeout, a CI runner) once the first candidate is judged,
    while the next one builds: the build is stopped, the candidates this
    bisection registered are removed, and one line says why."""
    commits = plant_history(repo)
    names = {f"bisect-{c[:12]}" for c in commits}
    already = names & set(kernels.known_kernels())
    out = tmp_path / "out"
    log = tmp_path / "stderr.log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "lab.cli", "-q", "bisect", "--tree",
                                 str(repo), "--good", commits[0], "--bad", REF, "--out", str(out),
                                 str(SCENARIO)],
                                stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=ROOT)
    try:
        assert proc.stdout is not None
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("devdax-lab: candidate 2 of"):
                time.sleep(3)  # into the second candidate's build
                proc.send_signal(signal.SIGTERM)
                break
        proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = log.read_text()
    first = re.match(r"devdax-lab: candidate 1 of ~\d+: ([0-9a-f]{12}) ", seen[0])
    assert first and f"bisect-{first[1]}" not in already, seen  # one it registered itself
    assert any(line.startswith("devdax-lab: candidate 2 of") for line in seen), "".join(seen)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "devdax-lab: stopped by SIGTERM" in err, err[-2000:]
    assert names & set(kernels.known_kernels()) == already
    assert not _processes_mentioning(str(build.work_dir(repo)))
    assert not (out / "bisect.json").exists()  # no outcome claimed
