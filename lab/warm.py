"""Warm start: begin a run from a saved post-boot VM state instead of
booting (about 0.2 s instead of 3-5 s under TCG).

Guest RAM and the NVDIMMs are ``memory-backend-file ... share=on`` in every
boot, so with QEMU's ``x-ignore-shared`` migration capability they stay out
of the migration stream: saving is ``stop``, ``migrate "exec:cat > state"``
(~200 KB of device state) and a sparse copy of the RAM and NVDIMM files
while the guest is stopped. A run then starts QEMU with the same command line
plus ``-incoming defer``, mapping those files copy-on-write (``share=off``:
the saved state never changes and runs from it at once do not see each
other), and loads the device state with ``migrate-incoming "exec:cat state"``
(QEMU 7.2 takes ``x-ignore-shared`` only over QMP, on both sides).

A saved state is a cache entry like a kernel: ``cache/warm/<key>/`` with
``manifest.json``, made on first use (a cold boot, then the save) with a
progress line by :func:`lab.cache.cached_entry`, so runs started at once
make it once. Its key
hashes every input: the QEMU command line (devices, CPUs, accelerator,
events, kernel arguments; run directory aside), the QEMU version, and the
identity (path, size, mtime) of the kernel files, the guest image and the
prepared NVDIMM files. A change of any of them is a new entry.

After a restore :func:`check_restored` confirms the guest is the one saved:
its release and devices, and its clock moving on from the save (a console
marker's printk time), which also proves the console works.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

from .cache import cache_root, cached_entry, hash_inputs, mark_used, prune_unused
from .model import VmSpec
from .plan import RUN_DIR
from .vm import Vm, VmError, copy_sparse, qemu_argv, qemu_version

__all__ = ["WarmStartError", "can_restore", "check_restored", "make_state", "state_dir",
           "state_key", "warm_spec"]

MANIFEST = "manifest.json"
# Saved states kept per kernel (the most recently used): one per device
# layout and event setting in use; an input that changed leaves its old
# entries behind (~270 MB each), so older ones are removed, once unused for
# UNUSED_FOR seconds: a run maps the files of the state it found within
# seconds, and a running guest keeps them mapped after they are removed.
KEEP_PER_KERNEL = 4
UNUSED_FOR = 600.0
FORMAT = "warm-v2"  # v2: the entry holds the kernel file a restore names

# printk's time stamp on a console line: "[    5.013162] ..."
_PRINTK_TIME = re.compile(r"^\[\s*(\d+\.\d+)\]")


class WarmStartError(VmError):
    """A restored guest is not the one that was saved (release, devices, a
    clock that does not move); the caller boots cold instead."""


def can_restore(spec: VmSpec, source: str) -> bool:
    """Whether a boot of *spec* may start from a saved state: not the
    interactive shell nor the NVDIMM-preparing boot, and not a kernel tree
    booted by path (it changes in place: each build would cost a cold boot
    plus a save) nor artifacts handed over without a name."""
    return not (spec.shell or spec.nvdimms_in_place) and source not in ("tree", "given")


def _identity(path: Path | None) -> str:
    """A file's path, size and modification time: what says it changed,
    without hashing a 400 MB vmlinux on every run."""
    if path is None:
        return "-"
    st = path.stat()
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


@functools.lru_cache(maxsize=4)
def _qemu_version(qemu: str) -> str:
    return qemu_version(qemu)


def state_key(spec: VmSpec) -> str:
    """The cache key of *spec*'s saved state: a hash of every input."""
    cold = dataclasses.replace(spec, restore_from=None, run_dir=RUN_DIR)
    k = spec.kernel
    return hash_inputs(
        FORMAT, json.dumps(qemu_argv(cold)), _qemu_version(spec.qemu),
        *(_identity(p) for p in (k.vmlinux, k.vmlinuz, spec.boot_file, spec.initrd,
                                 spec.firmware, *spec.nvdimm_sources)))


def state_dir(spec: VmSpec) -> Path:
    """Where *spec*'s saved state is (or will be made)."""
    return cache_root() / "warm" / f"{spec.kernel.name}-{state_key(spec)}"


def warm_spec(spec: VmSpec) -> VmSpec:
    """*spec* started from its saved state (which may not exist yet)."""
    return dataclasses.replace(spec, restore_from=state_dir(spec))


def read_manifest(entry: Path) -> dict | None:
    try:
        return json.loads((entry / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def make_state(spec: VmSpec, *, ready_timeout: float = 120.0, say=print) -> dict:
    """The manifest of the saved state of *spec* (``spec.restore_from`` is
    the entry), made now by a cold boot if there is none. Several processes
    asking at once: one makes it, the others wait and use it."""
    entry = spec.restore_from
    assert entry is not None
    made: list[dict] = []

    def save(tmp: Path) -> None:
        say(f"devdax-lab: saving a warm-start state of {spec.kernel.name} (once: a cold boot, "
            f"then each run starts from it)")
        cold = dataclasses.replace(spec, restore_from=None, run_dir=RUN_DIR)
        t0 = time.monotonic()
        with Vm(cold, say=say, console_log=tmp / "console.log") as v:
            v.wait_ready(ready_timeout)
            boot_seconds = v.time_to_ready
            uptime = _printk_time(v.sync_console())
            save_seconds = v.save_state(tmp / "state")
            t = time.monotonic()
            copy_sparse(v.spec.ram_file, tmp / "ram")
            for i, src in enumerate(v.spec.nvdimm_files):
                copy_sparse(src, tmp / f"nvdimm{i}.img")
            copy_seconds = time.monotonic() - t
            manifest = {
                "format": FORMAT, "key": state_key(spec), "kernel": spec.kernel.name,
                "release": v.release, "devices": v.devices, "uptime": uptime,
                "qemu": _qemu_version(spec.qemu), "argv": qemu_argv(cold),
                "boot_seconds": round(boot_seconds, 3), "save_seconds": round(save_seconds, 3),
                "copy_seconds": round(copy_seconds, 3),
                "state_bytes": (tmp / "state").stat().st_size,
                "saved_at": time.time(), "made_in_seconds": round(time.monotonic() - t0, 3),
            }
        _restore_kernel(cold.boot_file or cold.kernel.vmlinuz, tmp / "kernel")
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        made.append(manifest)

    cached_entry(entry, save, complete=lambda e: read_manifest(e) is not None,
                 what=f"saving the state {entry.name}", say=say)
    if made:
        say(f"devdax-lab: saved ({made[0]['state_bytes'] // 1024} KiB of device state, "
            f"{made[0]['made_in_seconds']:.1f} s)")
        prune(entry.parent, spec.kernel.name)
    manifest = read_manifest(entry)
    if manifest is None:
        raise WarmStartError(f"the saved state {entry} went away")  # removed by hand meanwhile
    return manifest


def used(entry: Path) -> None:
    """Note that *entry* was restored (what :func:`prune` keeps)."""
    mark_used(entry)


def prune(root: Path, kernel: str, keep: int = KEEP_PER_KERNEL,
          unused_for: float = UNUSED_FOR) -> list[Path]:
    """Remove all but the *keep* most recently used saved states of
    *kernel* under *root*, once unused for *unused_for* seconds
    (:func:`lab.cache.prune_unused`). A guest restored from a removed one
    runs on: its files stay mapped until it ends."""
    mine = re.compile(re.escape(kernel) + r"-[0-9a-f]{16}")  # not those of kernel "before-x"
    # An entry without a manifest is of an older layout: the next make replaces it.
    saved = [d for d in root.glob(f"{kernel}-*")
             if mine.fullmatch(d.name) and (d / MANIFEST).is_file()]
    return prune_unused(saved, keep=keep, unused_for=unused_for)


def _restore_kernel(boot_file: Path, dest: Path) -> None:
    """What -kernel names on a restore. QEMU reads the whole file at start
    (for fw_cfg) even when the guest's memory comes from the saved state:
    for the 350-430 MB DWARF vmlinux that is tens of ms, so a restore names a
    copy without debug sections (same loadable segments and notes; the
    guest never reads it again)."""
    with open(boot_file, "rb") as f:
        elf = f.read(4) == b"\x7fELF"
    if elf:
        proc = subprocess.run(["objcopy", "--strip-debug", str(boot_file), str(dest)],
                              capture_output=True, text=True, check=False)
        if proc.returncode == 0:
            return
        dest.unlink(missing_ok=True)
    shutil.copyfile(boot_file, dest)


def _printk_time(line: str) -> float:
    """The guest's uptime at a console line, from its printk time."""
    m = _PRINTK_TIME.match(line)
    if not m:
        raise WarmStartError(f"no printk time on the console line {line!r}")
    return float(m.group(1))


def check_restored(v, manifest: dict) -> None:
    """Raise :class:`WarmStartError` unless the restored guest *v* is the one
    saved: same release and devices, its clock moving on from the save, and
    its console working (the marker that shows the clock went through it)."""
    if v.release != manifest["release"]:
        raise WarmStartError(f"the restored guest runs {v.release}, the saved one "
                             f"{manifest['release']}")
    if v.devices != manifest["devices"]:
        raise WarmStartError("the restored guest's device-dax namespaces differ from the saved ones")
    uptime = _printk_time(v.sync_console())
    if not uptime > manifest["uptime"]:
        raise WarmStartError(f"the restored guest's clock reads {uptime:.3f} s, not after the "
                             f"save's {manifest['uptime']:.3f} s")
