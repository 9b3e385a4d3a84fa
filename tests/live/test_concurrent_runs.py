"""Runs side by side share one cache without trampling each other: four runs
started at once on a cold guest-image/agent/NVDIMM cache all succeed, the
shared entries are made once, and the cache ends as one run leaves it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from lab.cache import cache_root
from lab.vm import RUN_PREFIX, run_parent

pytestmark = pytest.mark.live

ROOT = Path(__file__).resolve().parents[2]
SCENARIO = ROOT / "scenarios" / "fault-4k.toml"
# What runs only read and a fresh cache may borrow from the real one, so that
# nothing is downloaded: the kernels and what fetched them.
BORROWED = ("kernels", "apt", "debs")


def _fresh_cache(root: Path) -> Path:
    root.mkdir()
    for name in BORROWED:
        if (cache_root() / name).exists():
            (root / name).symlink_to(cache_root() / name)
    return root


def _start_runs(cache: Path, outs: list[Path]) -> list[subprocess.Popen]:
    env = {**os.environ, "DEVDAX_LAB_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    # --cold: warm states are made by the first run of a plan, not by these.
    return [subprocess.Popen([sys.executable, "-m", "lab.cli", "run", str(SCENARIO), "--kernel",
                              "after", "--out", str(out), "--cold"],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
            for out in outs]


def _finish(runs: list[subprocess.Popen], timeout: float = 600) -> list[tuple[int, str]]:
    """Each run's exit status and output; a run still going is killed (and
    with it its QEMU, through pdeathsig) so nothing is left behind."""
    results = []
    try:
        for run in runs:
            out, err = run.communicate(timeout=timeout)
            results.append((run.returncode, out + err))
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
                run.wait()
    return results


def _listing(cache: Path) -> list[str]:
    """Every path in *cache* but the borrowed directories, relative to it."""
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*")
                  if p.relative_to(cache).parts[0] not in BORROWED)


def _qemus_using(cache: Path) -> list[int]:
    """QEMU processes whose command line names *cache* (its guest image)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "qemu-system" in cmd and str(cache) in cmd:
            found.append(int(proc.name))
    return found


def _run_dirs_of(pids: set[int]) -> list[Path]:
    left = []
    for d in run_parent().glob(RUN_PREFIX + "*"):
        try:
            if int((d / "owner.pid").read_text()) in pids:
                left.append(d)
        except (OSError, ValueError):
            continue
    return left


def test_four_runs_at_once_on_a_cold_cache_match_one_run(tmp_path):
    one = _fresh_cache(tmp_path / "one-cache")
    [(status, err)] = _finish(_start_runs(one, [tmp_path / "single"]))
    assert status == 0, err

    four = _fresh_cache(tmp_path / "four-cache")
    outs = [tmp_path / f"run{i}" for i in range(4)]
    runs = _start_runs(four, outs)
    pids = {run.pid for run in runs}
    results = _finish(runs)
    for i, (status, err) in enumerate(results):
        assert status == 0, f"run {i} failed:\n{err}"
    assert not _qemus_using(four) and not _qemus_using(one), "QEMU left behind"
    assert not _run_dirs_of(pids), "run directories left behind"

    errs = "".join(err for _, err in results)
    assert errs.count("devdax-lab: preparing NVDIMM labels") == 1, errs  # made once, found by the rest
    listing = _listing(four)
    assert listing == _listing(one)
    assert not [p for p in listing if ".partial-" in p or ".old-" in p]
    for kind in ("agent", "images", "nvdimm"):
        entries = [p for p in listing if p.startswith(kind + "/") and p.count("/") == 1
                   and not Path(p).name.startswith(".") and not p.endswith(".log")]
        assert len(entries) == 1, (kind, listing)

    single = pd.read_parquet(tmp_path / "single" / "timeline.parquet")
    for out in outs:
        timeline = pd.read_parquet(out / "timeline.parquet")
        assert timeline[["step", "action", "refcount", "mapcount"]].equals(
            single[["step", "action", "refcount", "mapcount"]]), out
