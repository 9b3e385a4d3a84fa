"""Plotly figures of the DataFrames in :mod:`lab.timeline`.

House rule: every ``plot_*`` takes only DataFrames (and simple options) and
returns a :class:`plotly.graph_objects.Figure`; no I/O. Each kernel keeps
the same color in every figure (:func:`kernel_colors`).
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from . import columns

__all__ = [
    "KERNEL_COLORS",
    "PT_KINDS",
    "folio_lines",
    "heatmap_pages",
    "kernel_colors",
    "plot_counts",
    "plot_device_heatmap",
    "plot_device_summary",
    "plot_events",
    "plot_page_table",
    "pt_kind",
    "step_ticks",
]

# The two kernels of the lab keep fixed colors; any other kernel gets the
# next free color of PALETTE in sorted name order.
KERNEL_COLORS = {"before": "#1f77b4", "after": "#d62728"}
PALETTE = ("#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#ff7f0e",
           "#7f7f7f")
# One color per watched page (the same page has the same color on every kernel).
PAGE_PALETTE = ("#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d",
                "#666666", "#1f78b4", "#b15928")
COMPLAINT_COLOR = "red"

# Page-table entry kinds of plot_page_table: (name, color, legend text).
PT_KINDS = {
    "devmap": ("#7b2cbf", "devmap entry (pte/pmd_devmap: no folio reference, no mapcount)"),
    "special": ("#f4a261", "special entry (no struct page accounting)"),
    "normal": ("#2a9d8f", "normal entry (folio mapped: reference + mapcount)"),
    "not present": ("#6c757d", "entry not present"),
    "none": ("#dee2e6", "no entry (not mapped)"),
}
_FOLIO_FIELDS = columns.names("hover")


def kernel_colors(kernels: Iterable[str]) -> dict[str, str]:
    """A color per kernel: fixed for ``before``/``after``, else from
    PALETTE in sorted name order (same kernels -> same colors everywhere)."""
    names = sorted(set(kernels))  # read once: *kernels* may be a generator
    out: dict[str, str] = {}
    free = [c for c in PALETTE]
    for k in names:
        if k in KERNEL_COLORS:
            out[k] = KERNEL_COLORS[k]
    for k in names:
        if k not in out:
            out[k] = free.pop(0) if free else PALETTE[len(out) % len(PALETTE)]
    return out


def _kernels(frame: pd.DataFrame) -> list[str]:
    """Kernels in order of first appearance."""
    return [str(k) for k in dict.fromkeys(frame["kernel"].dropna())]


def _value(v):
    """A plain Python value (None for a null) that plotly serializes as is."""
    if v is None or (not isinstance(v, str | bytes) and pd.isna(v)):
        return None
    if hasattr(v, "item"):
        return v.item()
    return v


def _values(series: pd.Series) -> list:
    return [_value(v) for v in series]


def _text(v, null: str = "–") -> str:
    v = _value(v)
    if v is None:
        return null
    if isinstance(v, bool):
        return "yes" if v else "no"
    return html.escape(str(v))


def step_ticks(frame: pd.DataFrame, steps: pd.DataFrame | None = None,
               *, max_label: int = 28) -> tuple[list[int], list[str]]:
    """x tick values and texts ``"step: label"`` (the step's label if it is
    short and not just the action again, else its action) from any frame
    with ``step`` and ``action``/``label`` columns (or from *steps*)."""
    src = steps if steps is not None and not steps.empty else frame
    cols = [c for c in ("step", "action", "label") if c in src.columns]
    first = src[cols].drop_duplicates("step").sort_values("step")
    vals, texts = [], []
    for _, r in first.iterrows():
        step = int(r["step"])
        action = _value(r.get("action")) or ""
        label = _value(r.get("label")) or ""
        name = label if label and label != action and len(label) <= max_label else action
        vals.append(step)
        texts.append(html.escape(f"{step}: {name}" if name else str(step)))
    return vals, texts


def _per_page(timeline: pd.DataFrame) -> pd.DataFrame:
    """One row per (kernel, step, map, page) — the folio fields are the same
    in every process — with ``procs``: the processes that map the page. The
    page-table fields are those of the first such process (by name)."""
    ordered = timeline.sort_values(["kernel", "step", "map", "page", "proc"], na_position="last")
    procs = (timeline.dropna(subset=["proc"])
             .groupby(["kernel", "step", "map", "page"])["proc"]
             .agg(lambda s: ", ".join(sorted(set(map(str, s))))).rename("procs"))
    pages = ordered.drop_duplicates(["kernel", "step", "map", "page"])
    pages = pages.join(procs, on=["kernel", "step", "map", "page"])
    return pages.reset_index(drop=True)


def _watched(frame: pd.DataFrame) -> list[tuple[str, int]]:
    """Watched (map, page) pairs of a timeline, sorted."""
    pairs = frame[["map", "page"]].drop_duplicates().dropna()
    return sorted((str(m), int(p)) for m, p in pairs.itertuples(index=False))


def _page_name(map_name: str, page: int) -> str:
    return f"{map_name} page {page}"


def _pt_text(r) -> str:
    level = _value(r.get("pt_level"))
    if level is None:
        return "no page-table entry"
    devmap = _value(r.get("pt_devmap"))
    bits = (f"present {_text(r.get('pt_present'))}, write {_text(r.get('pt_write'))}, "
            f"dirty {_text(r.get('pt_dirty'))}, special {_text(r.get('pt_special'))}, "
            f"devmap {'n/a (no devmap bit)' if devmap is None else _text(devmap)}")
    return f"{html.escape(str(level))}: {bits}"


def _counts_hover(r, kernel: str, name: str) -> str:
    lines = [f"<b>{html.escape(name)}</b> on {html.escape(kernel)}",
             (f"step {_text(r['step'])}: {_text(r.get('action'))} "
             f"{_text(r.get('label'), '')}"),
             f"{_text(r.get('detail'), '')}"]
    for f in _FOLIO_FIELDS:
        if f in r.index:
            lines.append(f"{f}: {_text(r[f])}")
    lines.append(f"mapped by: {_text(r.get('procs'), 'no process')}")
    lines.append(f"entry: {_pt_text(r)}")
    lines.append(f"pinned: {_text(r.get('pinned'))}, in pipe: {_text(r.get('in_pipe'))}")
    return "<br>".join(line for line in lines if line)


def _complaints_by_step(complaints: pd.DataFrame | None, kernel: str) -> dict[int, str]:
    if complaints is None or complaints.empty:
        return {}
    out: dict[int, list[str]] = {}
    for _, c in complaints[complaints["kernel"] == kernel].iterrows():
        text = html.escape(str(c["text"]))
        if len(text) > 160:
            text = text[:157] + "..."
        out.setdefault(int(c["step"]), []).append(f"{html.escape(str(c['kind']))}: {text}")
    return {s: "<br>".join(v[:8] + ([f"... and {len(v) - 8} more"] if len(v) > 8 else []))
            for s, v in out.items()}


def _kernel_title(kernel: str, frame: pd.DataFrame, color: str) -> str:
    rel = ""
    if "kernel_release" in frame.columns:
        rels = frame.loc[frame["kernel"] == kernel, "kernel_release"].dropna()
        rel = f" ({html.escape(str(rels.iloc[0]))})" if len(rels) else ""
    return f"<span style='color:{color}'><b>{html.escape(kernel)}</b>{rel}</span>"


def _style_titles(fig: go.Figure, titles: Sequence[str]) -> None:
    """Subplot titles keep their inline HTML color; make them a bit larger."""
    for ann in fig.layout.annotations:
        if ann.text in titles:
            ann.font = {"size": 14}


def folio_lines(pages: pd.DataFrame) -> list[tuple[str, tuple[int, ...]]]:
    """The lines of :func:`plot_counts` for one kernel's per-page rows:
    watched pages of one map that sit in the same folio at every step (the
    same folio_pfn sequence) share a line; (map, pages) per line, in order."""
    groups: dict[tuple, list[int]] = {}
    for (map_name, page), g in pages.groupby(["map", "page"], sort=True):
        sig = tuple(_value(v) for v in g.sort_values("step")["folio_pfn"])
        if all(v is None for v in sig):  # no folio to share: a line of its own
            sig = ("page", int(page))
        groups.setdefault((str(map_name), sig), []).append(int(page))
    return [(m, tuple(sorted(p))) for (m, _sig), p in groups.items()]


def _line_name(map_name: str, pages: Sequence[int]) -> str:
    if len(pages) == 1:
        return _page_name(map_name, pages[0])
    return f"{map_name} pages {', '.join(map(str, pages))}"


def plot_counts(timeline: pd.DataFrame, complaints: pd.DataFrame | None = None,
                *, height: int = 640, violations: pd.DataFrame | None = None) -> go.Figure:
    """Refcount (top row) and raw mapcount (bottom row, -1 = unmapped) of
    each watched folio per step, from :func:`lab.timeline.df_timeline`; one
    column per kernel. One line per folio (watched pages of the same folio
    share it, see :func:`folio_lines`), the same color on every kernel; in
    the bottom row a large folio also gets its raw ``large_mapcount``
    (dash-dot), which counts a PMD/PUD mapping that the page's own
    ``_mapcount`` does not. Steps where the guest kernel complained (from
    :func:`lab.timeline.df_complaints`) get a red x with the text on hover.
    The step where each invariant first broke (from
    :func:`lab.timeline.df_violations`) gets a dashed red line named after it.
    """
    kernels = _kernels(timeline)
    colors = kernel_colors(kernels)
    pages = _per_page(timeline)
    titles = [_kernel_title(k, timeline, colors[k]) for k in kernels]
    fig = make_subplots(rows=2, cols=max(1, len(kernels)), shared_yaxes=True,
                        shared_xaxes=True, horizontal_spacing=0.04, vertical_spacing=0.08,
                        subplot_titles=titles + [""] * len(kernels),
                        row_heights=[0.6, 0.4])
    watched = _watched(pages)
    page_color = {w: PAGE_PALETTE[i % len(PAGE_PALETTE)] for i, w in enumerate(watched)}
    legend_done: set[str] = set()
    for col, kernel in enumerate(kernels, start=1):
        kp = pages[pages["kernel"] == kernel]
        lines = folio_lines(kp)
        for i, (map_name, line_pages) in enumerate(lines):
            # markers shrink line by line: where lines coincide, rings of every color show
            size = min(18, 6 + 3 * (len(lines) - 1 - i))
            g = kp[(kp["map"] == map_name) & (kp["page"] == line_pages[0])].sort_values("step")
            name = _line_name(map_name, line_pages)
            hover = [_counts_hover(r, kernel, name) for _, r in g.iterrows()]
            color = page_color[(map_name, line_pages[0])]
            large = g["order"].fillna(0).gt(0).any() and g["large_mapcount"].notna().any()
            series = [(1, "refcount", "solid"), (2, "mapcount", "dot")]
            if large:
                series.append((2, "large_mapcount", "dashdot"))
            for row, field, dash in series:
                fig.add_trace(go.Scatter(
                    x=_values(g["step"]), y=_values(g[field]), mode="lines+markers",
                    name=name if field != "large_mapcount" else f"{name}: large_mapcount",
                    legendgroup=name, showlegend=(row == 1 and name not in legend_done),
                    line={"color": color, "dash": dash, "width": 2},
                    marker={"size": size if field != "large_mapcount" else max(5, size - 2),
                            "line": {"width": 1, "color": "white"}},
                    hovertext=hover,
                    hovertemplate=f"<b>{field}</b> %{{y}}<br>%{{hovertext}}<extra></extra>",
                    meta={"kind": field, "kernel": kernel, "map": map_name,
                          "page": line_pages[0], "pages": list(line_pages)},
                ), row=row, col=col)
            legend_done.add(name)
        bad = _complaints_by_step(complaints, kernel)
        if bad:
            steps = sorted(bad)
            tops = kp.groupby("step")["refcount"].max()
            ys = [_value(tops.get(s)) if s in tops.index else 0 for s in steps]
            fig.add_trace(go.Scatter(
                x=steps, y=[0 if y is None else y for y in ys], mode="markers",
                name="kernel complaint", legendgroup="complaint",
                showlegend="complaint" not in legend_done,
                marker={"symbol": "x", "size": 16, "color": COMPLAINT_COLOR,
                        "line": {"width": 1, "color": "darkred"}},
                hovertext=[f"<b>{html.escape(kernel)} step {s}: kernel complaint</b><br>{bad[s]}"
                           for s in steps],
                hovertemplate="%{hovertext}<extra></extra>",
                meta={"kind": "complaint", "kernel": kernel}), row=1, col=col)
            legend_done.add("complaint")
        for step, names in _first_breaks(violations, kernel).items():
            fig.add_vline(x=step, line={"color": COMPLAINT_COLOR, "dash": "dash", "width": 1.5},
                          row=1, col=col, annotation_text=f"broken: {', '.join(names)}",
                          annotation_position="top left",
                          annotation_font={"color": COMPLAINT_COLOR, "size": 11})
    ticks = step_ticks(timeline)
    fig.update_xaxes(tickvals=ticks[0], ticktext=ticks[1], tickangle=-40, showgrid=True)
    top = pages["refcount"].max() if len(pages) else 0
    fig.update_yaxes(title_text="refcount", row=1, col=1, rangemode="tozero")
    if not pd.isna(top) and top <= 12:
        fig.update_yaxes(dtick=1, row=1)
    fig.update_yaxes(title_text="raw mapcount<br>(-1 = unmapped)", row=2, col=1, dtick=1)
    _style_titles(fig, titles)
    fig.add_annotation(
        text="solid: refcount · dotted: the page's _mapcount · dash-dot: the large folio's "
             "large_mapcount (all raw: -1 = not mapped, 0 = mapped once)",
        xref="paper", yref="paper", x=0, y=1.0, yshift=36, showarrow=False,
        xanchor="left", font={"size": 11, "color": "#555"})
    fig.update_layout(
        title={"text": "Folio refcount and mapcount per step — do the mapping steps raise them "
                       "(folio mapped for real) or leave them flat (devmap entry)?"},
        height=height, hovermode="closest", legend={"title": {"text": "watched folio"}},
        margin={"t": 110, "b": 110}, template="plotly_white")
    return fig


def _first_breaks(violations: pd.DataFrame | None, kernel: str) -> dict[int, list[str]]:
    """Step -> invariants that first broke there, for one kernel."""
    if violations is None or violations.empty:
        return {}
    v = violations[violations["kernel"] == kernel]
    first = v.groupby("invariant", sort=False)["step"].min()
    out: dict[int, list[str]] = {}
    for name, step in first.items():
        out.setdefault(int(step), []).append(str(name))
    return out


def pt_kind(row) -> str:
    """What kind of page-table entry a timeline row shows: devmap, special,
    normal, not present or none (see :data:`PT_KINDS`)."""
    if _value(row.get("pt_level")) is None:
        return "none"
    if _value(row.get("pt_present")) is False:
        return "not present"
    if _value(row.get("pt_devmap")) is True:
        return "devmap"
    if _value(row.get("pt_special")) is True:
        return "special"
    return "normal"


def _bits_label(r) -> str:
    level = _value(r.get("pt_level"))
    if level is None:
        return ""
    bits = " ".join(letter for letter, f in (("w", "pt_write"), ("d", "pt_dirty"))
                    if _value(r.get(f)) is True)
    return f"<b>{html.escape(str(level))}</b>" + (f"<br>{bits}" if bits else "")


def plot_page_table(timeline: pd.DataFrame, *, height: int | None = None) -> go.Figure:
    """The page-table entry of every watched page in every process, per
    step, from :func:`lab.timeline.df_timeline`: one grid per kernel, one
    row per (process, map, page), one cell per step. Cell color = kind of
    entry (purple devmap, teal normal, orange special, gray not present,
    light gray none; see :data:`PT_KINDS`), cell text = level (PTE, PMD,
    PUD) and the w(rite)/d(irty) bits; hover for every bit."""
    kernels = _kernels(timeline)
    colors = kernel_colors(kernels)
    mapped = timeline.dropna(subset=["proc"])
    rows = sorted({(str(p), str(m), int(pg)) for p, m, pg in
                   mapped[["proc", "map", "page"]].itertuples(index=False)},
                  key=lambda r: (r[1], r[2], r[0] != "parent", r[0]))
    if not rows:  # nothing ever mapped: one row per watched page
        rows = [("no process", m, p) for m, p in _watched(timeline)]
    names = [f"{proc}: {_page_name(m, p)}" for proc, m, p in rows]
    kinds = list(PT_KINDS)
    n = len(kinds)
    scale = []
    for i, kind in enumerate(kinds):
        scale += [[i / n, PT_KINDS[kind][0]], [(i + 1) / n, PT_KINDS[kind][0]]]
    titles = [_kernel_title(k, timeline, colors[k]) for k in kernels]
    fig = make_subplots(rows=1, cols=max(1, len(kernels)), shared_yaxes=True,
                        horizontal_spacing=0.02, subplot_titles=titles)
    present: set[str] = set()
    for col, kernel in enumerate(kernels, start=1):
        kt = timeline[timeline["kernel"] == kernel]
        ksteps = sorted(int(s) for s in kt["step"].dropna().unique())
        by_key = {}
        for _, r in kt.dropna(subset=["proc"]).iterrows():
            by_key.setdefault((int(r["step"]), str(r["proc"]), str(r["map"]), int(r["page"])), r)
        actions = {int(s): _text(a) for s, a in
                   kt.drop_duplicates("step")[["step", "action"]].itertuples(index=False)}
        z, text, hover = [], [], []
        for (proc, map_name, page), name in zip(rows, names, strict=True):
            zr, tr, hr = [], [], []
            for step in ksteps:
                r = by_key.get((step, proc, map_name, page))
                kind = "none" if r is None else pt_kind(r)
                present.add(kind)
                zr.append(kinds.index(kind))
                tr.append("" if r is None else _bits_label(r))
                h = (f"<b>{html.escape(name)}</b> on {html.escape(kernel)}<br>"
                     f"step {step}: {actions.get(step, '')}<br>kind: <b>{kind}</b><br>")
                if r is None:
                    h += f"{html.escape(proc)} does not map it"
                else:
                    h += (f"{_pt_text(r)}<br>refcount {_text(r['refcount'])}, mapcount "
                          f"{_text(r['mapcount'])}, pfn {_text(r['pfn'])}")
                hr.append(h)
            z.append(zr)
            text.append(tr)
            hover.append(hr)
        fig.add_trace(go.Heatmap(
            x=ksteps, y=names, z=z, text=text, texttemplate="%{text}",
            textfont={"size": 11, "color": "white"}, hovertext=hover,
            hovertemplate="%{hovertext}<extra></extra>", colorscale=scale, zmin=-0.5,
            zmax=n - 0.5, showscale=False, xgap=3, ygap=3, name=kernel,
            meta={"kind": "page_table", "kernel": kernel}), row=1, col=col)
    for kind in kinds:  # legend entries: the heatmap has none of its own
        if kind in present:
            fig.add_trace(go.Scatter(
                x=[None], y=[None], mode="markers", name=PT_KINDS[kind][1],
                marker={"symbol": "square", "size": 14, "color": PT_KINDS[kind][0],
                        "line": {"width": 1, "color": "#888"}},
                meta={"kind": "legend", "pt_kind": kind}), row=1, col=1)
    ticks = step_ticks(timeline)
    fig.update_xaxes(tickvals=ticks[0], ticktext=ticks[1], tickangle=-35, showgrid=False)
    fig.update_yaxes(categoryorder="array", categoryarray=list(reversed(names)), showgrid=False,
                     autorange=True)
    _style_titles(fig, titles)
    fig.update_layout(
        title={"text": "Page-table entry per step — purple = devmap entry (kernel before the "
                       "fix), teal = normal entry mapping the folio"},
        height=height or 290 + 44 * len(rows), template="plotly_white",
        legend={"orientation": "h", "yref": "container", "y": 0, "yanchor": "bottom", "x": 0},
        margin={"t": 90, "b": 150}, plot_bgcolor="white")
    return fig


def heatmap_pages(device_pages: pd.DataFrame, max_pages: int = 120) -> list[int]:
    """The page indices :func:`plot_device_heatmap` draws: all of them if
    there are at most *max_pages*, else those whose refcount changes over
    the steps on some kernel or differs from the most common value at the
    first step (a folio's head among its tails)."""
    if device_pages.empty:
        return []
    every = sorted(int(i) for i in device_pages["page_index"].unique())
    if len(every) <= max_pages:
        return every
    keep: set[int] = set()
    for _, kp in device_pages.groupby("kernel"):
        spread = kp.groupby("page_index")["refcount"].agg(["min", "max"])
        keep |= {int(i) for i in spread.index[spread["min"] != spread["max"]]}
        first = kp[kp["step"] == kp["step"].min()]
        usual = first["refcount"].mode()
        if len(usual):
            keep |= {int(i) for i in first.loc[first["refcount"] != usual.iloc[0], "page_index"]}
    return sorted(keep) or every[:max_pages]


def plot_device_heatmap(device_pages: pd.DataFrame, steps: pd.DataFrame | None = None,
                        *, height: int | None = None, max_pages: int = 120) -> go.Figure:
    """Refcount of the device pages near the watched ones (y = page index in
    the device) per step (x), from :func:`lab.timeline.df_device_pages`; one
    panel per kernel, one shared color scale. More than *max_pages* pages:
    only the telling ones (:func:`heatmap_pages`). Tick labels come from
    *steps* (:func:`lab.timeline.df_steps`) when given."""
    kernels = _kernels(device_pages)
    colors = kernel_colors(kernels)
    titles = [f"<span style='color:{colors[k]}'><b>{html.escape(k)}</b></span>" for k in kernels]
    fig = make_subplots(rows=1, cols=max(1, len(kernels)), shared_yaxes=True,
                        horizontal_spacing=0.03, subplot_titles=titles)
    ref = pd.to_numeric(device_pages["refcount"], errors="coerce") if len(device_pages) else None
    zmax = float(ref.max()) if ref is not None and len(ref) else 1.0
    zmin = float(ref.min()) if ref is not None and len(ref) else 0.0
    total = device_pages["page_index"].nunique() if len(device_pages) else 0
    shown = heatmap_pages(device_pages, max_pages)
    height = height or int(min(900, max(460, 220 + 9 * len(shown))))
    cell = (height - 220) / max(1, len(shown))  # pixels per page row
    show_text = cell >= 13
    for col, kernel in enumerate(kernels, start=1):
        kp = device_pages[(device_pages["kernel"] == kernel)
                          & device_pages["page_index"].isin(shown)]
        grid = kp.pivot_table(index="page_index", columns="step", values="refcount",
                              aggfunc="first").sort_index()
        z = [[_value(v) for v in row] for row in grid.to_numpy(dtype=object)]
        fig.add_trace(go.Heatmap(
            x=[int(s) for s in grid.columns], y=[int(i) for i in grid.index], z=z,
            coloraxis="coloraxis", name=kernel, xgap=2, ygap=1 if cell >= 5 else 0,
            text=z if show_text else None, texttemplate="%{text}" if show_text else None,
            textfont={"size": 10},
            hovertemplate=f"{html.escape(kernel)}<br>step %{{x}}<br>page %{{y}}<br>"
                          "refcount %{z}<extra></extra>",
            meta={"kind": "heatmap", "kernel": kernel}), row=1, col=col)
    ticks = step_ticks(steps if steps is not None else device_pages, steps)
    fig.update_xaxes(tickvals=ticks[0], ticktext=ticks[1], tickangle=-40, showgrid=False)
    fig.update_yaxes(type="category", autorange="reversed", showgrid=False)
    which = (f"all {total} device pages near the watched ones" if len(shown) == total else
             f"{len(shown)} of the {total} device pages near the watched ones: those whose "
             f"refcount changes or stands out")
    fig.update_yaxes(title_text="page index in the device", row=1, col=1)
    _style_titles(fig, titles)
    fig.update_layout(
        title={"text": "Refcount of device pages per step — a cell that changes color took or "
                       f"dropped a reference<br><sup>{html.escape(which)}</sup>"},
        coloraxis={"colorscale": "Viridis", "cmin": zmin, "cmax": max(zmax, zmin + 1),
                   "colorbar": {"title": {"text": "refcount"}, "dtick": 1 if zmax - zmin <= 10
                                else None}},
        height=height, template="plotly_white", margin={"t": 100, "b": 110})
    return fig


def plot_device_summary(device: pd.DataFrame, steps: pd.DataFrame | None = None,
                        *, height: int = 600) -> go.Figure:
    """Device-wide counts per step, one line per kernel, from
    :func:`lab.timeline.df_device`: pages whose refcount changed since the
    start, pages with a mapcount (mapped), and the summed refcount change.
    Tick labels come from *steps* (:func:`lab.timeline.df_steps`) when given."""
    kernels = _kernels(device)
    colors = kernel_colors(kernels)
    fields = [("pages_changed", "pages whose refcount changed since the start"),
              ("pages_mapped", "pages with a mapcount (mapcount >= 0)"),
              ("refcount_sum_delta", "summed refcount change since the start")]
    fields = [f for f in fields if f[0] in device.columns]
    fig = make_subplots(rows=len(fields), cols=1, shared_xaxes=True, vertical_spacing=0.11,
                        subplot_titles=[t for _, t in fields])
    # the first kernel (dashed if it is "before") is drawn last, on top: equal lines both show
    for rank, kernel in reversed(list(enumerate(kernels))):
        kd = device[device["kernel"] == kernel].sort_values("step")
        for row, (field, _title) in enumerate(fields, start=1):
            hover = [f"<b>{html.escape(kernel)}</b> step {_text(r['step'])}: "
                     f"{_text(r.get('action'))}<br>{field}: {_text(r[field])}"
                     f"<br>device {_text(r.get('device'))} ({_text(r.get('pages'))} pages)"
                     for _, r in kd.iterrows()]
            fig.add_trace(go.Scatter(
                x=_values(kd["step"]), y=_values(kd[field]), mode="lines+markers", name=kernel,
                legendgroup=kernel, showlegend=row == 1, legendrank=1000 + rank,
                line={"color": colors[kernel], "width": 2,
                      "dash": "solid" if kernel != "before" else "dash"},
                marker={"size": 8}, hovertext=hover,
                hovertemplate="%{hovertext}<extra></extra>",
                meta={"kind": field, "kernel": kernel}), row=row, col=1)
    ticks = step_ticks(device, steps)
    fig.update_xaxes(tickvals=ticks[0], ticktext=ticks[1], showgrid=True)
    fig.update_xaxes(tickangle=-40, row=len(fields), col=1)
    for row, (field, _title) in enumerate(fields, start=1):
        values = pd.to_numeric(device[field], errors="coerce").dropna()
        lo, hi = (float(values.min()), float(values.max())) if len(values) else (0.0, 1.0)
        lo, hi = min(lo, 0.0), max(hi, 1.0)
        pad = max(0.3, (hi - lo) * 0.06)
        fig.update_yaxes(range=[lo - pad, hi + pad], row=row, col=1,
                         dtick=1 if hi - lo <= 12 else None, zeroline=True)
    fig.update_layout(
        title={"text": "Whole device per step — do mapping steps change refcounts and "
                       "mapcounts of struct pages on one kernel and not on the other?"},
        height=height, template="plotly_white", hovermode="x unified",
        legend={"title": {"text": "kernel"}}, margin={"t": 90, "b": 110})
    return fig


# -- events ------------------------------------------------------------------

FIELD_COLORS = {c.name: c.color for c in columns.COUNTERS if c.color}


def _event_hover(r) -> str:
    if r["kind"] == "gone":
        return (f"<b>{_text(r['field'])}</b> was {_text(r['old'])}; <b>gone</b>: its struct page "
                f"was removed while watched (the device's memmap went away)")
    head = (f"<b>{_text(r['field'])}</b> {_text(r['old'])} → {_text(r['new'])} "
            f"({int(r['delta']):+d})")
    if r["kind"] == "lost":
        return head + "<br><b>lost</b>: the watchpoints missed this change; the accounting found it"
    lines = [head, f"by <b>{_text(r['writer'])}</b> (in {_text(r['function'])})",
             f"{_text(r['comm'])} pid {_text(r['pid'])} on CPU {_text(r['cpu'])}, pc {_text(r['pc'])}"]
    stack = _value(r.get("stack"))
    if stack:
        frames = stack.split(" < ")
        lines.append("stack: " + "<br>  &lt; ".join(html.escape(f) for f in frames[:14]))
    return "<br>".join(lines)


def plot_events(events: pd.DataFrame, steps: pd.DataFrame | None = None) -> go.Figure:
    """A waterfall of every recorded change per kernel: bars grouped under
    their step, one trace per (folio, counter) starting at the counter's
    value before its first event; the writer's name under each bar and the
    whole story (function, task, stack) on hover. Lost changes (found by the
    accounting, not by a watchpoint) are marked "lost"."""
    kernels = _kernels(events) if len(events) else []
    fig = make_subplots(rows=max(1, len(kernels)), cols=1, shared_xaxes=False,
                        subplot_titles=[f"{k}: {int((events['kernel'] == k).sum())} change(s)"
                                        for k in kernels] or ["no events"],
                        vertical_spacing=0.18 if len(kernels) > 1 else 0.1)
    labels = {}
    if steps is not None and len(steps):
        vals, texts = step_ticks(steps, steps, max_label=22)
        labels = dict(zip(vals, texts, strict=True))
    for row, kernel in enumerate(kernels, 1):
        ev = events[events["kernel"] == kernel].sort_values("seq")
        for (folio, field), g in ev.groupby(["folio_pfn", "field"], sort=False):
            step_names = [html.unescape(labels.get(int(s), str(int(s)))) for s in g["step"]]
            writers = [(k if k in ("lost", "gone") else _value(w) or "?")
                       for k, w in zip(g["kind"], g["writer"], strict=True)]
            fig.add_trace(go.Waterfall(
                x=[step_names, [f"#{int(q)} {w}" for q, w in zip(g["seq"], writers, strict=True)]],
                y=_values(g["delta"]), base=int(g["old"].iloc[0]), measure=["relative"] * len(g),
                name=f"{kernel} folio {int(folio):#x} {field}", legendgroup=field,
                increasing={"marker": {"color": FIELD_COLORS.get(field, "#444")}},
                decreasing={"marker": {"color": FIELD_COLORS.get(field, "#444"), "line":
                                       {"color": "black", "width": 1}}},
                connector={"line": {"color": "#bbb", "dash": "dot"}},
                hovertext=[_event_hover(r) for _, r in g.iterrows()], hoverinfo="text",
                text=writers, textposition="outside", cliponaxis=False,
            ), row=row, col=1)
        fig.update_yaxes(title_text="value", row=row, col=1)
    fig.update_layout(waterfallmode="group", height=max(420, 380 * len(kernels)),
                      margin={"t": 60, "b": 40}, hovermode="closest",
                      legend={"orientation": "h", "y": -0.12},
                      title="Every change of the watched counters, by step (hover for who made it)")
    return fig
