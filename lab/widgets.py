"""The notebook control panel: ipywidgets over a :class:`lab.api.Lab`.

House rule: the panel wires library calls together and holds no logic of its
own. Every button calls one :class:`~lab.api.Lab` method; the chart is
``lab.plot()`` and the table is ``lab.current()``, redrawn after each step.

    from lab import Lab
    lab = Lab.boot("after")
    lab.panel()                      # a panel over a live Lab

    from lab import Lab
    Lab.boot_panel("after")          # from nothing: pick a kernel, click Boot

Stable CSS classes (for browser tests): ``devdax-panel`` (the whole panel),
``devdax-kernel``, ``devdax-boot``, ``devdax-status``, ``devdax-action``,
``devdax-proc``, ``devdax-map``, ``devdax-pages``, ``devdax-write``,
``devdax-device``, ``devdax-length``, ``devdax-offset``, ``devdax-child``,
``devdax-pin``, ``devdax-pipe``, ``devdax-advice``, ``devdax-label``,
``devdax-run``, ``devdax-error``, ``devdax-chart``, ``devdax-table``.
"""

from __future__ import annotations

import html

import ipywidgets as w
import plotly.graph_objects as go

from . import columns
from .actions import REGISTRY, Field
from .guest import MADVISE
from .model import UserError

__all__ = ["ACTIONS", "TABLE_COLUMNS", "LabPanel"]

# Every action of the registry, in its order: the panel offers them all.
ACTIONS = tuple(REGISTRY)

# The columns of the table: folio, pgmap and page-table state of the latest step.
TABLE_COLUMNS = columns.names("panel")

_OWNER = "(owner)"  # the touch's process: the mapping's owner


def _classed(widget, css: str):
    widget.add_class(css)
    return widget


def _one_line(exc: BaseException) -> str:
    """An exception as one line: the message of a UserError, else its type and message."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    if isinstance(exc, UserError):
        return first or type(exc).__name__
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


class LabPanel:
    """Controls, a live refcount/mapcount chart and a state table over *lab*.

    With no Lab (or one that is not live), the panel starts with a kernel
    picker and a Boot button; booting (with *boot*, `Lab.boot` when the
    panel comes from `Lab.boot_panel`) replaces ``self.lab``. The panel
    imports nothing of the notebook API: it is handed a Lab, or a way to
    boot one.
    """

    def __init__(self, lab=None, *, kernel: str = "after", boot=None):
        self.lab = lab
        self._boot = boot
        self.last_error: str = ""

        # -- boot -------------------------------------------------------------
        self.kernel = _classed(w.Dropdown(options=["before", "after"], value=kernel,
                                          description="kernel"), "devdax-kernel")
        self.pud = _classed(w.Checkbox(value=False, description="add the 1G device",
                                       indent=False), "devdax-pud")
        self.boot_button = _classed(w.Button(description="Boot", button_style="primary",
                                             icon="play"), "devdax-boot")
        self.boot_button.on_click(self._on_boot)
        self.boot_box = _classed(w.HBox([self.kernel, self.pud, self.boot_button]),
                                 "devdax-bootbox")
        self.status = _classed(w.HTML(), "devdax-status")

        # -- actions ----------------------------------------------------------
        self.action = _classed(w.Dropdown(options=ACTIONS, value="touch", description="action"),
                               "devdax-action")
        self.action.observe(lambda _change: self._show_args(), names="value")
        self.device = _classed(w.Dropdown(options=["4K", "2M"], value="4K",
                                          description="device"), "devdax-device")
        # one widget per (action, field), made from the registry
        self.fields = {action: {f.name: _field_widget(f) for f in spec.fields
                                if f.kind != "name"}
                       for action, spec in REGISTRY.items()}
        self.label = _classed(w.Text(value="", description="label", placeholder="optional"),
                              "devdax-label")
        self.args_box = _classed(w.HBox(layout=w.Layout(flex_flow="row wrap")), "devdax-args")
        self.run_button = _classed(w.Button(description="Run", button_style="success",
                                            icon="step-forward"), "devdax-run")
        self.run_button.on_click(self._on_run)
        self.controls = _classed(w.VBox([w.HBox([self.action, self.run_button]),
                                         self.args_box]), "devdax-controls")
        self.error = _classed(w.HTML(), "devdax-error")

        # -- views ------------------------------------------------------------
        self.figure = go.FigureWidget(self._plot())
        self.figure.add_class("devdax-figure")
        self.chart = _classed(w.Box([self.figure], layout=w.Layout(width="100%")), "devdax-chart")
        self.table = _classed(w.HTML(layout=w.Layout(width="100%", overflow="auto")),
                              "devdax-table")

        self.widget = _classed(w.VBox([self.boot_box, self.status, self.controls, self.error,
                                       self.chart, self.table]), "devdax-panel")
        self._refresh()

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    # -- callbacks ----------------------------------------------------------------
    def _on_boot(self, _button=None) -> None:
        kernel = self.kernel.value
        self.boot_button.disabled = True
        self._set_status(f"booting {kernel}… (about 4 s under TCG)")
        self._set_error("")
        try:
            if self._boot is None:
                raise UserError("this panel cannot boot a kernel: open it with "
                                "Lab.boot_panel() or lab.panel()")
            self.lab = self._boot(kernel, pud=self.pud.value, say=self._set_status)
        except Exception as exc:  # noqa: BLE001 - every failure becomes one line in the panel
            self._set_error(_one_line(exc))
        finally:
            self.boot_button.disabled = False
        self._refresh()

    def _on_run(self, _button=None) -> None:
        self.run_button.disabled = True
        try:
            self.run(self.action.value)
        except Exception as exc:  # noqa: BLE001 - every failure becomes one line in the panel
            self._set_error(_one_line(exc))
        else:
            self._set_error("")
        finally:
            self.run_button.disabled = False
            self._refresh()

    @property
    def args(self) -> dict:
        """The argument widgets of the chosen action, by field name."""
        return self.fields.get(self.action.value, {})

    @property
    def pins(self) -> dict:
        return self.lab.pins if self.lab is not None and self.lab.live else {}

    @property
    def pipes(self) -> dict:
        return self.lab.pipes if self.lab is not None and self.lab.live else {}

    def run(self, action: str) -> None:
        """Take one step: ``lab.step(action, **values)`` with the argument
        widgets' values (raises what the Lab raises)."""
        lab = self.lab
        if lab is None or not lab.live:
            raise UserError("boot a kernel first (pick one and click Boot)")
        if action not in REGISTRY:
            raise UserError(f"unknown action {action!r}")
        values = {}
        for f in REGISTRY[action].fields:
            widget = self.fields[action].get(f.name)
            if widget is None:
                continue
            value = _widget_value(f, widget.value)
            if value is None and f.required:
                raise UserError(f"no {f.name} to choose yet: create one first")
            values[f.name] = value
        label = self.label.value or None
        if action == "mmap":
            lab.mmap(self.device.value, label=label, **values)
        else:
            lab.step(action, label=label, **values)

    # -- redrawing ----------------------------------------------------------------
    def _set_status(self, text: str) -> None:
        self.status.value = f"<span>{html.escape(str(text))}</span>"

    def _set_error(self, text: str) -> None:
        self.last_error = text
        self.error.value = ("" if not text else
                            f"<span style='color:#c00000;font-weight:600'>{html.escape(text)}"
                            "</span>")

    def _plot(self) -> go.Figure:
        fig = self.lab.plot() if self.lab is not None else go.Figure()
        # The panel is narrower than a report page: a short title that fits.
        return fig.update_layout(title_text="refcount and raw mapcount per step")

    def _refresh(self) -> None:
        """Show what the Lab holds now: boot or action controls, argument
        choices, chart and table."""
        lab = self.lab
        live = lab is not None and lab.live
        self.boot_box.layout.display = "none" if live else None
        self.controls.layout.display = None if live else "none"
        if live:
            steps = lab.steps
            last = (f"step {int(steps['step'].max())}: {steps.iloc[-1].get('detail', '')}"
                    if len(steps) else "no steps yet: map a device (action mmap)")
            self._set_status(f"{lab.kernel} ({lab.release}) — {last}")
            try:
                self._update_choices()
            except Exception as exc:  # noqa: BLE001 - e.g. the guest is gone
                self._set_error(_one_line(exc))
        elif lab is not None:
            self._set_status(f"{lab.kernel}: not live (boot a kernel to take steps)")
        elif not self.status.value:
            self._set_status("no kernel booted yet: pick one and click Boot")
        self._show_args()
        self._update_views()

    def _update_choices(self) -> None:
        lab = self.lab
        choices = {"proc": lab.live_processes(), "map": list(lab.mappings), "pin": list(self.pins),
                   "splice": list(self.pipes)}
        for action, widgets in self.fields.items():
            for f in REGISTRY[action].fields:
                widget = widgets.get(f.name)
                if f.kind in choices and isinstance(widget, w.Dropdown):
                    options = choices[f.kind]
                    if not f.required:
                        options = [_OWNER, *options]
                    _set_options(widget, options, prefer_last=f.kind != "proc")
                elif f.kind == "newproc":
                    widget.options = tuple(choices["proc"])
        _set_options(self.device, ["4K", "2M", "1G"] if self.pud.value else ["4K", "2M"])

    def _show_args(self) -> None:
        action = self.action.value
        extra = [self.device] if action == "mmap" else []
        self.args_box.children = [*extra, *self.fields.get(action, {}).values(), self.label]

    def _update_views(self) -> None:
        fig = self._plot()
        with self.figure.batch_update():
            self.figure.data = ()
            self.figure.add_traces(list(fig.data))
            self.figure.layout = fig.layout
        lab = self.lab
        if lab is None:
            self.table.value = ""
            return
        now = lab.current()
        cols = [c for c in TABLE_COLUMNS if c in now.columns]
        parts = []
        if len(now):
            step = int(now["step"].max())
            parts.append(f"<b>after step {step}</b>")
            shown = now[cols].astype(object).where(now[cols].notna(), "–")
            parts.append(shown.to_html(index=False, border=0, classes="devdax-state"))
            complaints = lab.complaints
            if len(complaints) and "step" in complaints.columns:
                here = complaints[complaints["step"] == step]
                if len(here):
                    parts.append("<b style='color:#c00000'>kernel complaints at this step</b>")
                    parts.append(here.to_html(index=False, border=0))
        else:
            parts.append("<i>no snapshot yet</i>")
        # Wide tables scroll inside the panel instead of being cut off.
        self.table.value = "<div style='overflow-x:auto'>" + "\n".join(parts) + "</div>"


def _set_options(dropdown, options, *, prefer_last: bool = False) -> None:
    """New choices for *dropdown*, keeping its value when it is still offered."""
    options, before = list(options), list(dropdown.options)
    old = dropdown.value
    if before != options:
        dropdown.options = options
    if prefer_last and options and options[-1] not in before:  # a new one: choose it
        dropdown.value = options[-1]
    elif old in options:
        dropdown.value = old
    elif options:
        dropdown.value = options[-1] if prefer_last else options[0]


def _field_widget(f: Field):
    """The widget of one action field (`lab.actions.Field.kind`)."""
    css = "devdax-pipe" if f.kind == "splice" else f"devdax-{f.name}"
    initial = f.example if f.required else f.default
    if f.kind in ("proc", "map", "pin", "splice"):
        options = [] if f.required else [_OWNER]
        widget = w.Dropdown(options=options, description=f.name)
    elif f.kind == "newproc":
        widget = w.Combobox(value=str(initial or ""), options=[], description=f.name,
                            placeholder="new or existing")
    elif f.kind == "bool":
        widget = w.Checkbox(value=bool(initial), description=f.name)
    elif f.kind == "advice":
        widget = w.Dropdown(options=list(MADVISE), value=initial, description=f.name)
    else:  # size, pages, prot, text
        widget = w.Text(value="" if initial is None else str(initial), description=f.name,
                        placeholder="to the end" if f.default is None else "")
    widget.tooltip = f.doc
    return _classed(widget, css)


def _widget_value(f: Field, value):
    """A widget's value as the Lab takes it (None: not given)."""
    if value in (None, _OWNER) or (isinstance(value, str) and not value.strip()):
        return None
    if f.kind == "pages":
        return [p.strip() if "-" in p else int(p) if p.strip().isdigit() else p.strip()
                for p in value.split(",") if p.strip()]
    return value.strip() if isinstance(value, str) else value
