"""lab.bisect without kernels: git's ranking parsed, the next candidate
chosen from good/bad/skip sets, git's own step estimate, the messages, the
search loop over a small real git history with a judge that knows the
answer, and bad input (one line, exit 2, nothing left behind)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lab import bisect as bs

ROOT = Path(__file__).resolve().parents[2]
SCENARIO = ROOT / "scenarios" / "pin-longterm.toml"


def _git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@localhost"}
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                          check=True, env=env).stdout.strip()


def _history(repo: Path, n: int, kernel_tree: bool = False) -> list[str]:
    """A repository of *n* commits (the oldest first); with *kernel_tree*,
    the files that make it look like a Linux tree to the lab."""
    repo.mkdir()
    _git(repo, "init", "-q")
    if kernel_tree:
        (repo / "scripts" / "kconfig").mkdir(parents=True)
        for rel in ("Makefile", "Kconfig", "scripts/kconfig/merge_config.sh"):
            (repo / rel).write_text("# not a real kernel\n")
        _git(repo, "add", ".")
    for i in range(n):
        _git(repo, "commit", "-q", "--allow-empty", "-m", f"commit {i}")
    return _git(repo, "rev-list", "--reverse", "HEAD").split()


def _tested(commit: str, status: int) -> bs.Tested:
    return bs.Tested(commit, "s", status, "", None, 0.0, 0.0, True)


def test_parse_bisect_all_keeps_gits_order_and_decorations():
    lines = ["1bdd0e98e63fb3d1419fe2768d51c56c6f7bfaa8 (dist=2)",
             "922ddc5db60973e9700b965a41a9668dbef1947d (dist=2)",
             "6a299fb4576442ba8e01b4b3a234a9a2c3aeb0cd (HEAD -> master, dist=0)",
             "", "warning: something"]
    assert bs.parse_bisect_all(lines) == [
        ("1bdd0e98e63fb3d1419fe2768d51c56c6f7bfaa8", 2),
        ("922ddc5db60973e9700b965a41a9668dbef1947d", 2),
        ("6a299fb4576442ba8e01b4b3a234a9a2c3aeb0cd", 0)]


def test_next_candidate_is_the_best_not_skipped_nor_bad():
    ranked = [("c3", 2), ("c4", 2), ("c2", 1), ("c5", 1), ("c6", 0)]
    assert bs.next_candidate(ranked, "c6", []) == "c3"
    assert bs.next_candidate(ranked, "c6", ["c3"]) == "c4"
    assert bs.next_candidate(ranked, "c6", ["c3", "c4", "c2", "c5"]) is None
    assert bs.next_candidate([("c6", 0)], "c6", []) is None


def test_estimate_steps_is_the_one_git_prints(tmp_path):
    """Independent truth: git's own --bisect-vars for the same number of
    commits."""
    commits = _history(tmp_path / "r", 40)
    for count in (1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 17, 24, 33, 39):
        good = commits[-count - 1]
        out = _git(tmp_path / "r", "rev-list", "--bisect-vars", "HEAD", "--not", good)
        fields = dict(line.split("=", 1) for line in out.splitlines())
        assert int(fields["bisect_all"]) == count
        assert bs.estimate_steps(count) == int(fields["bisect_steps"]), count


def test_search_finds_the_first_bad_commit_with_gits_ranking(tmp_path):
    commits = _history(tmp_path / "r", 12)
    for first_bad in range(1, 12):
        judged: list[str] = []

        def judge(commit, subject, first_bad=first_bad, judged=judged):
            judged.append(commit)
            return _tested(commit, bs.BAD if commits.index(commit) >= first_bad else bs.GOOD)

        found, suspects, tested = bs.search(tmp_path / "r", [commits[0]], commits[-1], judge,
                                            say=lambda *_: None)
        assert found == commits[first_bad] and suspects == ()
        assert len(set(judged)) == len(judged) <= 5  # log2(11) + the bad end at most
        assert [t.commit for t in tested] == judged


def test_search_steps_around_a_skipped_commit_and_says_when_it_cannot_tell(tmp_path):
    commits = _history(tmp_path / "r", 8)
    # git's best split does not build; the first bad commit is two after it
    best = bs.parse_bisect_all(_git(tmp_path / "r", "rev-list", "--bisect-all", commits[-1],
                                    "--not", commits[0]).splitlines())[0][0]
    k = commits.index(best)

    def judge(commit, subject):
        i = commits.index(commit)
        return _tested(commit, bs.SKIP if i == k else bs.BAD if i >= k + 2 else bs.GOOD)

    lines: list[str] = []
    found, suspects, tested = bs.search(tmp_path / "r", [commits[0]], commits[-1], judge,
                                        say=lines.append)
    assert found == commits[k + 2] and suspects == ()
    assert lines[0].startswith(f"candidate 1 of ~3: {best[:12]} ")
    assert tested[0].commit == best and tested[0].verdict == "skip"

    def untestable_before_bad(commit, subject):  # the first bad hides behind skips
        i = commits.index(commit)
        return _tested(commit, bs.SKIP if i in (4, 5) else bs.BAD if i >= 5 else bs.GOOD)

    found, suspects, tested = bs.search(tmp_path / "r", [commits[0]], commits[-1],
                                        untestable_before_bad, say=lambda *_: None)
    assert found is None and set(suspects) == {commits[4], commits[5], commits[6]}
    outcome = bs.Outcome(None, "", tuple(tested), suspects)
    assert outcome.exit_status == 125
    [line] = bs.result_lines(outcome)
    assert "only skipped commits are left" in line and commits[5][:12] in line


def test_search_judges_the_bad_end_when_it_is_the_first_bad_commit(tmp_path):
    commits = _history(tmp_path / "r", 3)
    judged = []

    def judge(commit, subject):
        judged.append(commit)
        return _tested(commit, bs.BAD if commit == commits[-1] else bs.GOOD)

    found, _, tested = bs.search(tmp_path / "r", [commits[0]], commits[-1], judge,
                                 say=lambda *_: None)
    assert found == commits[-1] and judged == [commits[1], commits[2]]
    assert [t.verdict for t in tested] == ["good", "bad"]


def test_result_lines_name_the_commit_its_report_and_why():
    run = bs.Tested("ab" * 20, "mm/gup: oops", bs.BAD, "refs at step 5: refcount 2", "/o/abab",
                    30.0, 4.0, True, 110, 9)
    lines = bs.result_lines(bs.Outcome("ab" * 20, "mm/gup: oops", (run,), seconds=75))
    assert lines[0] == f"first bad commit: {'ab' * 20} mm/gup: oops"
    assert lines[1] == "  report: /o/abab/report.html (violations: /o/abab/violations.parquet)"
    assert lines[2] == "  why: refs at step 5: refcount 2"
    assert lines[3] == ("  1 candidate(s) tested (1 built, 1 booted) in 75 s: builds 30 s, "
                        "tests 4 s; ccache 110 of 119 compilations hits (92%)")
    assert bs.progress_line(2, 3, "cd" * 20, "subj", 1) == \
        f"candidate 2 of ~3: {'cd' * 6} subj (1 commit left to bisect)"
    assert bs.candidate_name("0123456789abcdef") == "bisect-0123456789ab"


# ---------------------------------------------------------------- bad input


def _bisect(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DEVDAX_LAB_CACHE": str(cwd / "cache"),
           "TMPDIR": str(cwd / "tmp")}
    (cwd / "tmp").mkdir(exist_ok=True)
    return subprocess.run([sys.executable, "-m", "lab.cli", "bisect", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture
def kernel_repo(tmp_path):
    return tmp_path / "linux", _history(tmp_path / "linux", 4, kernel_tree=True)


def _cases(repo: Path, commits: list[str], tmp: Path):
    plain = tmp / "plain"
    plain.mkdir()
    (plain / "Makefile").write_text("")
    s = str(SCENARIO)
    return [
        (["--tree", str(tmp / "none"), "--good", "a", "--bad", "b", s], "no such directory"),
        (["--tree", str(plain), "--good", "a", "--bad", "b", s], "not a git repository"),
        (["--tree", str(repo), "--good", "v0.0-nope", "--bad", commits[-1], s],
         "--good 'v0.0-nope' is not a commit of"),
        (["--tree", str(repo), "--good", commits[0], "--bad", "nope", s],
         "--bad 'nope' is not a commit of"),
        (["--tree", str(repo), "--good", commits[-1], "--bad", commits[0], s],
         "is not an ancestor of --bad"),
        (["--tree", str(repo), "--good", commits[1], "--bad", commits[1], s],
         "are the same commit"),
        (["--tree", str(repo), "--good", commits[0], "--bad", commits[-1],
          str(tmp / "no-such.toml")], "cannot read the scenario"),
    ]


def test_bad_input_is_one_line_exit_2_and_leaves_nothing(kernel_repo, tmp_path):
    repo, commits = kernel_repo
    worktrees = _git(repo, "worktree", "list", "--porcelain")
    refs = _git(repo, "for-each-ref")
    for args, said in _cases(repo, commits, tmp_path):
        proc = _bisect(tmp_path, *args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stdout == "" and len(proc.stderr.splitlines()) == 1, proc.stderr
        assert proc.stderr.startswith("devdax-lab: ") and said in proc.stderr, proc.stderr
        # nothing left behind: no worktree, no ref, no kernel, no run or temp directory
        assert _git(repo, "worktree", "list", "--porcelain") == worktrees
        assert _git(repo, "for-each-ref") == refs
        assert not (repo / ".git" / "BISECT_LOG").exists()
        cache = tmp_path / "cache"
        assert not (cache / "built").exists() and not (cache / "build").exists()
        assert list((tmp_path / "tmp").iterdir()) == []
        assert not list(tmp_path.glob("bisect-*"))


def test_a_bad_end_that_holds_means_there_is_no_first_bad_commit(tmp_path):
    commits = _history(tmp_path / "r", 3)
    found, suspects, tested = bs.search(tmp_path / "r", [commits[0]], commits[-1],
                                        lambda c, s: _tested(c, bs.GOOD), say=lambda *_: None)
    assert found is None and suspects == () and [t.commit for t in tested] == commits[1:]
    outcome = bs.Outcome(None, "", tuple(tested))
    assert outcome.exit_status == 1
    [line] = bs.result_lines(outcome)
    assert line.startswith(f"the bad end {commits[-1][:12]} s is good under this scenario")



def test_kernel_args_reach_the_boot_plan(monkeypatch):
    """bisect --kernel-args -> run_experiment -> Session.boot/plan -> the
    plan's cmdline_extra (what lab.vm.kernel_cmdline appends)."""
    from lab import session

    seen = {}
    monkeypatch.setattr(session, "boot_spec", lambda kernel, **kw: seen.update(kw))
    session.Session.plan("before", kernel_args=("init_on_free=1", "foo=bar"))
    assert seen["cmdline_extra"] == ("init_on_free=1", "foo=bar")
