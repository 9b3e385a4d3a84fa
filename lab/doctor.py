"""``devdax-lab doctor``: every prerequisite, checked, with the fix for each
one missing. Checks are cheap and touch no network."""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .cache import cache_root

__all__ = ["Check", "run_checks", "DEBIAN_PACKAGES"]

# program -> Debian package that provides it
DEBIAN_PACKAGES = {
    "qemu-system-x86_64": "qemu-system-x86",
    "busybox": "busybox-static",
    "ndctl": "ndctl",
    "daxctl": "daxctl",
    "gcc": "gcc",
    "setpriv": "util-linux",
    "dpkg-deb": "dpkg",
    "apt-get": "apt",
    "xz": "xz-utils",
    "chromium": "chromium",
}

APT_FIX = "make lab (or: apt-get install -o APT::Default-Release=bookworm {pkg})"


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def _program_checks() -> Iterator[Check]:
    for program, pkg in DEBIAN_PACKAGES.items():
        path = shutil.which(program)
        yield Check(program, bool(path), path or "not found", APT_FIX.format(pkg=pkg))


def _static_busybox() -> Check:
    path = Path("/bin/busybox")
    ok = path.exists() and b"/lib64/ld-linux" not in path.read_bytes()[:4096]
    return Check("static busybox", ok, str(path) if path.exists() else "not found",
                 APT_FIX.format(pkg="busybox-static"))


def _static_libc() -> Check:
    found = any(Path(p).exists() for p in ("/usr/lib/x86_64-linux-gnu/libc.a", "/usr/lib/libc.a"))
    return Check("static libc (for the guest agent)", found, "libc.a present" if found else "libc.a missing",
                 APT_FIX.format(pkg="libc6-dev"))


def _data_files() -> Check:
    from .data import DATA_DIR, data_path

    wanted = [("kernel", "catalog.toml"), ("kernel", "devdax-lab.config"),
              ("vm-images", "image.toml"), ("vm-images", "init.sh"), ("vm-images", "agent", "agent.c")]
    missing = ["/".join(parts) for parts in wanted if not data_path(*parts).is_file()]
    return Check("lab data files", not missing,
                 str(DATA_DIR) if not missing else f"missing in {DATA_DIR}: {', '.join(missing)}",
                 "reinstall devdax-lab (pip install .): the package ships them")


def _python_modules() -> Iterator[Check]:
    for module in ("drgn", "qemu.qmp", "numpy", "pandas", "plotly", "ipywidgets"):
        try:
            ok = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            ok = False
        yield Check(f"python: {module}", ok, "importable" if ok else "missing",
                    "make lab (installs the venv from pyproject.toml)")


def _writable_dirs() -> Iterator[Check]:
    root = cache_root()
    parent = root if root.exists() else root.parent
    while not parent.exists():
        parent = parent.parent
    yield Check("cache directory", os.access(parent, os.W_OK), str(root),
                "set DEVDAX_LAB_CACHE to a writable directory")
    free = shutil.disk_usage(parent).free
    yield Check("free disk for kernels (needs ~6 GiB while fetching)", free > 6 << 30,
                f"{free / (1 << 30):.1f} GiB free", "free disk space or set DEVDAX_LAB_CACHE elsewhere")
    shm = Path("/dev/shm")
    yield Check("/dev/shm", shm.is_dir() and os.access(shm, os.W_OK), str(shm),
                "mount a tmpfs on /dev/shm (run directories fall back to /tmp)")


def _accel() -> Check:
    from .vm import cpu_has_virt_extensions

    kvm = os.access("/dev/kvm", os.R_OK | os.W_OK)
    virt = cpu_has_virt_extensions()
    detail = ("KVM available" if kvm and virt
              else "no usable KVM: TCG (software emulation) will be used, which works")
    return Check("accelerator", True, detail)


def run_checks() -> list[Check]:
    return [*_program_checks(), _static_busybox(), _static_libc(), _data_files(), *_python_modules(),
            *_writable_dirs(), _accel()]
