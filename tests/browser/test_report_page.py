"""report.html in a real browser: the page ``devdax-lab run``/``compare``
writes, built here from the golden frames of real runs
(tests/golden/timeline/<run>/), opened from disk in Debian's Chromium with the
network cut off. No VM: this runs with the unit tests (``-m "not live"``).
The report's contents are checked as text in tests/unit/test_report.py."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd
import pytest

from lab import report, timeline

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden" / "timeline"
FRAMES = ("timeline", "steps", "device", "device_pages", "complaints")
SHOTS = ROOT / "test-output"
# DEVDAX_LAB_DOCS_IMAGES=1: the top of each report also goes to docs/img/ (the README's)
DOCS_IMG = ROOT / "docs" / "img" if os.environ.get("DEVDAX_LAB_DOCS_IMAGES") else None
README_RUN = "compare-fork-share"


def golden_runs() -> list[Path]:
    return sorted(p for p in GOLDEN.iterdir() if (p / "timeline.parquet").is_file()) \
        if GOLDEN.is_dir() else []


@pytest.fixture(params=golden_runs() or [None], ids=lambda p: p.name if p else "missing")
def report_html(request, tmp_path) -> tuple[str, Path]:
    """(run name, report.html) of one golden run, with the kernels' diff and
    the invariants' violations, as the CLI writes it."""
    if request.param is None:
        pytest.fail(f"no golden frames under {GOLDEN}")
    f = {name: pd.read_parquet(request.param / f"{name}.parquet") for name in FRAMES}
    kernels = list(dict.fromkeys(f["timeline"]["kernel"]))
    diff = timeline.df_diff(f["timeline"]) if len(kernels) > 1 else None
    path = report.build_report(
        tmp_path, title=f"Golden run {request.param.name}", scenario_text=request.param.name,
        meta={"date": "unknown", "scenario": {"name": request.param.name},
              "kernels": {k: {} for k in kernels}, "accelerator": "unknown"},
        timeline=f["timeline"], steps=f["steps"], device=f["device"],
        device_pages=f["device_pages"], complaints=f["complaints"], diff=diff,
        differences=timeline.describe_differences(diff, kernels) if diff is not None else [],
        violations=timeline.check_invariants(f["timeline"], f["steps"]))
    return request.param.name, path


def test_report_renders_offline_in_chromium(chromium, report_html):
    """No console error, no request leaves file://, every figure has drawn
    data; a full-page screenshot goes to test-output/report.png (and
    report-<run>.png)."""
    name, path = report_html
    SHOTS.mkdir(exist_ok=True)
    errors, remote = [], []
    page = chromium.new_page(viewport={"width": 1400, "height": 900})
    try:
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))

        def block(route):
            if route.request.url.startswith(("file:", "data:", "blob:")):
                route.continue_()
            else:
                remote.append(route.request.url)
                route.abort()

        page.route("**/*", block)
        page.goto(path.resolve().as_uri(), wait_until="load")
        page.wait_for_function(
            "Array.from(document.querySelectorAll('.plotly-graph-div'))"
            ".every(el => el._fullData && el._fullLayout)", timeout=20_000)
        drawn = page.evaluate(
            "Array.from(document.querySelectorAll('.plotly-graph-div')).map(el => ({"
            "id: el.id, traces: el._fullData.length, first: el._fullData[0]._length,"
            "svg: el.querySelectorAll('.main-svg').length}))")
        page.screenshot(path=str(SHOTS / "report.png"), full_page=True)
        shutil.copy(SHOTS / "report.png", SHOTS / f"report-{name}.png")
        if DOCS_IMG and name == README_RUN:
            DOCS_IMG.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(DOCS_IMG / "report.png"))
            page.locator("#fig-counts").screenshot(path=str(DOCS_IMG / "report-counts.png"))
    finally:
        page.close()
    assert errors == []
    assert remote == []
    assert len(drawn) == 4
    for fig in drawn:
        assert fig["traces"] > 0, fig
        assert fig["svg"] > 0, fig
    counts = next(d for d in drawn if d["id"] == "fig-counts")
    assert counts["first"] > 0
    assert (SHOTS / "report.png").stat().st_size > 10_000
