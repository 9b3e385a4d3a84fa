"""tests/conftest.py's CI rule, on a made-up test directory run by a real
pytest: a skip (in a test, a fixture, a skipif, or a whole module) is a skip
locally and a failure, with its reason, when CI is set."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"

TESTS = {
    "test_a.py": '''
import pytest

@pytest.fixture
def tool():
    pytest.skip("frobnicator is not installed")

def test_needs_tool(tool):
    pass

def test_skips_itself():
    pytest.skip("no dpkg to cross-check")

@pytest.mark.skipif(True, reason="no qemu-system-x86_64")
def test_marked():
    pass

@pytest.mark.xfail(reason="known bug", strict=True)
def test_expected_failure():
    assert False

def test_passes():
    pass
''',
    "test_b.py": '''
import pytest
pytest.importorskip("no_such_module_here", reason="no_such_module_here is missing")

def test_never_collected():
    pass
''',
}


def _run(tmp_path: Path, ci: str | None, *files: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
         *(files or [str(tmp_path)])],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120, check=False)


@pytest.fixture
def suite(tmp_path):
    shutil.copy(CONFTEST, tmp_path / "conftest.py")
    for name, text in TESTS.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # not this repository's options
    return tmp_path


def test_locally_a_missing_tool_skips_with_its_reason(suite):
    proc = _run(suite, None)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed, 4 skipped, 1 xfailed" in proc.stdout, proc.stdout
    assert "frobnicator is not installed" in proc.stdout


@pytest.mark.parametrize("value", ["1", "true"])
def test_under_ci_every_skip_fails_naming_the_reason(suite, value):
    proc = _run(suite, value, "test_a.py")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout
    # a skip in setup (a fixture, a skipif) fails as an error of the setup
    assert out.splitlines()[-1].startswith("1 failed, 1 passed, 1 xfailed, 2 errors"), out
    for reason in ("frobnicator is not installed", "no dpkg to cross-check", "no qemu-system-x86_64"):
        assert f"but CI='{value}' runs every test: {reason}" in out, (reason, out)


def test_under_ci_a_module_that_would_skip_is_a_collection_error(suite):
    proc = _run(suite, "1", "test_b.py")
    assert proc.returncode == 2, proc.stdout + proc.stderr  # pytest's "interrupted"
    assert "ERROR test_b.py - would skip, but CI='1' runs every test: no_such_module_here is missing" \
        in proc.stdout, proc.stdout


def test_ci_set_to_false_is_not_ci(suite):
    assert _run(suite, "false").returncode == 0
