"""lab.jupyter: the JupyterLab server's whole life (start, token, stop, no
process or directory left), its failures, and the jupytext conversion. Real
JupyterLab servers on 127.0.0.1 (about 2 s each), no VM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from lab.jupyter import JupyterServer, JupyterStartError, notebook_ipynb, resolve_notebook
from lab.model import UserError
from lab.procs import wait_gone

REPO = Path(__file__).resolve().parents[2]


def _processes_mentioning(text: str) -> list[int]:
    """Pids whose command line or environment mention *text* (kernels carry
    their connection file from the runtime dir, the server its config dir)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            blob = (d / "cmdline").read_bytes() + (d / "environ").read_bytes()
        except OSError:
            continue
        if text.encode() in blob:
            pids.append(int(d.name))
    return pids


def _gone(pid: int, timeout: float = 5.0) -> bool:
    return wait_gone(pid, timeout)


def _get(url: str, token: str | None = None) -> int:
    headers = {"Authorization": f"token {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _post(server: JupyterServer, path: str, body: dict) -> dict:
    req = urllib.request.Request(f"{server.base_url}api/{path}", data=json.dumps(body).encode(),
                                 method="POST", headers={"Authorization": f"token {server.token}",
                                                         "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_server_answers_with_its_token_and_leaves_nothing(tmp_path):
    (tmp_path / "nb").mkdir()
    t0 = time.monotonic()
    with JupyterServer(tmp_path, open_path="nb/x y.ipynb") as server:
        started = time.monotonic() - t0
        pid, tmp = server.proc.pid, server.tmp
        assert server.running and tmp.is_dir()
        assert server.api("status")["started"]
        assert _get(f"{server.base_url}api/status", server.token) == 200
        assert _get(f"{server.base_url}api/status") == 403           # no token, no entry
        assert _get(f"{server.base_url}api/status", "wrong") == 403
        assert server.url == (f"http://127.0.0.1:{server.port}/lab/tree/nb/x%20y.ipynb"
                              f"?token={server.token}")
        assert len(server.token) >= 32
        # 127.0.0.1 only: nothing answers on another address of this machine.
        listening = Path("/proc/net/tcp").read_text() + Path("/proc/net/tcp6").read_text()
        port_hex = f":{server.port:04X} "
        local = [line.split()[1] for line in listening.splitlines() if port_hex in line
                 and line.split()[3] == "0A"]
        assert local and all(a.startswith("0100007F:") for a in local), local
        # The token is in the environment, not on the command line.
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert server.token.encode() not in cmdline
        assert b"--ServerApp.ip=127.0.0.1" in cmdline
        assert (b"--allow-root" in cmdline) == (os.geteuid() == 0)
        # The news pop-up and the extension manager are off.
        req = urllib.request.Request(
            f"{server.base_url}lab/api/settings/@jupyterlab/apputils-extension:notification",
            headers={"Authorization": f"token {server.token}"})
        with urllib.request.urlopen(req, timeout=5) as r:
            schema = json.loads(r.read())["schema"]["properties"]
        assert schema["fetchNews"]["default"] == "false"
        # A kernel started through the server goes with it.
        kernel = _post(server, "kernels", {"name": "python3"})
        assert kernel["id"]
        time.sleep(0.5)
        kernels = [p for p in _processes_mentioning(str(tmp / "runtime")) if p != pid]
        assert kernels, "the kernel process was not found"
    assert started < 30
    assert not server.running and server.proc is None
    assert _gone(pid) and all(_gone(k) for k in kernels)
    assert not tmp.exists()
    assert _processes_mentioning(str(tmp)) == []
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{server.base_url}api/status", timeout=2)


def test_a_taken_port_is_a_named_error_with_the_log(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        server = JupyterServer(tmp_path, port=port, start_timeout=30)
        with pytest.raises(JupyterStartError) as info:
            server.start()
    err = info.value
    assert "exited with status" in str(err)
    assert any(str(port) in line for line in err.log_tail), err.log_tail
    assert "jupyterlab" in " ".join(err.command) and f"--ServerApp.port={port}" in err.command
    assert server.proc is None and server.tmp is None


def test_a_timeout_is_a_named_error_and_kills_the_server(tmp_path):
    server = JupyterServer(tmp_path, start_timeout=0.3)
    with pytest.raises(JupyterStartError, match="did not answer /api/status within 0.3 s"):
        server.start()
    assert server.proc is None and server.tmp is None


def test_server_dies_with_its_owner_and_the_next_start_sweeps_its_dir(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        sys.path.insert(0, {str(REPO)!r})
        from lab.jupyter import JupyterServer
        s = JupyterServer(Path({str(tmp_path)!r})).__enter__()
        print(s.proc.pid, s.tmp, flush=True)
        time.sleep(600)
    """)
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pid, tmp = owner.stdout.readline().split()
        pid, tmp = int(pid), Path(tmp)
        assert Path(f"/proc/{pid}").exists()
    finally:
        owner.send_signal(signal.SIGKILL)  # no chance to clean up
        owner.wait()
    assert _gone(pid), "the server outlived its owner"
    assert tmp.exists()
    with JupyterServer(tmp_path) as server:
        assert not tmp.exists(), "a stale directory was not swept"
        assert server.tmp.exists()


def test_cli_notebook_prints_the_url_and_stops_on_ctrl_c(tmp_path):
    cmd = [sys.executable, "-m", "lab.cli", "notebook", "--no-open"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("Ctrl-C"):
                break
        text = "".join(lines)
        url = next(w for w in text.split() if w.startswith("http://127.0.0.1:"))
        port = int(url.split(":")[2].split("/")[0])
        token = url.split("token=")[1]
        assert f"ssh -L 8888:127.0.0.1:{port} " in text
        assert _get(f"http://127.0.0.1:{port}/api/status", token) == 200
        server_pid = int(text.split("(pid ")[1].split(")")[0])
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    assert "stopping JupyterLab" in out
    assert _gone(server_pid)


def test_notebook_ipynb_converts_unpaired_and_keeps_newer_work(tmp_path):
    src = tmp_path / "00-demo.py"
    src.write_text(textwrap.dedent("""\
        # ---
        # jupyter:
        #   jupytext:
        #     formats: ipynb,py:percent
        #     text_representation:
        #       extension: .py
        #       format_name: percent
        #   kernelspec:
        #     display_name: Python 3
        #     language: python
        #     name: python3
        # ---

        # %% [markdown]
        # # Demo

        # %%
        x = 1 + 1
        x
    """))
    path, written = notebook_ipynb(src)
    assert written and path == tmp_path / "00-demo.ipynb"
    nb = json.loads(path.read_text())
    assert [c["cell_type"] for c in nb["cells"]] == ["markdown", "code"]
    assert "formats" not in nb["metadata"].get("jupytext", {})  # saving never rewrites the .py
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    # The user's executed copy (newer than the .py) is kept...
    path.write_text(path.read_text().replace("1 + 1", "2 + 2"))
    assert notebook_ipynb(src) == (path, False)
    assert "2 + 2" in path.read_text()
    # ...until the .py changes, or on request.
    assert notebook_ipynb(src, force=True)[1]
    assert "1 + 1" in path.read_text()
    os.utime(path, (1, 1))
    assert notebook_ipynb(src)[1]
    assert not list(tmp_path.glob(".*.tmp"))
    # A .py with no header gets the lab's kernel (else JupyterLab asks for one).
    bare = tmp_path / "01-bare.py"
    bare.write_text("# %%\nx = 1\n")
    nb = json.loads(notebook_ipynb(bare)[0].read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "python3"


def test_resolve_notebook(tmp_path):
    (tmp_path / "00-quickstart.py").write_text("# %%\n")
    (tmp_path / "04-bug-writeup.py").write_text("# %%\n")
    assert resolve_notebook(tmp_path, "00-quickstart") == tmp_path / "00-quickstart.py"
    assert resolve_notebook(tmp_path, "04") == tmp_path / "04-bug-writeup.py"
    assert resolve_notebook(tmp_path, str(tmp_path / "04-bug-writeup.py")).name == "04-bug-writeup.py"
    with pytest.raises(UserError, match="known: 00-quickstart, 04-bug-writeup"):
        resolve_notebook(tmp_path, "nope")
