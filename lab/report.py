"""The output directory of an experiment: the frames as parquet (and the
timeline as CSV), ``meta.json``, and ``report.html`` — one self-contained
page (plotly.js inline, once; nothing fetched from the network) with the
summary, the differences, the invariant checks, the kernel complaints, the
figures of :mod:`lab.plots` and the tables.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import html
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import pyarrow as pa

from . import columns, plots
from .timeline import accounting_problems

__all__ = ["REPORT_NAME", "TIMELINE_TABLE_COLUMNS", "build_report", "build_sweep_page",
           "parquet_safe", "write_outputs"]

REPORT_NAME = "report.html"

# The compact timeline table of the report (the full one is timeline.csv).
TIMELINE_TABLE_COLUMNS = columns.names("report")

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0;
       color: #212529; background: #f8f9fa; }
main { max-width: 1500px; margin: 0 auto; padding: 1.2em 2em 2em; background: #fff; }
h1 { margin: 0.2em 0 0.6em; font-size: 1.7em; }
h2 { margin-top: 1.6em; border-bottom: 2px solid #dee2e6; padding-bottom: 0.2em;
     font-size: 1.3em; }
.summary { display: grid; grid-template-columns: max-content 1fr; gap: 0.3em 1.2em;
           background: #eef3f8; border: 1px solid #c9d6e3; border-radius: 6px;
           padding: 0.8em 1.2em; }
.summary dt { font-weight: 600; color: #495057; }
.summary dd { margin: 0; }
.chip { display: inline-block; width: 0.8em; height: 0.8em; border-radius: 50%;
        margin-right: 0.35em; vertical-align: baseline; }
pre.scenario { background: #f1f3f5; border: 1px solid #dee2e6; border-radius: 4px;
               padding: 0.8em 1em; overflow-x: auto; font-size: 0.88em; }
ul.differences li { margin-bottom: 0.5em; line-height: 1.4; }
.ok { color: #2b8a3e; font-weight: 600; }
.bad { color: #c92a2a; font-weight: 600; }
table.frame { border-collapse: collapse; font-size: 0.82em; margin: 0.4em 0; }
table.frame th, table.frame td { border: 1px solid #dee2e6; padding: 0.2em 0.5em;
                                 text-align: left; vertical-align: top; }
table.frame thead th { background: #e9ecef; position: sticky; top: 0; }
table.frame tbody tr:nth-child(even) { background: #f8f9fa; }
.figure { margin: 0.6em 0 1.4em; border: 1px solid #e9ecef; border-radius: 4px; }
.figure-note { color: #495057; font-size: 0.92em; margin: 0.2em 0 0.4em; }
details summary { cursor: pointer; font-weight: 600; margin: 0.4em 0; }
footer { margin-top: 2em; font-size: 0.8em; color: #6c757d; border-top: 1px solid #dee2e6;
         padding-top: 0.6em; }
footer table td { padding: 0.05em 0.8em 0.05em 0; vertical-align: top; }
"""

_PLOTLY_CONFIG = {"displaylogo": False, "responsive": True, "scrollZoom": False}


def write_outputs(out_dir: str | Path, frames: Mapping[str, pd.DataFrame],
                  meta: Mapping) -> list[Path]:
    """Write every frame as ``<name>.parquet`` (the timeline also as
    ``timeline.csv``) and *meta* as ``meta.json`` (indented, sorted keys)
    into *out_dir*; the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, frame in frames.items():
        if frame is None:
            continue
        path = out / f"{name}.parquet"
        parquet_safe(frame).to_parquet(path, index=False)
        written.append(path)
        if name == "timeline":
            csv = out / "timeline.csv"
            frame.to_csv(csv, index=False)
            written.append(csv)
    meta_path = out / "meta.json"
    meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
    written.append(meta_path)
    return written


def parquet_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """Object columns parquet cannot type (the per-kernel value columns of
    ``df_diff`` mix ints, bools and strings) become strings; nulls stay null."""
    fixed = {}
    for col in frame.columns:
        if frame[col].dtype != object:
            continue
        try:
            pa.array(frame[col], from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            fixed[col] = frame[col].map(lambda v: None if _isnull(v) else str(v)).astype("string")
    return frame.assign(**fixed) if fixed else frame


def _isnull(v) -> bool:
    try:
        return v is None or bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


def _e(value) -> str:
    return html.escape("" if value is None else str(value))


def _table(frame: pd.DataFrame, *, max_rows: int | None = None) -> str:
    """An HTML table of *frame* (escaped); nulls of any kind show as "–"."""
    shown = frame.astype(object)
    shown = shown.where(~shown.map(_isnull), "–")
    return shown.to_html(escape=True, index=False, classes="frame", border=0,
                         max_rows=max_rows)


def _verdict(violations: Sequence, expectations: pd.DataFrame | None = None) -> str:
    """The first violation (or failed expectation), at the top of the
    report: which invariant, where, expected and actual, in one paragraph."""
    failed = (expectations[~expectations["passed"].fillna(False).astype(bool)]
              if expectations is not None and len(expectations) else None)
    first_failed = failed.iloc[0] if failed is not None and len(failed) else None
    if not violations and first_failed is None:
        held = f" and all {len(expectations)} expectations" if expectations is not None and len(
            expectations) else ""
        return (f"<p class='ok verdict'>Verdict: every invariant{held} holds on every kernel "
                "at every step.</p>")
    if first_failed is not None and (not violations or first_failed["step"] < violations[0].step):
        return (f"<p class='bad verdict'>First failure: {_e(first_failed['message'])}"
                + (f" — {_e(first_failed['why'])}" if first_failed["why"] else "") + "</p>")
    v = violations[0]
    where = ", ".join(x for x in (
        f"kernel {v.kernel}", f"step {v.step}" + (f" ({v.action})" if v.action else ""),
        f"process {v.proc}" if v.proc else "", f"{v.map} page {v.page}" if v.map else "",
        f"folio {v.folio_pfn:#x}" if v.folio_pfn is not None else "") if x)
    detail = (f" {_e(v.field)}: expected {_e(v.expected)}, actual {_e(v.actual)}."
              if v.field else "")
    more = f" ({len(violations) - 1} more below)" if len(violations) > 1 else ""
    return (f"<p class='bad verdict'>First violation: <b>{_e(v.invariant)}</b> at "
            f"{_e(where)}: {_e(v.message)}.{detail}{more}</p>")


def _violation_rows(violations: Iterable) -> pd.DataFrame:
    rows = []
    for v in violations:
        if dataclasses.is_dataclass(v):
            rows.append(dataclasses.asdict(v))
        elif isinstance(v, Mapping):
            rows.append(dict(v))
        else:
            rows.append({"message": str(v)})
    cols = ["invariant", "kernel", "step", "action", "proc", "map", "page", "folio_pfn", "field",
            "expected", "actual", "message"]
    frame = pd.DataFrame(rows)
    return frame.reindex(columns=[c for c in cols if c in frame.columns] +
                         [c for c in frame.columns if c not in cols])


def _kernel_releases(timeline: pd.DataFrame, meta: Mapping) -> list[tuple[str, str]]:
    """(kernel, release) in order: from the timeline, else meta["kernels"]."""
    out: dict[str, str] = {}
    if "kernel" in timeline.columns:
        for k, g in timeline.groupby("kernel", sort=False):
            rel = g["kernel_release"].dropna() if "kernel_release" in g else []
            out[str(k)] = str(rel.iloc[0]) if len(rel) else ""
    for k, info in (meta.get("kernels") or {}).items():
        rel = info.get("release", "") if isinstance(info, Mapping) else str(info)
        if not out.get(k):
            out[k] = rel or ""
    return list(out.items())


def _summary(title: str, meta: Mapping, timeline: pd.DataFrame, steps: pd.DataFrame,
             complaints: pd.DataFrame, violations: Sequence) -> str:
    kernels = _kernel_releases(timeline, meta)
    colors = plots.kernel_colors(k for k, _ in kernels)
    scen = meta.get("scenario")
    if isinstance(scen, Mapping):
        scen_text = _e(scen.get("name") or "")
        if scen.get("title"):
            scen_text += f" — {_e(scen['title'])}"
        if scen.get("sha256"):
            scen_text += f" <small>(sha256 {_e(str(scen['sha256'])[:12])}…)</small>"
    else:
        scen_text = _e(scen if scen is not None else title)
    kernel_html = "<br>".join(
        f"<span class='chip' style='background:{colors[k]}'></span><b>{_e(k)}</b>"
        + (f": {_e(rel)}" if rel else "") for k, rel in kernels) or "–"
    n_steps = steps["step"].nunique() if "step" in steps.columns else 0
    n_pages = (len(timeline[["map", "page"]].drop_duplicates())
               if {"map", "page"} <= set(timeline.columns) else 0)
    n_complaints = len(complaints)
    items = [
        ("Scenario", scen_text),
        ("Kernels", kernel_html),
        ("Date", _e(meta.get("date", "unknown"))),
        ("Accelerator", _e(meta.get("accelerator", meta.get("accel", "unknown")))),
        ("Steps", f"{n_steps} (including the start), {n_pages} watched page(s)"),
        ("Invariants", "<span class='ok'>all hold</span>" if not violations
         else f"<span class='bad'>{len(violations)} violation(s)</span>"),
        ("Kernel complaints", "<span class='ok'>none</span>" if not n_complaints
         else f"<span class='bad'>{n_complaints}</span>"),
    ]
    return "<dl class='summary'>" + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in items) + "</dl>"


def _flatten(meta: Mapping, prefix: str = "") -> list[tuple[str, str]]:
    out = []
    for k in sorted(meta, key=str):
        v = meta[k]
        key = f"{prefix}{k}"
        if key in ("scenario.text",):
            continue
        if isinstance(v, Mapping):
            out.extend(_flatten(v, key + "."))
        else:
            out.append((key, json.dumps(v, default=str) if not isinstance(v, str) else v))
    return out


def _compact_timeline(timeline: pd.DataFrame) -> pd.DataFrame:
    cols = [c for c in TIMELINE_TABLE_COLUMNS if c in timeline.columns]
    t = timeline[cols].copy()
    for c in ("pfn", "folio_pfn"):
        if c in t.columns:
            t[c] = [("–" if _isnull(v) else f"{int(v):#x}") for v in t[c]]
    return t


_FIGURE_NOTES = {
    "counts": "Each line is one watched folio (watched pages of the same folio share it). "
              "Before the fix a device-dax fault maps the page with a devmap entry and takes "
              "no reference: the lines stay flat. After it, mapping takes a reference and a "
              "mapcount (for a PMD-mapped 2M folio, the folio's large_mapcount, not the "
              "page's own). Hover a point for every folio field; a red x marks a step where "
              "the guest kernel complained.",
    "page_table": "The entry that maps each watched page, in each process, after each step.",
    "device_summary": "Counts over every struct page of the device.",
    "device_heatmap": "Every device page near the watched ones (same color scale on every "
                      "kernel).",
    "events": "Every write that changed a watched counter, caught by a watchpoint while the "
              "step ran: each bar is one change, grouped under its step and named by its "
              "writer (the first function that is not atomic/page_ref plumbing). Hover a bar "
              "for the task, the writing function and, where asked for, the kernel stack.",
}


def _figures(timeline, steps, device, device_pages, complaints,
             events=None, violations=()) -> list[tuple[str, str, go.Figure]]:
    figs = []
    if events is not None and len(events):
        figs.append(("events", "Who changed the counters", plots.plot_events(events, steps)))
    if len(timeline):
        from .timeline import df_violations

        broken = df_violations(violations) if violations else None
        figs.append(("counts", "Folio refcount and mapcount",
                     plots.plot_counts(timeline, complaints, violations=broken)))
        figs.append(("page_table", "Page-table entries", plots.plot_page_table(timeline)))
    if device is not None and len(device):
        figs.append(("device_summary", "The whole device",
                     plots.plot_device_summary(device, steps)))
    if device_pages is not None and len(device_pages):
        figs.append(("device_heatmap", "Device page refcounts",
                     plots.plot_device_heatmap(device_pages, steps)))
    return figs


def _events_section(events, accounting, call_paths) -> list[str]:
    """Accounting verdict, call paths and every event (watches were armed)."""
    parts = ["<h2>Events: every change of the watched counters</h2>"]
    n = 0 if events is None else int((events["kind"] == "write").sum())
    lost, gone = accounting_problems(accounting)
    if len(gone):
        parts.append(f"<p class='bad'>{len(gone)} watched counter(s) are gone: their struct "
                     f"page was removed while watched (kind \"gone\").</p>" + _table(gone))
    if len(lost):
        parts.append(f"<p class='bad'>Accounting: {len(lost)} counter/step pair(s) changed by more "
                     f"than the recorded events (lost events, listed as kind \"lost\"):</p>"
                     + _table(lost))
    elif not len(gone):
        parts.append(f"<p class='ok'>Accounting holds: for every watched counter at every step, "
                     f"the value before the step plus the {n} recorded change(s) equals the value "
                     f"read at the snapshot after it.</p>")
    if call_paths is not None and len(call_paths):
        parts.append("<h3>Call paths</h3>" + _table(call_paths))
    if events is not None and len(events):
        cols = [c for c in ("kernel", "step", "seq", "kind", "pages", "field", "old", "new",
                            "delta", "writer", "function", "comm", "pid", "cpu", "source", "stack")
                if c in events.columns]
        parts.append(f"<details><summary>All {len(events)} events (events.parquet)</summary>"
                     f"{_table(events[cols])}</details>")
    return parts


def _signals_section(signals, kernel_messages, processes) -> list[str]:
    """Signals the guest processes received, the processes the kernel
    killed, the kernel's memory-management messages and the processes' RSS."""
    parts = ["<h2>Signals and memory-management messages</h2>"]
    if signals is not None and len(signals):
        killed = signals[~signals["survived"].fillna(False).astype(bool)]
        cls = "bad" if len(killed) else "ok"
        parts.append(f"<p class='{cls}'>{len(signals)} signal(s) reached guest processes, "
                     f"{len(killed)} of them ended the process (signals.parquet):</p>"
                     + _table(signals.drop(columns=["during", "sender"], errors="ignore")))
    else:
        parts.append("<p class='ok'>No guest process received a signal.</p>")
    if kernel_messages is not None and len(kernel_messages):
        parts.append(f"<p>The kernel reported {len(kernel_messages)} memory-management line(s) "
                     "(memory failure, hwpoison, OOM, page dumps, rss-counter), by the step "
                     "during which they appeared:</p>" + _table(kernel_messages))
    if processes is not None and len(processes):
        parts.append("<details><summary>RSS counters of every live process after every step "
                     f"(pages; processes.parquet, {len(processes)} rows)</summary>"
                     f"{_table(processes)}</details>")
    return parts


def build_report(
    out_dir: str | Path,
    *,
    title: str,
    scenario_text: str,
    meta: Mapping,
    timeline: pd.DataFrame,
    steps: pd.DataFrame,
    device: pd.DataFrame,
    device_pages: pd.DataFrame,
    complaints: pd.DataFrame,
    diff: pd.DataFrame | None = None,
    differences: Sequence[str] | None = None,
    violations: Sequence = (),
    events: pd.DataFrame | None = None,
    accounting: pd.DataFrame | None = None,
    call_paths: pd.DataFrame | None = None,
    signals: pd.DataFrame | None = None,
    kernel_messages: pd.DataFrame | None = None,
    processes: pd.DataFrame | None = None,
    expectations: pd.DataFrame | None = None,
) -> Path:
    """Write ``report.html`` into *out_dir* (one file, plotly.js inline
    once, opens offline) and return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    violations = list(violations)
    complaints = complaints if complaints is not None else pd.DataFrame(
        columns=["kernel", "step", "action", "kind", "text"])
    parts = [f"<h1>{_e(title)}</h1>", _verdict(violations, expectations),
             _summary(title, meta, timeline, steps, complaints, violations),
             "<h2>Scenario</h2>", f"<pre class='scenario'>{_e(scenario_text)}</pre>"]

    parts.append("<h2>What differs between the kernels</h2>")
    if differences:
        parts.append("<ul class='differences'>"
                     + "".join(f"<li>{_e(d)}</li>" for d in differences) + "</ul>")
    else:
        parts.append("<p>No comparison (one kernel, or no differences given).</p>")
    if diff is not None and len(diff):
        parts.append(f"<details><summary>Differing fields ({len(diff)} rows)</summary>"
                     f"{_table(diff)}</details>")

    parts.append("<h2>Invariants</h2>")
    if violations:
        parts.append(f"<p class='bad'>{len(violations)} invariant violation(s):</p>"
                     + _table(_violation_rows(violations)))
    else:
        parts.append("<p class='ok'>All invariants hold on every kernel at every step.</p>")

    if expectations is not None and len(expectations):
        parts.append("<h2>Expectations</h2>")
        n_bad = int((~expectations["passed"].fillna(False).astype(bool)).sum())
        parts.append(f"<p class='{'bad' if n_bad else 'ok'}'>{len(expectations) - n_bad} of "
                     f"{len(expectations)} hold.</p>" + _table(expectations.drop(
                         columns=["message"])))

    parts.append("<h2>Kernel complaints</h2>")
    if len(complaints):
        parts.append("<p class='bad'>The guest kernel printed these lines (WARN, BUG, Oops, "
                     "panic, Bad ...), by the step during which they appeared:</p>"
                     + _table(complaints.sort_values(["step", "kernel"], kind="stable")))
    else:
        parts.append("<p class='ok'>None: no kernel printed a warning, BUG, Oops or "
                     "\"Bad ...\" line.</p>")

    parts.extend(_signals_section(signals, kernel_messages, processes))
    if accounting is not None:
        parts.extend(_events_section(events, accounting, call_paths))
    figs = _figures(timeline, steps, device, device_pages, complaints, events, violations)
    for i, (key, heading, fig) in enumerate(figs):
        div = fig.to_html(full_html=False, include_plotlyjs=(i == 0), config=_PLOTLY_CONFIG,
                          div_id=f"fig-{key}", default_width="100%",
                          default_height=f"{fig.layout.height or 500}px")
        parts.append(f"<h2>{_e(heading)}</h2><p class='figure-note'>{_e(_FIGURE_NOTES[key])}"
                     f"</p><div class='figure'>{div}</div>")

    parts.append("<h2>Steps</h2>")
    parts.append(_table(steps) if len(steps) else "<p>No steps.</p>")
    parts.append("<h2>Timeline</h2>")
    parts.append(f"<details><summary>Every watched page in every process after every step "
                 f"({len(timeline)} rows; all columns in timeline.csv)</summary>"
                 f"{_table(_compact_timeline(timeline))}</details>")

    meta_rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in _flatten(meta))
    written = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    parts.append(f"<footer><p>Report written {_e(written)} by devdax-lab.</p>"
                 f"<table>{meta_rows}</table></footer>")

    return _write_page(out / REPORT_NAME, title, _CSS, parts)


def _write_page(path: Path, title: str, css: str, parts: Sequence[str]) -> Path:
    """One standalone HTML page of *parts* (already escaped HTML)."""
    doc = ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
           "<meta name='viewport' content='width=device-width, initial-scale=1'>"
           f"<title>{_e(title)}</title><style>{css}</style></head>"
           f"<body><main>{''.join(parts)}</main></body></html>\n")
    path.write_text(doc, encoding="utf-8")
    return path


SWEEP_PAGE = "sweep.html"
# Verdict colours of the sweep matrix (background, text).
_VERDICT_STYLE = {"holds": ("#d3f9d8", "#2b8a3e"), "fails": ("#ffe3e3", "#c92a2a"),
                  "untestable": ("#fff3bf", "#8a6d00"), "error": ("#e5dbff", "#5f3dc4"),
                  "stopped": ("#e9ecef", "#495057")}
_SWEEP_CSS = """
table.matrix { border-collapse: collapse; margin: 0.6em 0; }
table.matrix th, table.matrix td { border: 1px solid #ced4da; padding: 0.35em 0.8em;
                                   text-align: center; }
table.matrix th.scenario { text-align: left; }
table.matrix td a { color: inherit; text-decoration: none; font-weight: 600; }
table.matrix td small { display: block; font-weight: normal; }
"""


def build_sweep_page(out_dir: str | Path, summaries: Sequence[Mapping],
                     differences: Mapping[str, Sequence[str]], *, about: Mapping) -> Path:
    """Write ``sweep.html`` into *out_dir*: the scenario × kernel matrix of
    verdicts (holds, fails, untestable, error: coloured; each cell links to
    its report.html and says why when it does not hold), then per scenario
    what differs between the kernels (the sentences of ``compare``). One
    file, nothing fetched; returns its path."""
    out = Path(out_dir)
    kernels = list(dict.fromkeys(s["kernel"] for s in summaries))
    scenarios = list(dict.fromkeys(s["scenario"] for s in summaries))
    by_cell = {(s["scenario"], s["kernel"]): s for s in summaries}
    counts = {v: sum(s["verdict"] == v for s in summaries) for v in _VERDICT_STYLE}
    parts = [f"<h1>Sweep: {len(scenarios)} scenario(s) × {len(kernels)} kernel(s)</h1>",
             "<p>" + ", ".join(f"{n} {v}" for v, n in counts.items() if n) + "</p>"]
    head = "".join(f"<th>{_e(k)}</th>" for k in kernels)
    rows = []
    for scenario in scenarios:
        cells = []
        for k in kernels:
            s = by_cell.get((scenario, k))
            if s is None:
                cells.append("<td>–</td>")
                continue
            bg, fg = _VERDICT_STYLE.get(s["verdict"], _VERDICT_STYLE["error"])
            label = _e(s["verdict"])
            if s.get("report"):
                label = f"<a href='{_e(s['report'])}'>{label}</a>"
            why = s.get("first_failure") or s.get("reason")
            note = f"<small>{_e(why)}</small>" if why and s["verdict"] != "holds" else ""
            title = f"{s['scenario']} on {k}: {s['verdict']} (exit {s['status']})"
            cells.append(f"<td class='verdict-{_e(s['verdict'])}' style='background:{bg};"
                         f"color:{fg}' title='{_e(title)}'>{label}{note}</td>")
        rows.append(f"<tr><th class='scenario'>{_e(scenario)}</th>{''.join(cells)}</tr>")
    parts.append(f"<table class='matrix'><thead><tr><th>scenario</th>{head}</tr></thead>"
                 f"<tbody>{''.join(rows)}</tbody></table>")
    parts.append("<h2>What differs between the kernels</h2>")
    for scenario in scenarios:
        lines = differences.get(scenario)
        parts.append(f"<h3>{_e(scenario)}</h3>")
        if lines:
            parts.append("<ul class='differences'>"
                         + "".join(f"<li>{_e(d)}</li>" for d in lines) + "</ul>")
        else:
            parts.append("<p>No comparison: fewer than two kernels ran it to the end.</p>")
    table = pd.DataFrame([{k: v for k, v in s.items() if k not in ("console_tail", "spelling")}
                          for s in summaries])
    parts.append("<h2>Cells</h2>" + _table(table))
    about_rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in _flatten(about))
    parts.append(f"<footer><table>{about_rows}</table></footer>")
    return _write_page(out / SWEEP_PAGE, "sweep", _CSS + _SWEEP_CSS, parts)
