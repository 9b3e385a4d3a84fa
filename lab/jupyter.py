"""The one owner of a JupyterLab server process.

    with JupyterServer(repo, open_path="notebooks/00-quickstart.ipynb") as server:
        print(server.url)       # http://127.0.0.1:PORT/lab/tree/notebooks/...?token=...

The server listens on 127.0.0.1 only, with a random token (passed through the
environment, never on a command line other users can read), and private
config, data and runtime directories in a temporary directory, so nothing of
the user's ``~/.jupyter`` (or another server's state) leaks in or out. The
news pop-up and the extension manager (both would reach the network) are off.
It runs under ``setpriv --pdeathsig KILL`` in its own session: it dies with
the Python process even on SIGKILL, and a terminal's Ctrl-C reaches Python
only, which then stops the server in order (SIGTERM, so it shuts its kernels
down; SIGKILL after a grace period). Its kernels watch their parent and exit
with it; a notebook's VM dies with its kernel.

The notebooks in ``notebooks/`` are jupytext percent files (``.py``);
``notebook_ipynb`` writes the ``.ipynb`` JupyterLab opens (gitignored, not
paired: saving in JupyterLab never rewrites the ``.py``).
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Self

from .errors import LabFailure
from .model import UserError
from .procs import pid_alive, terminate

__all__ = ["JupyterServer", "JupyterStartError", "notebook_ipynb", "resolve_notebook"]

# Settings every server starts with: JupyterLab's defaults, overridden.
SETTING_OVERRIDES = {
    # No "would you like to receive Jupyter news?" toast, no news fetch.
    "@jupyterlab/apputils-extension:notification": {"fetchNews": "false",
                                                    "checkForUpdates": False},
    # The extension manager searches PyPI: no network from the lab.
    "@jupyterlab/extensionmanager-extension:plugin": {"enabled": False},
}


TMP_PREFIX = "devdax-lab-jupyter-"

# The kernel of the server's own Python (ipykernel's built-in "python3").
KERNELSPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}


class JupyterStartError(LabFailure):
    """The server exited or did not answer in time; carries the command and
    the last lines of its log."""

    def __init__(self, message: str, command: list[str], log_tail: list[str]):
        self.command = command
        self.log_tail = log_tail
        tail = "\n".join(f"  | {line}" for line in log_tail) or "  | (no output)"
        super().__init__(f"{message}\ncommand: {' '.join(command)}\nlast lines of its log:\n{tail}")


def resolve_notebook(notebooks: Path, name: str) -> Path:
    """The jupytext source of notebook *name*: "00-quickstart", "00", or a path."""
    p = Path(name)
    candidates = [p, p.with_suffix(".py"), notebooks / p.name, (notebooks / p.name).with_suffix(".py")]
    for c in candidates:
        if c.suffix == ".py" and c.is_file():
            return c
    found = sorted(notebooks.glob(f"{p.stem}*.py"))
    if len(found) == 1:
        return found[0]
    known = ", ".join(sorted(x.stem for x in notebooks.glob("*.py"))) or "none"
    raise UserError(f"no notebook {name!r} in {notebooks} (known: {known})")


def notebook_ipynb(source: Path, target: Path | None = None, *,
                   force: bool = False) -> tuple[Path, bool]:
    """Write *target* (default: ``source.ipynb`` next to it) from the jupytext
    file *source*; returns (path, written). An existing .ipynb newer than
    *source* is kept (it may hold the user's work and outputs) unless *force*.
    The copy is not paired with the .py: jupytext pairing metadata is dropped."""
    try:
        import jupytext
    except ImportError as exc:
        raise UserError("jupytext is missing: `make setup` installs it "
                        "(or .venv/bin/pip install jupytext)") from exc

    source = Path(source)
    target = Path(target) if target is not None else source.with_suffix(".ipynb")
    if (not force and target.exists()
            and target.stat().st_mtime >= source.stat().st_mtime):
        return target, False
    nb = jupytext.read(source)
    nb.metadata.get("jupytext", {}).pop("formats", None)
    # With no kernelspec JupyterLab asks which kernel to start: the lab's own.
    nb.metadata.setdefault("kernelspec", dict(KERNELSPEC))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(jupytext.writes(nb, fmt="ipynb"), encoding="utf-8")
    os.replace(tmp, target)
    return target, True


class JupyterServer:
    """A JupyterLab server on 127.0.0.1 serving *root*; a context manager."""

    def __init__(self, root: Path, *, port: int | None = None, token: str | None = None,
                 open_path: str | None = None, start_timeout: float = 60.0,
                 echo=None):
        self.root = Path(root).resolve()
        self.requested_port = port
        self.token = token or _random_token()
        self.open_path = open_path
        self.start_timeout = start_timeout
        self.echo = echo  # called with each log line (e.g. print), or None
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.tmp: Path | None = None
        self.command: list[str] = []
        self.tail: collections.deque[str] = collections.deque(maxlen=40)
        self._reader: threading.Thread | None = None

    # -- addresses -----------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    @property
    def url(self) -> str:
        """The address to open, token included (the notebook when *open_path*)."""
        path = "lab/tree/" + urllib.parse.quote(self.open_path) if self.open_path else "lab"
        return f"{self.base_url}{path}?token={self.token}"

    def api(self, path: str, timeout: float = 5.0) -> dict:
        """GET /api/<path> with the token; the decoded JSON."""
        req = urllib.request.Request(f"{self.base_url}api/{path.lstrip('/')}",
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    # -- lifecycle -------------------------------------------------------------
    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _argv(self) -> list[str]:
        argv = [sys.executable, "-m", "jupyterlab",
                "--no-browser",
                "--ServerApp.ip=127.0.0.1",
                f"--ServerApp.port={self.requested_port or 0}",
                "--ServerApp.port_retries=0",
                f"--ServerApp.root_dir={self.root}",
                ]
        if os.geteuid() == 0:
            argv.append("--allow-root")
        return argv

    def launch_command(self) -> list[str]:
        """What :meth:`start` runs: JupyterLab under ``setpriv --pdeathsig``
        (its token goes in the environment, not here)."""
        return ["setpriv", "--pdeathsig", "KILL", "--", *self._argv()]

    def _environment(self) -> dict[str, str]:
        assert self.tmp is not None
        env = dict(os.environ)
        for var in ("JUPYTER_TOKEN_FILE", "JUPYTER_PORT", "JUPYTER_PORT_RETRIES",
                    "JUPYTERLAB_SETTINGS_DIR", "JUPYTERLAB_WORKSPACES_DIR", "JUPYTER_PATH",
                    "JUPYTER_CONFIG_PATH"):
            env.pop(var, None)
        env.update({
            "JUPYTER_TOKEN": self.token,
            "JUPYTER_CONFIG_DIR": str(self.tmp / "config"),
            "JUPYTER_DATA_DIR": str(self.tmp / "data"),
            "JUPYTER_RUNTIME_DIR": str(self.tmp / "runtime"),
            "PYTHONUNBUFFERED": "1",
            "JUPYTER_PREFER_ENV_PATH": "1",  # this venv's python3 kernel, not a user's
        })
        return env

    def _write_settings(self) -> None:
        assert self.tmp is not None
        labconfig = self.tmp / "config" / "labconfig"
        labconfig.mkdir(parents=True)
        (labconfig / "default_setting_overrides.json").write_text(
            json.dumps(SETTING_OVERRIDES, indent=1))
        for d in ("data", "runtime"):
            (self.tmp / d).mkdir(mode=0o700)

    def start(self) -> None:
        if self.proc is not None:
            raise RuntimeError("this JupyterServer is already started")
        if not self.root.is_dir():
            raise UserError(f"{self.root} is not a directory")
        sweep_stale()
        self.tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX))
        try:
            (self.tmp / "owner.pid").write_text(str(os.getpid()))
            self._write_settings()
            self.command = self.launch_command()
            try:
                self.proc = subprocess.Popen(
                    self.command, cwd=self.root, env=self._environment(),
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                    start_new_session=True,  # Ctrl-C reaches us, and we stop the server in order
                )
            except FileNotFoundError as exc:
                raise UserError(f"{exc.filename} not found: run `devdax-lab doctor`") from exc
            self._reader = threading.Thread(target=self._drain, name="jupyter-log", daemon=True)
            self._reader.start()
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _drain(self) -> None:
        assert self.proc and self.proc.stdout
        for raw in iter(self.proc.stdout.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            self.tail.append(line)
            if self.echo:
                self.echo(line)

    def _fail(self, message: str) -> JupyterStartError:
        if self._reader and self.proc and self.proc.poll() is not None:
            self._reader.join(timeout=2)
        return JupyterStartError(message, self.command, list(self.tail)[-20:])

    def _server_info(self) -> dict | None:
        """What the server wrote about itself (its port) in the private runtime dir."""
        assert self.tmp is not None and self.proc is not None
        f = self.tmp / "runtime" / f"jpserver-{self.proc.pid}.json"
        try:
            return json.loads(f.read_text())
        except (OSError, ValueError):
            return None

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise self._fail(f"JupyterLab exited with status {self.proc.returncode} "
                                 "before it answered")
            if self.port is None:
                info = self._server_info()
                if info:
                    self.port = int(info["port"])
            if self.port is not None:
                try:
                    self.api("status", timeout=2)
                    return
                except (urllib.error.URLError, OSError, ValueError):
                    pass
            if time.monotonic() > deadline:
                raise self._fail(f"JupyterLab did not answer /api/status within "
                                 f"{self.start_timeout:g} s")
            time.sleep(0.1)

    def wait(self) -> int:
        """Block until the server exits by itself; its exit status."""
        assert self.proc is not None
        return self.proc.wait()

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM (the server shuts its kernels down), SIGKILL after *grace*
        seconds; always reaps it and removes the temporary directories."""
        proc, self.proc = self.proc, None
        try:
            if proc is not None:
                terminate(proc, grace)
                if self._reader:
                    self._reader.join(timeout=2)
                if proc.stdout:
                    proc.stdout.close()
        finally:
            if self.tmp is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                self.tmp = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def sweep_stale() -> list[Path]:
    """Remove the temporary directories of servers whose owner is gone (a
    Python process killed with SIGKILL cannot clean up; its server died with
    it). Returns what was removed."""
    removed = []
    for d in Path(tempfile.gettempdir()).glob(f"{TMP_PREFIX}*"):
        try:
            owner = int((d / "owner.pid").read_text())
        except (OSError, ValueError):
            continue
        if owner != os.getpid() and not pid_alive(owner):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def _random_token() -> str:
    import secrets

    return secrets.token_hex(24)
