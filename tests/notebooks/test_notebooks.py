"""Live: every notebook in notebooks/ runs top to bottom without an error.

Each jupytext source (``notebooks/NN-*.py``) is converted to .ipynb in a
temporary directory with ``jupytext --to ipynb`` and executed with nbclient
in a ``python3`` kernel of this venv, with the repository root as the
working directory (the notebooks boot real kernels in QEMU: minutes in all
under TCG). 04 gets its parameters injected after its ``parameters`` cell,
the way papermill does, with the output directory in the temporary directory.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from lab.paths import device_pages
from lab.procs import pid_alive
from lab.vm import RUN_PREFIX, run_parent
from lab.writeup import CFLAGS

pytestmark = pytest.mark.live

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]-*.py"))
CELL_TIMEOUT = 600


@pytest.fixture(autouse=True)
def venv_kernel(monkeypatch):
    """The ``python3`` kernelspec of this environment wins over a user's own
    (~/.local/share/jupyter), and the kernel runs this interpreter."""
    monkeypatch.setenv("JUPYTER_PREFER_ENV_PATH", "1")
    spec = KernelSpecManager().get_kernel_spec("python3")
    if spec.argv[0] not in ("python", "python3", sys.executable):
        pytest.fail(f"the python3 kernelspec runs {spec.argv[0]}, not this venv's {sys.executable}")


def _convert(source: Path, tmp: Path) -> Path:
    target = tmp / f"{source.stem}.ipynb"
    jupytext = Path(sys.executable).with_name("jupytext")
    cmd = [str(jupytext)] if jupytext.exists() else [sys.executable, "-m", "jupytext"]
    subprocess.run([*cmd, "--to", "ipynb", "-o", str(target), str(source)], check=True,
                   capture_output=True, text=True)
    return target


def _inject(nb, **params) -> None:
    """Papermill's way: a cell tagged injected-parameters after the cell
    tagged parameters."""
    index = next((i for i, c in enumerate(nb.cells)
                  if "parameters" in c.get("metadata", {}).get("tags", [])), None)
    assert index is not None, "the notebook has no cell tagged parameters"
    source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(index + 1, cell)


def _outputs(nb) -> list[dict]:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def _text(output) -> str:
    if output.get("output_type") == "stream":
        return output.get("text", "")
    if output.get("output_type") == "error":
        return f"{output.get('ename')}: {output.get('evalue')}"
    return str(output.get("data", {}).get("text/plain", ""))


def _run(path: Path, nb=None):
    """Execute *path* (or the already-read *nb*) in the repo root; the
    executed notebook and the kernel's pid."""
    nb = nb or nbformat.read(path, as_version=4)
    pids: list[int] = []
    client = NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}})
    client.on_notebook_start = lambda **_: pids.append(client.km.provisioner.pid)
    try:
        client.execute()
    except CellExecutionError as exc:
        pytest.fail(f"{path.name}: a cell failed:\n{exc}", pytrace=False)
    finally:
        nbformat.write(nb, path)  # executed copy, for a look after a failure
    errors = [_text(o) for o in _outputs(nb) if o.get("output_type") == "error"]
    assert not errors, f"{path.name}: error outputs: {errors}"
    tracebacks = [o["text"] for o in _outputs(nb)
                  if o.get("output_type") == "stream" and o.get("name") == "stderr"
                  and "Traceback" in o.get("text", "")]
    assert not tracebacks, f"{path.name}: tracebacks on stderr: {tracebacks}"
    return nb, (pids[0] if pids else None)


def _qemu_of(owner_pid: int) -> list[int]:
    """QEMU pids of the run directories *owner_pid* made."""
    out = []
    for d in run_parent().glob(RUN_PREFIX + "*"):
        try:
            if int((d / "owner.pid").read_text()) == owner_pid:
                out.append(int((d / "qemu.pid").read_text()))
        except (OSError, ValueError):
            pass
    return out


def test_notebooks_are_found():
    names = [p.stem for p in NOTEBOOKS]
    assert names == ["00-quickstart", "01-before-vs-after", "02-huge-pages", "03-gup-pinning",
                     "04-bug-writeup", "05-onboarding-tour", "06-who-took-the-reference"]


# What a reader who knows the kernels would predict in 05's tour (lab/tour.py
# holds the explanations; the notebook holds no answers).
TOUR_PREDICTIONS = {
    "pgmap_ref": device_pages("4K") + 1, "refcount": 2, "mapcount": 0, "pt_level": "PTE",
    "pt_devmap": None, "rss_file_change": 4, "refcount_after_fork": 2,
    "refcount_two_mappings": 3, "mapcount_two_mappings": 1, "refcount_pinned": 3 + 1024,
    "pgmap_ref_pinned": device_pages("4K") + 1, "refcount_unpinned": 3,
    "refcount_b_exited": 2, "refcount_unmapped": 1, "mapcount_unmapped": -1,
    "mapping_kept": True,
    "before_refcount": 1, "before_mapcount": -1, "before_pt_devmap": True,
    "before_pt_special": True, "before_rss_file_change": 0,
}


@pytest.mark.parametrize("source", [p for p in NOTEBOOKS if p.stem != "04-bug-writeup"],
                         ids=lambda p: p.stem)
def test_notebook_runs(source, tmp_path):
    path = _convert(source, tmp_path)
    nb = None
    if source.stem == "05-onboarding-tour":
        nb = nbformat.read(path, as_version=4)
        _inject(nb, predictions=TOUR_PREDICTIONS)
    nb, kernel_pid = _run(path, nb)
    text = "\n".join(_text(o) for o in _outputs(nb))
    if source.stem == "00-quickstart":
        last = [o for o in nb.cells[-1].get("outputs", []) if o.get("output_type") in
                ("display_data", "execute_result")]
        assert last and "application/vnd.jupyter.widget-view+json" in last[-1]["data"], \
            "the last cell of 00 shows no widget (lab.panel())"
        # 00 leaves its Lab open: QEMU must die with the kernel (pdeathsig)
        assert kernel_pid is not None
        deadline = time.monotonic() + 15
        while any(pid_alive(p) for p in _qemu_of(kernel_pid)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(pid_alive(p) for p in _qemu_of(kernel_pid)), \
            "QEMU outlived the notebook's kernel"
    if source.stem == "02-huge-pages":
        # VM_NOHUGEPAGE on the 2M device: the PTE fallback SIGBUSes
        assert "SIGBUS" in text and "VM_NOHUGEPAGE" in text, text
        # the PUD's RssFile, then the pagemap read zapping it
        assert "RssFile after the fault: 1048576 KiB" in text, text
        assert "pagemap says present: False" in text, text
        assert "RssFile after reading pagemap: 0 KiB" in text, text
    if source.stem == "05-onboarding-tour":
        assert "prediction missed" not in text, text
        assert text.count("prediction held") == len(TOUR_PREDICTIONS), text
        notebook_text = source.read_text()
        assert "predict_" not in notebook_text, "05 holds answers in predict_* cells again"


def test_bug_writeup_with_parameters(tmp_path):
    path = _convert(ROOT / "notebooks" / "04-bug-writeup.py", tmp_path)
    nb = nbformat.read(path, as_version=4)
    out = tmp_path / "writeup"
    _inject(nb, scenario="scenarios/fork-share.toml", kernels="before,after", out=str(out))
    nb, _ = _run(path, nb)
    assert (out / "report.html").stat().st_size > 0
    assert (out / "timeline.parquet").exists()
    meta = json.loads((out / "meta.json").read_text())
    assert set(meta["kernels"]) == {"before", "after"}
    assert meta["scenario"]["name"] == "fork-share"
    assert {"qemu", "drgn", "python", "date"} <= set(meta)
    # the write-up: report.txt as the mailing list gets it, repro.c that builds
    report = (out / "report.txt").read_text()
    assert report.startswith("Subject: [devdax-lab] fork-share")
    assert max(len(line) for line in report.splitlines()) <= 80
    assert "Who changed the counters (watchpoints)" in report  # the run watched them
    assert (out / "events.parquet").exists()
    binary = tmp_path / "repro"
    subprocess.run(["gcc", *CFLAGS, "-o", str(binary), str(out / "repro.c")], check=True)
    text = "\n".join(_text(o) for o in _outputs(nb))
    for heading in ("Summary", "Expected vs actual", "Steps", "Evidence", "Reproducer",
                    "Environment"):
        assert any(c.cell_type == "markdown" and c.source.startswith(f"## {heading}")
                   for c in nb.cells), heading
    assert "Subject: [devdax-lab] fork-share" in text and "every invariant the lab checks" in text


def test_panel_steps_and_errors_headless():
    """The panel without a browser: boot from the panel, steps from its
    widgets, a mistake as one line and the panel still usable after it."""
    from lab import Lab

    panel = Lab.boot_panel("after")
    assert panel.controls.layout.display == "none"
    panel.run_button.click()  # nothing booted: one line, no exception
    assert "boot" in panel.last_error
    panel.boot_button.click()
    try:
        assert panel.lab is not None and panel.lab.live, panel.last_error
        assert panel.boot_box.layout.display == "none"
        panel.action.value = "mmap"
        panel.run_button.click()
        assert panel.last_error == ""
        panel.action.value = "touch"
        assert panel.args["map"].value == "m1"
        panel.args["pages"].value = "0, 3-4"
        panel.run_button.click()
        assert panel.last_error == ""
        assert sorted(panel.lab.current()["page"]) == [0, 3, 4]
        assert {t.meta["kind"] for t in panel.figure.data} >= {"refcount", "mapcount"}
        assert "<table" in panel.table.value
        panel.args["pages"].value = "99"
        panel.run_button.click()
        assert "99" in panel.last_error and "\n" not in panel.last_error
        assert "color" in panel.error.value
        panel.action.value = "fork"
        panel.run_button.click()
        assert panel.last_error == ""
        panel.action.value = "touch"
        assert list(panel.args["proc"].options)[1:] == ["a", "b"]
        panel.args["proc"].value = "b"
        panel.args["pages"].value = "3"
        panel.run_button.click()
        assert panel.last_error == ""
        row = panel.lab.current().query("page == 3 and proc == 'b'").iloc[0]
        assert (row["refcount"], row["mapcount"]) == (3, 1)
        panel.action.value = "pin"
        panel.args["length"].value = "4K"
        panel.run_button.click()
        panel.action.value = "unpin"
        assert panel.args["pin"].value
        panel.run_button.click()
        assert panel.last_error == "" and not panel.pins
        steps = len(panel.lab.steps)
        panel.action.value = "munmap"
        panel.args["length"].value = "not a size"
        panel.run_button.click()
        assert "length" in panel.last_error and "is not a size" in panel.last_error
        assert len(panel.lab.steps) == steps
        assert not panel.run_button.disabled
    finally:
        if panel.lab is not None:
            panel.lab.close()
