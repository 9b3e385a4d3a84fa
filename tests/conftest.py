"""Shared test machinery: the one Chromium fixture, and the CI rule that a
test never skips there.

Under CI (``CI`` set in the environment, as every CI service does), a test
that would skip fails instead: CI is where every test runs, so a missing
tool (chromium, playwright, qemu, dpkg ...) or file is a broken machine, not
a reason to pass quietly. Locally a skip stays a skip, with its reason.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]


def under_ci() -> bool:
    """Whether this run is CI's: ``CI`` set to anything but empty, 0 or false."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _skip_reason(longrepr) -> str:
    # a skip's longrepr is (file, line, "Skipped: reason")
    text = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return text.removeprefix("Skipped: ")


def _no_skip_under_ci(report) -> None:
    if under_ci() and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = (f"would skip, but CI={os.environ['CI']!r} runs every test: "
                           f"{_skip_reason(report.longrepr)}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A skip in a test's setup or body (``pytest.skip``, ``importorskip``,
    ``skipif``) fails the test under CI."""
    outcome = yield
    _no_skip_under_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """The same for a whole module skipped while collected."""
    outcome = yield
    _no_skip_under_ci(outcome.get_result())


# ---------------------------------------------------------------- Chromium


@pytest.fixture(scope="module")
def chromium():
    """Debian's Chromium driven by Playwright (never a browser Playwright would
    download: there is no network for it here), one per test module; each
    test opens its own pages. Skips locally when either is missing (fails
    under CI)."""
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (.venv/bin/pip install -e .[test])")
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed (scripts/setup.sh installs Debian's chromium)")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()

