"""A kernel built from source with kernel/devdax-lab.config: Debian's
linux-source-6.12 (installed by scripts/setup.sh, unpacked once into the
cache) built with `devdax-lab kernel build`, booted, and run through
fault-4k next to the prebuilt `before` (Debian's 6.12 binary): the same
source, so the same behaviour (devmap + special PTEs, refcount and mapcount
untouched by the fault). A second build of the same inputs is a cache hit."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from lab import build, kernels
from lab.experiment import run_experiment
from lab.session import Session

pytestmark = pytest.mark.live

ROOT = Path(__file__).resolve().parents[2]
NAME = "linux-source-6.12"  # the default name: the tree's directory name
COLUMNS = ["refcount", "mapcount", "pt_level", "pt_present", "pt_write", "pt_dirty",
           "pt_special", "pt_devmap"]


def _kernel_build(tree: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lab.cli", "kernel", "build", "--tree", str(tree)],
                          capture_output=True, text=True, timeout=3600, cwd=ROOT, check=False)


@pytest.fixture(scope="module")
def tree():
    return build.debian_source_tree(say=lambda *_: None)


@pytest.fixture(scope="module")
def built(tree):
    proc = _kernel_build(tree)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"use --kernel {NAME}" in proc.stdout
    return kernels.resolve(NAME, fetch=False)


def test_registered_with_a_manifest(built, tree):
    assert built.modules == () and built.vmlinux.stat().st_size > 50_000_000
    assert built.release.startswith("6.12.")
    st = kernels.status(NAME)
    assert st.state == "cached" and st.source == "built" and str(tree) in st.description
    assert NAME in kernels.known_kernels()
    config = build.parse_config((built.root / "config").read_text())
    assert config["CONFIG_DEBUG_INFO_DWARF5"] == "y" and config.get("CONFIG_MODULES") == "n"


def test_second_build_is_a_cache_hit(built, tree):
    t = time.monotonic()
    proc = _kernel_build(tree)
    elapsed = time.monotonic() - t
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "cached" in proc.stderr and elapsed < 10, (elapsed, proc.stderr)


def test_boots_with_drgn(built):
    with Session.boot(NAME, say=lambda *_: None) as s:
        assert s.vm.release == built.release
        assert s.vm.time_to_ready < 30
        assert [d["name"] for d in s.vm.devices]
        assert s.prog["init_task"].comm.string_().decode() == "swapper/0"


def test_fault_4k_as_on_before(built):
    exp = run_experiment(ROOT / "scenarios" / "fault-4k.toml", ["before", NAME],
                         say=lambda *_: None)
    t = exp.frames["timeline"]
    keys = ["step", "proc", "page"]

    def rows(kernel):
        return (t[t["kernel"] == kernel].sort_values(keys, na_position="first")
                .reset_index(drop=True)[keys + COLUMNS])

    mine, before = rows(NAME), rows("before")
    assert len(mine) == len(before) > 0
    pd.testing.assert_frame_equal(mine, before, check_dtype=False)
    for page in (0, 1, 4, 5):
        def at(step, proc, page=page):
            r = mine[(mine["step"] == step) & (mine["page"] == page)]
            r = r[r["proc"].isna()] if proc is None else r[r["proc"] == proc]
            assert len(r) == 1
            return r.iloc[0]

        start, faulted = at(0, None), at(2, "a")
        assert faulted["pt_level"] == "PTE" and faulted["pt_special"] and faulted["pt_devmap"]
        assert (faulted["refcount"], faulted["mapcount"]) == (start["refcount"], start["mapcount"])
    assert not exp.violations
