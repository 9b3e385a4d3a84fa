"""Unit tests of lab.report on the golden frames recorded from real runs
(tests/golden/timeline/<run>/*.parquet): the output files, and report.html
— one self-contained page that opens offline — checked as text (in a real
browser: tests/browser/test_report_page.py)."""

from __future__ import annotations

import html
import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
from plotly.offline import get_plotlyjs

from lab import report, timeline
from lab.timeline import Violation

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden" / "timeline"
FRAMES = ("timeline", "steps", "device", "device_pages", "complaints")


def golden_runs() -> list[Path]:
    if not GOLDEN.is_dir():
        return []
    return sorted(p for p in GOLDEN.iterdir() if (p / "timeline.parquet").is_file())


@pytest.fixture(scope="module", params=golden_runs() or [None],
                ids=lambda p: p.name if p else "missing")
def golden(request) -> dict:
    if request.param is None:
        pytest.fail(f"no golden frames under {GOLDEN} (timeline.parquet, steps.parquet, ...)")
    frames = {name: pd.read_parquet(request.param / f"{name}.parquet") for name in FRAMES}
    readme = request.param / "README.md"
    return {"dir": request.param, "frames": frames,
            "readme": readme.read_text() if readme.is_file() else ""}


def meta_of(frames: dict[str, pd.DataFrame], run_dir: Path) -> dict:
    """meta as lab.experiment.provenance shapes it, from what the golden run
    says about itself (its meta.json when it has one)."""
    path = run_dir / "meta.json"
    if path.is_file():
        return json.loads(path.read_text())
    t = frames["timeline"]
    kernels = {k: {"release": str(g["kernel_release"].dropna().iloc[0])}
               for k, g in t.groupby("kernel", sort=False)}
    return {"date": "unknown", "scenario": {"name": run_dir.name, "title": run_dir.name},
            "kernels": kernels, "accelerator": "unknown"}


@pytest.fixture(scope="module")
def built(golden, tmp_path_factory) -> dict:
    """report.html of the golden run, with its differences and violations
    (plus one made-up violation message, so the table is always drawn)."""
    f = golden["frames"]
    kernels = list(dict.fromkeys(f["timeline"]["kernel"]))
    diff = timeline.df_diff(f["timeline"]) if len(kernels) > 1 else None
    differences = timeline.describe_differences(diff, kernels) if diff is not None else []
    violations = timeline.check_invariants(f["timeline"], f["steps"])
    step = int(f["steps"]["step"].max())
    extra = Violation("no-leak", kernels[0], step, None, None,
                      "test message <b>with markup</b> & an ampersand")
    meta = meta_of(f, golden["dir"])
    out = tmp_path_factory.mktemp("report")
    scenario_text = golden["readme"] or f"scenario {golden['dir'].name}"
    path = report.build_report(
        out, title=f"Golden run {golden['dir'].name}", scenario_text=scenario_text, meta=meta,
        timeline=f["timeline"], steps=f["steps"], device=f["device"],
        device_pages=f["device_pages"], complaints=f["complaints"], diff=diff,
        differences=differences, violations=[*violations, extra])
    return {"name": golden["dir"].name, "path": path, "html": path.read_text(encoding="utf-8"),
            "diff": diff,
            "differences": differences, "violations": violations, "extra": extra,
            "meta": meta, "frames": f, "kernels": kernels, "scenario_text": scenario_text}


def test_report_file_is_written(built):
    assert built["path"].name == "report.html"
    assert built["path"].is_file()
    assert built["html"].startswith("<!DOCTYPE html>")


def test_plotly_js_is_embedded_once(built):
    doc = built["html"]
    assert doc.count("window.PlotlyConfig") == 1
    head = get_plotlyjs()[:200]
    assert doc.count(head) == 1
    assert doc.count('class="plotly-graph-div"') == 4


def test_no_external_scripts_or_styles(built):
    doc = built["html"]
    assert not re.search(r"<script[^>]*\bsrc\s*=", doc, re.IGNORECASE)
    assert not re.search(r"<link[^>]*\bhref\s*=\s*[\"']?(https?:)?//", doc, re.IGNORECASE)
    for tag in re.findall(r"<script[^>]*>", doc, re.IGNORECASE):
        assert "http://" not in tag and "https://" not in tag


def test_summary_names_kernels_releases_scenario_date_accel(built):
    doc = built["html"]
    summary = doc[doc.index("class='summary'"):doc.index("</dl>")]
    t = built["frames"]["timeline"]
    for k, g in t.groupby("kernel"):
        assert html.escape(k) in summary
        assert html.escape(str(g["kernel_release"].dropna().iloc[0])) in summary
    meta = built["meta"]
    assert html.escape(str(meta["date"])) in summary
    assert html.escape(str(meta.get("accelerator"))) in summary
    assert html.escape(str(meta["scenario"]["name"])) in summary


def test_scenario_text_in_pre(built):
    doc = built["html"]
    assert f"<pre class='scenario'>{html.escape(built['scenario_text'])}</pre>" in doc


def test_differences_are_listed(built):
    doc = built["html"]
    for sentence in built["differences"]:
        assert f"<li>{html.escape(sentence)}</li>" in doc


def test_violations_table_escapes_the_messages(built):
    doc = built["html"]
    section = doc[doc.index("<h2>Invariants</h2>"):doc.index("<h2>Kernel complaints</h2>")]
    assert "test message &lt;b&gt;with markup&lt;/b&gt; &amp; an ampersand" in section
    assert "<b>with markup</b>" not in doc
    for v in built["violations"]:
        assert html.escape(v.message) in section
    assert f"{len(built['violations']) + 1} invariant violation(s)" in section


def test_all_invariants_hold_when_there_are_none(golden, tmp_path):
    f = golden["frames"]
    path = report.build_report(
        tmp_path, title="t", scenario_text="s", meta={}, timeline=f["timeline"], steps=f["steps"],
        device=f["device"], device_pages=f["device_pages"], complaints=f["complaints"].iloc[0:0])
    doc = path.read_text()
    assert "All invariants hold" in doc
    section = doc[doc.index("<h2>Kernel complaints</h2>"):]
    assert "None: no kernel printed" in section[:400]


def test_complaints_table(built):
    doc = built["html"]
    section = doc[doc.index("<h2>Kernel complaints</h2>"):doc.index("<h2>Folio refcount")]
    bad = built["frames"]["complaints"]
    if len(bad):
        for text in bad["text"]:
            assert html.escape(str(text)) in section
    else:
        assert "None: no kernel printed" in section


def test_steps_and_timeline_tables(built):
    doc = built["html"]
    steps = built["frames"]["steps"]
    section = doc[doc.index("<h2>Steps</h2>"):doc.index("<h2>Timeline</h2>")]
    assert section.count("<tr") == len(steps) + 1
    tl_section = doc[doc.index("<h2>Timeline</h2>"):doc.index("<footer>")]
    assert tl_section.count("<tr") == len(built["frames"]["timeline"]) + 1
    assert f"{int(built['frames']['timeline']['pfn'].iloc[0]):#x}" in tl_section


def test_footer_has_the_meta(built):
    footer = built["html"][built["html"].index("<footer>"):]
    for key, value in built["meta"].items():
        if isinstance(value, str):
            assert html.escape(key) in footer and html.escape(value) in footer


def test_write_outputs(golden, tmp_path):
    f = dict(golden["frames"])
    kernels = list(dict.fromkeys(f["timeline"]["kernel"]))
    if len(kernels) > 1:
        f["diff"] = timeline.df_diff(f["timeline"])
    meta = meta_of(golden["frames"], golden["dir"])
    written = report.write_outputs(tmp_path, f, meta)
    names = {p.name for p in written}
    assert {"timeline.parquet", "timeline.csv", "meta.json"} <= names
    for name in f:
        assert f"{name}.parquet" in names
    back = pd.read_parquet(tmp_path / "timeline.parquet")
    pd.testing.assert_frame_equal(back, f["timeline"])
    csv = pd.read_csv(tmp_path / "timeline.csv")
    assert list(csv.columns) == list(f["timeline"].columns)
    assert len(csv) == len(f["timeline"])
    assert list(pd.read_parquet(tmp_path / "steps.parquet")["step"]) == list(f["steps"]["step"])
    text = (tmp_path / "meta.json").read_text()
    assert json.loads(text) == json.loads(json.dumps(meta, default=str))
    assert text == json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n"


def test_report_copy_opens_from_anywhere(built, tmp_path):
    """The page needs no file next to it: a copy elsewhere is the same page."""
    copy = tmp_path / "elsewhere.html"
    shutil.copy(built["path"], copy)
    assert copy.read_text(encoding="utf-8") == built["html"]
    assert not list(built["path"].parent.glob("*.js"))


def test_one_kernel_report(golden, tmp_path):
    """A `run` on one kernel: no comparison, the figures still draw."""
    f = golden["frames"]
    k = f["timeline"]["kernel"].iloc[0]
    one = {n: v[v["kernel"] == k] for n, v in f.items()}
    path = report.build_report(
        tmp_path, title="one", scenario_text="s", meta={"kernels": {k: {"release": "r"}}},
        timeline=one["timeline"], steps=one["steps"], device=one["device"],
        device_pages=one["device_pages"], complaints=one["complaints"])
    doc = path.read_text()
    assert "No comparison" in doc
    assert doc.count('class="plotly-graph-div"') == 4
    assert doc.count("window.PlotlyConfig") == 1
