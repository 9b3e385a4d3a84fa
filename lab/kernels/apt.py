"""apt: the machine's sources read (never changed), a private configuration
for another suite under the cache, and the apt-get/apt-cache calls. The
parsers and option builders are pure; :class:`Apt` does the I/O."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from lab.cache import cache_root, entry_lock, locked
from lab.errors import UserError
from lab.progress import Progress

from .catalog import AptSource
from .errors import CommandError, KernelError

__all__ = [
    "DEFAULT_KEYRING",
    "Apt",
    "archive_source",
    "parse_control",
    "private_apt_options",
    "private_sources_list",
    "run",
    "sources_uris",
    "tool",
]


DEFAULT_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


def _one_line_source(line: str) -> dict[str, Any] | None:
    m = re.match(r"^deb\s+(?:\[([^\]]*)\]\s+)?(\S+)\s+(\S+)((?:\s+\S+)*)\s*$", line)
    if not m:
        return None
    options = dict(o.split("=", 1) for o in (m.group(1) or "").split() if "=" in o)
    return {
        "uris": [m.group(2)],
        "suites": [m.group(3)],
        "components": m.group(4).split(),
        "signed_by": options.get("signed-by"),
    }


def _deb822_paragraphs(text: str) -> Iterator[dict[str, str]]:
    para: dict[str, str] = {}
    key = None
    for raw in text.splitlines() + [""]:
        if raw.startswith("#"):
            continue
        if not raw.strip():
            if para:
                yield para
            para, key = {}, None
        elif raw[0] in " \t" and key:
            para[key] += "\n" + raw.strip()
        elif ":" in raw:
            key, _, value = raw.partition(":")
            key = key.strip().lower()
            para[key] = value.strip()
    return


def sources_uris(text: str) -> dict[str, dict[str, Any]]:
    """The enabled ``deb`` sources of an apt sources file (deb822 ``.sources``
    or one-line ``.list``): ``{uri: {"suites", "components", "signed_by"}}``,
    URIs without a trailing slash, in file order."""
    entries: list[dict[str, Any]] = []
    lines = [ln.strip() for ln in text.splitlines()]
    if any(ln.startswith(("deb ", "deb\t")) for ln in lines):
        entries = [e for ln in lines if (e := _one_line_source(ln.split("#", 1)[0].strip()))]
    else:
        for p in _deb822_paragraphs(text):
            if "deb" not in p.get("types", "").split():
                continue
            if p.get("enabled", "yes").strip().lower() == "no":
                continue
            signed = p.get("signed-by")
            entries.append(
                {
                    "uris": p.get("uris", "").split(),
                    "suites": p.get("suites", "").split(),
                    "components": p.get("components", "").split(),
                    "signed_by": signed if signed and "\n" not in signed else None,
                }
            )
    out: dict[str, dict[str, Any]] = {}
    for e in entries:
        for uri in e["uris"]:
            slot = out.setdefault(
                uri.rstrip("/"), {"suites": [], "components": [], "signed_by": e["signed_by"]}
            )
            slot["suites"] += [s for s in e["suites"] if s not in slot["suites"]]
            slot["components"] += [c for c in e["components"] if c not in slot["components"]]
    return out


def archive_source(sources: Mapping[str, Mapping[str, Any]]) -> tuple[str, str]:
    """``(uri, keyring)`` of the Debian archive among *sources*: the first URI
    carrying a release suite (``bookworm``, not ``bookworm-security``).

    :raises UserError: if there is none.
    """
    for uri, info in sources.items():
        if any("-" not in s and "/" not in s for s in info["suites"]):
            return uri, info.get("signed_by") or DEFAULT_KEYRING
    raise UserError(
        "no Debian archive in the system's apt sources (looked for a URI with a release "
        "suite such as bookworm in /etc/apt/sources.list{,.d/*}): add one"
    )


def private_sources_list(uri: str, suite: str, components: Sequence[str], keyring: str) -> str:
    """The one-line sources file of a private apt configuration."""
    return f"deb [signed-by={keyring}] {uri} {suite} {' '.join(components)}\n"


def private_apt_options(root: Path) -> list[str]:
    """apt-get/apt-cache options that confine apt to *root*: its sources file,
    lists and cache; no system status, preferences or source parts."""
    opts = {
        "Dir::Etc::sourcelist": root / "sources.list",
        "Dir::Etc::sourceparts": root / "empty.d",
        "Dir::Etc::preferences": root / "empty.d" / "none",
        "Dir::Etc::preferencesparts": root / "empty.d",
        "Dir::State::Lists": root / "lists",
        "Dir::Cache": root / "cache",
        "Dir::State::status": "/dev/null",
        "Acquire::Languages": "none",
    }
    return [arg for k, v in opts.items() for arg in ("-o", f"{k}={v}")]


def parse_control(text: str) -> dict[str, str]:
    """The first paragraph of deb822 *text* (``apt-cache show``) as a dict
    keyed by field name as written."""
    out: dict[str, str] = {}
    key = None
    for line in text.splitlines():
        if not line.strip():
            if out:
                break
            continue
        if line[0] in " \t" and key:
            out[key] += "\n" + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise UserError(f"`{name}` is not installed: run `devdax-lab doctor`")
    return path


def run(cmd: Sequence[str], *, cwd: Path | None = None) -> str:
    proc = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise CommandError(cmd, proc.returncode, proc.stderr)
    return proc.stdout


def system_sources() -> dict[str, dict[str, Any]]:
    merged: dict[str, dict[str, Any]] = {}
    etc = Path("/etc/apt")
    files = (
        [etc / "sources.list"]
        + sorted((etc / "sources.list.d").glob("*.list"))
        + sorted((etc / "sources.list.d").glob("*.sources"))
    )
    for f in files:
        with contextlib.suppress(OSError):
            for uri, info in sources_uris(f.read_text()).items():
                merged.setdefault(uri, info)
    return merged


class Apt:
    """apt-get and apt-cache with either the system's configuration or a
    private one under ``cache_root()/apt/<suite>``."""

    def __init__(self, source: AptSource) -> None:
        self.source = source
        self.root = None if source.is_system else cache_root() / "apt" / source.suite
        self.options = [] if self.root is None else private_apt_options(self.root)
        self.label = "system apt index" if self.root is None else f"{source.suite} index"
        self.updated = False

    # root downloads into a directory the _apt user cannot enter (the cache is
    # under ~root): apt would fall back to root with a warning; say so up front.
    def _sandbox(self) -> list[str]:
        return ["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else []

    def has_index(self) -> bool:
        if self.root is None:
            return True
        lists = self.root / "lists"
        return (self.root / "sources.list").is_file() and any(lists.glob("*_Packages*"))

    def index_age(self) -> float:
        assert self.root is not None
        mtimes = [p.stat().st_mtime for p in (self.root / "lists").glob("*_Packages*")]
        return time.time() - max(mtimes) if mtimes else float("inf")

    def update(self, report: Progress) -> None:
        report(f"update {self.label}", 0, 1)
        if self.root is None:
            run([tool("apt-get"), "update", "-q"])
        else:
            uri, keyring = archive_source(system_sources())
            text = private_sources_list(uri, self.source.suite, self.source.components, keyring)
            # Fetches of two kernels of one suite share this index: one updates it.
            with locked(entry_lock(self.root), what=f"updating the {self.label}"):
                for d in ("lists/partial", "cache/archives/partial", "empty.d"):
                    (self.root / d).mkdir(parents=True, exist_ok=True)
                if (
                    not (self.root / "sources.list").is_file()
                    or (self.root / "sources.list").read_text() != text
                ):
                    (self.root / "sources.list").write_text(text)
                run([tool("apt-get"), *self.options, *self._sandbox(), "update", "-q"])
        self.updated = True
        report(f"update {self.label}", 1, 1)

    def names(self) -> set[str]:
        if not self.has_index():
            return set()
        return set(run([tool("apt-cache"), *self.options, "pkgnames"]).split())

    def show(self, package: str) -> dict[str, str] | None:
        """The candidate version's control fields, or None if unknown."""
        if not self.has_index():
            return None
        cmd = [tool("apt-cache"), *self.options, "show", "--no-all-versions", package]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not proc.stdout.strip():
            return None
        return parse_control(proc.stdout)

    def download(self, package: str, info: Mapping[str, str], dest: Path, report: Progress) -> None:
        """``apt-get download package=version`` into *dest*, reporting the
        growing file's size."""
        stage = f"download {package}"
        size = int(info["Size"])
        work = dest.parent / f".download-{package}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        cmd = [
            tool("apt-get"),
            *self.options,
            *self._sandbox(),
            "download",
            "-q",
            f"{package}={info['Version']}",
        ]
        try:
            with tempfile.TemporaryFile() as err:
                proc = subprocess.Popen(cmd, cwd=work, stdout=subprocess.DEVNULL, stderr=err)
                try:
                    while proc.poll() is None:
                        report(stage, dir_bytes(work), size)
                        time.sleep(0.25)
                except BaseException:
                    proc.terminate()
                    proc.wait()
                    raise
                if proc.returncode != 0:
                    err.seek(0)
                    raise CommandError(cmd, proc.returncode, err.read().decode(errors="replace"))
            debs = list(work.glob("*.deb"))
            if len(debs) != 1:
                raise KernelError(f"{' '.join(cmd)} left {len(debs)} .deb files in {work}")
            debs[0].rename(dest)
            report(stage, size, size)
        finally:
            shutil.rmtree(work, ignore_errors=True)


def dir_bytes(d: Path) -> int:
    total = 0
    for p in d.rglob("*"):
        with contextlib.suppress(OSError):
            if p.is_file():
                total += p.stat().st_size
    return total
