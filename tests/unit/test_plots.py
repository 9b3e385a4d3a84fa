"""Unit tests of lab.plots on the golden frames recorded from real runs
(tests/golden/timeline/<run>/*.parquet): every figure builds, has one panel
per kernel, one line per watched page, and draws the frames' own values."""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd
import pytest

from lab import plots
from lab.console import complaints as console_complaints

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "timeline"
FRAMES = ("timeline", "steps", "device", "device_pages", "complaints")


def golden_runs() -> list[Path]:
    if not GOLDEN.is_dir():
        return []
    return sorted(p for p in GOLDEN.iterdir() if (p / "timeline.parquet").is_file())


def load_run(path: Path) -> dict[str, pd.DataFrame]:
    return {name: pd.read_parquet(path / f"{name}.parquet") for name in FRAMES}


@pytest.fixture(scope="module", params=golden_runs() or [None],
                ids=lambda p: p.name if p else "missing")
def golden(request) -> dict[str, pd.DataFrame]:
    if request.param is None:
        pytest.fail(f"no golden frames under {GOLDEN} (timeline.parquet, steps.parquet, ...)")
    return load_run(request.param)


def kernels_of(frame: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(frame["kernel"]))


def per_page(timeline: pd.DataFrame) -> pd.DataFrame:
    """One row per (kernel, step, map, page), as the plot draws it."""
    return (timeline.sort_values(["kernel", "step", "map", "page", "proc"], na_position="last")
            .drop_duplicates(["kernel", "step", "map", "page"]))


def traces(fig, kind: str, kernel: str | None = None) -> list:
    return [t for t in fig.data if t.meta and t.meta.get("kind") == kind
            and (kernel is None or t.meta.get("kernel") == kernel)]


def n_columns(fig) -> int:
    n = 0
    while True:
        try:
            fig.get_subplot(1, n + 1)
        except Exception:  # noqa: BLE001 - plotly raises a plain Exception past the grid
            return n
        n += 1


def real_complaints(golden: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The golden run's complaints; if it had none, the real panic line of
    tests/golden/console/before-crash.log put on the golden run's last step."""
    if len(golden["complaints"]):
        return golden["complaints"]
    log = Path(__file__).resolve().parents[1] / "golden" / "console" / "before-crash.log"
    found = console_complaints(log.read_text(errors="replace").splitlines())
    assert found, "the golden crash log has a complaint"
    last = golden["steps"].sort_values("step").iloc[-1]
    return pd.DataFrame([{"kernel": last["kernel"], "step": int(last["step"]),
                          "action": last["action"], "kind": found[0].kind,
                          "text": found[0].text}])


# -- plot_counts -------------------------------------------------------------

def test_counts_one_column_per_kernel(golden):
    t = golden["timeline"]
    fig = plots.plot_counts(t)
    kernels = kernels_of(t)
    assert n_columns(fig) == len(kernels)
    titles = " ".join(a.text for a in fig.layout.annotations)
    for k in kernels:
        assert k in titles
    # each kernel's lines live on their own x axis
    axes = {k: {tr.xaxis for tr in traces(fig, "refcount", k)} for k in kernels}
    assert all(len(a) == 1 for a in axes.values())
    assert len(set().union(*axes.values())) == len(kernels)


def folios(timeline: pd.DataFrame, kernel: str) -> set:
    """The watched folios of *kernel*: (map, the folio_pfn at every step)."""
    kp = per_page(timeline[timeline["kernel"] == kernel])
    return {(m, tuple(g.sort_values("step")["folio_pfn"]))
            for (m, _p), g in kp.groupby(["map", "page"])}


def test_counts_one_line_per_watched_folio(golden):
    t = golden["timeline"]
    fig = plots.plot_counts(t)
    for k in kernels_of(t):
        lines = traces(fig, "refcount", k)
        assert len(lines) == len(folios(t, k))
        assert len(traces(fig, "mapcount", k)) == len(lines)
        # every watched page is on exactly one line
        on_lines = sorted((tr.meta["map"], p) for tr in lines for p in tr.meta["pages"])
        watched = t[t["kernel"] == k][["map", "page"]].drop_duplicates()
        assert on_lines == sorted((m, int(p)) for m, p in watched.itertuples(index=False))
    # a large folio also shows its large_mapcount, an order-0 one does not
    large = t["order"].fillna(0).gt(0).any()
    assert bool(traces(fig, "large_mapcount")) == bool(large)


def test_counts_draw_the_frames_values(golden):
    t = golden["timeline"]
    fig = plots.plot_counts(t)
    pages = per_page(t)
    for k in kernels_of(t):
        for tr in traces(fig, "refcount", k) + traces(fig, "mapcount", k) + traces(
                fig, "large_mapcount", k):
            kind = tr.meta["kind"]
            for page in tr.meta["pages"]:
                want = pages[(pages["kernel"] == k) & (pages["map"] == tr.meta["map"])
                             & (pages["page"] == page)].sort_values("step")
                assert list(tr.x) == [int(s) for s in want["step"]]
                assert list(tr.y) == [None if pd.isna(v) else int(v) for v in want[kind]]
    # raw mapcount: an unmapped page is drawn at -1, not shifted to 0
    assert (t["mapcount"] == -1).any()
    assert any(-1 in tr.y for tr in traces(fig, "mapcount"))


def test_counts_hover_has_every_folio_field(golden):
    t = golden["timeline"]
    tr = traces(plots.plot_counts(t), "refcount")[0]
    hover = tr.hovertext[0]
    for field in ("order", "refcount", "mapcount", "large_mapcount", "entire_mapcount",
                  "pincount", "flags", "folio_pfn"):
        assert f"{field}:" in hover
    assert "entry:" in hover


def test_counts_tick_labels_name_the_steps(golden):
    t, steps = golden["timeline"], golden["steps"]
    fig = plots.plot_counts(t)
    first = steps.drop_duplicates("step").sort_values("step")
    assert list(fig.layout.xaxis.tickvals) == [int(s) for s in first["step"]]
    for text, (_, r) in zip(fig.layout.xaxis.ticktext, first.iterrows(), strict=True):
        assert text.startswith(f"{int(r['step'])}: ")


def test_counts_complaints_are_red_x_with_text(golden):
    t = golden["timeline"]
    bad = real_complaints(golden)
    fig = plots.plot_counts(t, bad)
    marks = traces(fig, "complaint")
    assert {m.meta["kernel"] for m in marks} == set(bad["kernel"])
    for m in marks:
        assert m.marker.symbol == "x" and m.marker.color == "red"
        want = bad[bad["kernel"] == m.meta["kernel"]]
        assert sorted(m.x) == sorted({int(s) for s in want["step"]})
        assert html.escape(str(want["text"].iloc[0])[:30]) in " ".join(m.hovertext)
    assert not traces(plots.plot_counts(t), "complaint")
    empty = bad.iloc[0:0]
    assert not traces(plots.plot_counts(t, empty), "complaint")


def test_plots_do_not_modify_their_frames(golden):
    before = {k: v.copy() for k, v in golden.items()}
    plots.plot_counts(golden["timeline"], golden["complaints"])
    plots.plot_page_table(golden["timeline"])
    plots.plot_device_heatmap(golden["device_pages"], golden["steps"])
    plots.plot_device_summary(golden["device"])
    for k, v in golden.items():
        pd.testing.assert_frame_equal(v, before[k])


# -- plot_page_table ---------------------------------------------------------

def test_page_table_grid_per_kernel(golden):
    t = golden["timeline"]
    fig = plots.plot_page_table(t)
    kernels = kernels_of(t)
    assert n_columns(fig) == len(kernels)
    grids = traces(fig, "page_table")
    assert [g.meta["kernel"] for g in grids] == kernels
    mapped = t.dropna(subset=["proc"])[["proc", "map", "page"]].drop_duplicates()
    for g in grids:
        assert len(g.y) == max(1, len(mapped))
        assert len(g.z) == len(g.y)
        assert all(len(row) == len(g.x) for row in g.z)


def test_page_table_kinds_match_the_frame(golden):
    t = golden["timeline"]
    fig = plots.plot_page_table(t)
    kinds = list(plots.PT_KINDS)
    for g in traces(fig, "page_table"):
        k = g.meta["kernel"]
        rows = t[(t["kernel"] == k) & t["proc"].notna()].drop_duplicates(
            ["step", "proc", "map", "page"])
        for kind in ("devmap", "normal", "special", "not present"):
            want = sum(plots.pt_kind(r) == kind for _, r in rows.iterrows())
            got = sum(row.count(kinds.index(kind)) for row in g.z)
            assert got == want, (k, kind)
        devmaps = rows["pt_devmap"].fillna(False).astype(bool) & rows["pt_present"].fillna(
            False).astype(bool)
        assert sum(row.count(kinds.index("devmap")) for row in g.z) == int(devmaps.sum())
    # the legend names the kinds that occur, devmap and normal included when present
    legend = {tr.meta["pt_kind"] for tr in traces(fig, "legend")}
    assert legend <= set(kinds)
    if t["pt_devmap"].fillna(False).astype(bool).any():
        assert "devmap" in legend


def test_page_table_level_is_written_in_the_cells(golden):
    t = golden["timeline"]
    levels = set(t["pt_level"].dropna())
    text = " ".join(c for g in traces(plots.plot_page_table(t), "page_table")
                    for row in g.text for c in row)
    for level in levels:
        assert level in text


# -- device figures ----------------------------------------------------------

def test_device_heatmap_panel_per_kernel_with_the_values(golden):
    dp = golden["device_pages"]
    fig = plots.plot_device_heatmap(dp, golden["steps"])
    maps = traces(fig, "heatmap")
    assert [h.meta["kernel"] for h in maps] == kernels_of(dp)
    assert n_columns(fig) == len(maps)
    shown = plots.heatmap_pages(dp)
    assert shown and set(shown) <= set(dp["page_index"])
    for h in maps:
        kp = dp[dp["kernel"] == h.meta["kernel"]]
        assert list(h.y) == shown
        assert list(h.x) == sorted(int(s) for s in kp["step"].unique())
        for _, r in kp[kp["page_index"].isin(shown)].iterrows():
            assert h.z[shown.index(int(r["page_index"]))][list(h.x).index(int(r["step"]))] \
                == int(r["refcount"])
    assert fig.layout.coloraxis.cmax >= dp["refcount"].max()


def test_device_heatmap_keeps_every_page_that_changes(golden):
    dp = golden["device_pages"]
    shown = set(plots.heatmap_pages(dp, max_pages=8))
    spread = dp.groupby(["kernel", "page_index"])["refcount"].agg(["min", "max"])
    changing = {int(i) for _k, i in spread.index[spread["min"] != spread["max"]]}
    assert changing <= shown
    assert plots.heatmap_pages(dp, max_pages=10**6) == sorted(set(dp["page_index"]))


def test_device_summary_lines_per_kernel(golden):
    dev = golden["device"]
    fig = plots.plot_device_summary(dev)
    colors = plots.kernel_colors(kernels_of(dev))
    for field in ("pages_changed", "pages_mapped"):
        lines = traces(fig, field)
        assert sorted(tr.meta["kernel"] for tr in lines) == sorted(kernels_of(dev))
        for tr in lines:
            kd = dev[dev["kernel"] == tr.meta["kernel"]].sort_values("step")
            assert list(tr.y) == [int(v) for v in kd[field]]
            assert tr.line.color == colors[tr.meta["kernel"]]


def test_kernel_colors_are_the_same_in_every_figure(golden):
    t = golden["timeline"]
    colors = plots.kernel_colors(kernels_of(t))
    assert len(set(colors.values())) == len(colors)
    for fig in (plots.plot_counts(t), plots.plot_page_table(t),
                plots.plot_device_heatmap(golden["device_pages"])):
        titles = " ".join(a.text for a in fig.layout.annotations)
        for k, c in colors.items():
            assert f"color:{c}'><b>{k}</b>" in titles
    assert plots.kernel_colors(["after", "before"]) == plots.kernel_colors(["before", "after"])


def test_figure_titles_say_what_to_look_at(golden):
    t = golden["timeline"]
    for fig in (plots.plot_counts(t), plots.plot_page_table(t),
                plots.plot_device_heatmap(golden["device_pages"]),
                plots.plot_device_summary(golden["device"])):
        assert len(fig.layout.title.text) > 40


def test_one_kernel_slice_draws_one_column(golden):
    t = golden["timeline"]
    k = t["kernel"].iloc[0]
    one = t[t["kernel"] == k]
    for fig in (plots.plot_counts(one), plots.plot_page_table(one)):
        assert n_columns(fig) == 1
    dev = golden["device"]
    assert [tr.meta["kernel"] for tr in traces(plots.plot_device_summary(dev[dev["kernel"] == k]),
                                                "pages_changed")] == [k]


def test_kernel_colors_of_a_generator_name_every_kernel():
    """A built kernel or a tree (no fixed color) read from a generator, as
    the report passes them: each still gets a color."""
    colors = plots.kernel_colors(k for k in ["obj", "before", "mine"])
    assert set(colors) == {"obj", "before", "mine"}
    assert colors["before"] == plots.KERNEL_COLORS["before"]


def test_plot_counts_marks_where_each_invariant_first_broke():
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "golden"))
    from records import load

    from lab import timeline as tl

    runs = load(Path(__file__).resolve().parents[1] / "golden" / "records" / "fork-share.json")
    t, s = tl.df_timeline(runs), tl.df_steps(runs)
    t.loc[(t["kernel"] == "after") & (t["step"] == 4) & (t["page"] == 2), "mapcount"] = 0
    broken = tl.df_violations(tl.check_invariants(t, s))
    fig = plots.plot_counts(t, violations=broken)
    marks = [a.text for a in fig.layout.annotations if a.text.startswith("broken:")]
    assert marks == ["broken: rmap"]
    assert [sh.x0 for sh in fig.layout.shapes] == [4]
    assert not [a for a in plots.plot_counts(t).layout.annotations if a.text.startswith("broken:")]
