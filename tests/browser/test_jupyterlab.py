"""Live, in a browser: notebooks/00-quickstart in JupyterLab, driven like a
user would. Debian's Chromium (the ``chromium`` fixture of tests/conftest.py) opens
the notebook served by ``lab.jupyter.JupyterServer``, runs every cell (which
boots the ``after`` kernel in QEMU), reads the panel's chart, faults another
page from the panel and checks that the chart moved and nothing failed.

The notebook is converted into ``test-output/jupyterlab/`` (a user's own
``notebooks/00-quickstart.ipynb`` is left alone); screenshots land in
``test-output/``, and with DEVDAX_LAB_DOCS_IMAGES=1 the panel's also in
docs/img/panel.png, the one the README shows.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from lab.jupyter import JupyterServer, notebook_ipynb
from lab.procs import wait_gone

pytestmark = pytest.mark.live

REPO = Path(__file__).resolve().parents[2]
SOURCE = REPO / "notebooks" / "00-quickstart.py"
OUT = REPO / "test-output"
WORK = OUT / "jupyterlab"
DOCS_IMG = REPO / "docs" / "img" if os.environ.get("DEVDAX_LAB_DOCS_IMAGES") else None

RUN_ALL_TIMEOUT = 300.0  # boot under TCG (~4 s), drgn, first steps, widgets
STEP_TIMEOUT = 120.0

# Every trace of the panel's chart: name, kind (plots.plot_counts puts it in
# meta), number of points and values. plotly 6+ ships arrays base64-encoded,
# so the sizes come from plotly.js's own _fullData, not from el.data.
CHART_JS = """() => {
    const el = document.querySelector('.devdax-chart .js-plotly-plot');
    if (!el || !el._fullData) return null;
    return el._fullData.map(t => ({name: t.name, kind: (t.meta || {}).kind || null,
                                   n: t._length || 0, y: Array.from(t.y || [])}));
}"""

# Text of every stderr / error output in the notebook (JupyterLab renders
# tracebacks with the stderr MIME type).
STDERR_JS = """() => Array.from(document.querySelectorAll(
    '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'))
    .map(e => e.innerText)"""


def _refcount(chart) -> list[dict]:
    return [t for t in chart or [] if t["kind"] == "refcount"]


def _tracebacks(page) -> list[str]:
    return [t for t in page.evaluate(STDERR_JS) if "Traceback" in t or "Error" in t]


def _wait(page, what: str, check, timeout: float, interval: float = 0.5):
    """Poll *check* until it returns something true; fail early, with the
    notebook's own traceback, if a cell failed."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        errors = _tracebacks(page)
        dialogs = _dialogs(page)
        if dialogs:
            page.screenshot(path=str(OUT / "jupyterlab-failed.png"))
            pytest.fail(f"JupyterLab shows a dialog while waiting for {what}: {dialogs}")
        if errors:
            page.screenshot(path=str(OUT / "jupyterlab-failed.png"))
            pytest.fail(f"a cell failed while waiting for {what}:\n" + "\n---\n".join(errors))
        if time.monotonic() > deadline:
            page.screenshot(path=str(OUT / "jupyterlab-failed.png"))
            pytest.fail(f"no {what} after {timeout:g} s (see test-output/jupyterlab-failed.png)")
        page.wait_for_timeout(interval * 1000)


def _dialogs(page) -> list[str]:
    return page.evaluate("() => Array.from(document.querySelectorAll('.jp-Dialog'))"
                         ".map(d => d.innerText)")


def _kernel_idle(page) -> bool:
    """A kernel is attached, started and idle, and no cell waits to run."""
    return page.evaluate("""() => {
        const name = document.querySelector('.jp-NotebookPanel-toolbar .jp-KernelName');
        const s = document.querySelector('.jp-Notebook-ExecutionIndicator');
        const status = document.querySelector('.jp-StatusBar-Widget')
            ? document.querySelector('#jp-main-statusbar').innerText : '';
        const queued = Array.from(document.querySelectorAll('.jp-InputPrompt'))
            .some(p => p.innerText.includes('*'));
        return !!(name && !name.innerText.includes('No Kernel') && s &&
                  s.dataset.status === 'idle' && status.includes('| Idle') && !queued);
    }""")


def _show_panel(page) -> None:
    page.locator(".devdax-panel").scroll_into_view_if_needed()
    page.wait_for_timeout(500)


def test_quickstart_runs_and_its_panel_faults_another_page(chromium):
    if not SOURCE.exists():
        pytest.skip(f"{SOURCE.relative_to(REPO)} does not exist yet")
    OUT.mkdir(exist_ok=True)
    ipynb, _ = notebook_ipynb(SOURCE, WORK / "00-quickstart.ipynb", force=True)
    times = {}
    t0 = time.monotonic()
    with JupyterServer(REPO, open_path=ipynb.relative_to(REPO).as_posix()) as server:
        times["server"] = time.monotonic() - t0
        page = chromium.new_page(viewport={"width": 1400, "height": 1100})
        console_errors: list[str] = []
        page.on("pageerror", lambda exc: console_errors.append(str(exc)))
        page.goto(server.url)
        page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=60_000)
        _wait(page, "idle kernel", lambda: _kernel_idle(page), 60)
        times["open"] = time.monotonic() - t0

        # Run -> Run All Cells, as a user would.
        page.click(".lm-MenuBar-itemLabel:text-is('Run')")
        page.click(".lm-Menu-itemLabel:text-is('Run All Cells')")
        _wait(page, "panel (.devdax-run)", lambda: page.locator(".devdax-run").count(),
              RUN_ALL_TIMEOUT)
        before = _wait(page, "chart with refcount points",
                       lambda: _refcount(page.evaluate(CHART_JS)), 60)
        _wait(page, "idle kernel after Run All", lambda: _kernel_idle(page), 60)
        times["run_all"] = time.monotonic() - t0
        _show_panel(page)
        page.screenshot(path=str(OUT / "jupyterlab-run-all.png"))
        before = _refcount(page.evaluate(CHART_JS))
        points_before = sum(t["n"] for t in before)
        assert points_before >= 1

        # The panel: touch page 3 of the mapping the notebook made.
        page.select_option(".devdax-action select", "touch")
        pages = page.locator(".devdax-pages input")
        pages.fill("3")
        pages.press("Tab")
        page.wait_for_timeout(300)  # let the widget model sync
        t1 = time.monotonic()
        page.click(".devdax-run")

        def moved():
            now = _refcount(page.evaluate(CHART_JS))
            run = page.locator(".devdax-run")
            if now == before or run.is_disabled():
                return None
            return now

        after = _wait(page, "change in the chart after Run", moved, STEP_TIMEOUT)
        times["panel_step"] = time.monotonic() - t1
        page.wait_for_timeout(500)
        after = _refcount(page.evaluate(CHART_JS))
        _show_panel(page)
        page.screenshot(path=str(OUT / "jupyterlab-panel-touch.png"))
        page.locator(".devdax-panel").screenshot(path=str(OUT / "jupyterlab-panel.png"))
        if DOCS_IMG:
            DOCS_IMG.mkdir(parents=True, exist_ok=True)
            shutil.copy(OUT / "jupyterlab-panel-touch.png", DOCS_IMG / "panel.png")

        points_after = sum(t["n"] for t in after)
        assert points_after > points_before, (before, after)
        assert len(after) > len(before), f"no line for the newly faulted page: {after}"
        assert any("page 3" in t["name"] for t in after), [t["name"] for t in after]
        error_text = page.locator(".devdax-error").inner_text().strip()
        assert error_text == "", f"the panel shows an error: {error_text}"
        assert _tracebacks(page) == []
        assert not console_errors, console_errors
        kernel_pids = _kernel_pids(server)
        assert kernel_pids, "no kernel process found"
        vm_pids = [c for k in kernel_pids for c in _children(k)]
    # The server is gone: its kernels, and the VM that went with them.
    assert all(_gone(p) for p in kernel_pids + vm_pids), "a kernel or its VM outlived the server"
    times["total"] = time.monotonic() - t0
    print("\ntimes (s): " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()))
    print(f"refcount points: {points_before} -> {points_after}; "
          f"lines: {[t['name'] for t in after]}")


def _kernel_pids(server: JupyterServer) -> list[int]:
    """The kernels' pids: processes whose command line names the server's
    private runtime dir (their connection file)."""
    needle = str(server.tmp / "runtime").encode()
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if needle in (d / "cmdline").read_bytes() and int(d.name) != server.proc.pid:
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def _gone(pid: int, timeout: float = 15.0) -> bool:
    return wait_gone(pid, timeout)
