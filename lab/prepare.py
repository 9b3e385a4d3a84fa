"""What a boot needs, found or made once on this machine: the kernel
resolved (once per run, keeping the user's spelling), its guest image, the
accelerator, and NVDIMM files whose labels already describe the namespaces.
:func:`lab.plan.plan` turns the result into the VmSpec that is started.

Creating namespaces with ndctl costs about 6 s under TCG, so the NVDIMM
backing files are prepared once per device layout by a throw-away boot and
cached; every boot then maps private sparse copies and the labels bring the
namespaces up by themselves when the modules load.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from .cache import atomic_entry, cache_root, hash_inputs
from .model import KernelArtifacts
from .plan import BootInputs, KernelChoice, plan, prepare_arg

__all__ = ["resolve_kernel", "boot_inputs", "prepare_nvdimms", "nvdimm_key"]


def resolve_kernel(kernel: str | KernelChoice | KernelArtifacts, *, progress=None) -> KernelChoice:
    """Resolve the kernel the user named (fetching a catalog kernel if it is
    not cached). A :class:`KernelChoice` is returned as it is, so a run
    resolves each kernel once and passes the choice down."""
    from . import kernels

    if isinstance(kernel, KernelChoice):
        return kernel
    if isinstance(kernel, KernelArtifacts):
        return KernelChoice(spelling=kernel.name, artifacts=kernel, source="given")
    artifacts = kernels.resolve(kernel, progress=progress)
    if kernel != artifacts.name:  # only a path is spelled otherwise than its kernel's name
        source = "tree"
    else:
        catalog = kernels.load_catalog()
        source = str(catalog[kernel].apt) if kernel in catalog else "built"
    return KernelChoice(spelling=kernel, artifacts=artifacts, source=source)


def boot_inputs(kernel: KernelArtifacts, dax: Sequence, *, say=print) -> BootInputs:
    """The guest image, accelerator and prepared NVDIMM files for *kernel*
    with devices *dax* (each made once and cached)."""
    from . import image, vm

    initrd = image.build_image(kernel)
    accel = vm.probe_accel(say=say)
    base = BootInputs(kernel=kernel, initrd=initrd, accel=accel, dax=tuple(dax), nvdimms=(),
                      **vm.fast_boot(kernel))
    nvdimms = prepare_nvdimms(base, say=say)
    return BootInputs(**{**base.__dict__, "nvdimms": tuple(nvdimms)})


def nvdimm_key(dax: Sequence) -> str:
    from .vm import LABEL_SIZE

    return hash_inputs(json.dumps([[d.align, d.size, d.namespace_size] for d in dax]),
                       str(LABEL_SIZE), "v1")


def prepare_nvdimms(inputs: BootInputs, *, say=print, timeout: float = 300.0) -> list[Path]:
    """NVDIMM backing files whose labels already describe one device-dax
    namespace each, made once per layout by booting ``inputs.kernel`` with
    ndctl and cached (a file prepared under one kernel works under the
    others). ``inputs.nvdimms`` is ignored."""
    from .vm import Vm, VmError, VmTimeout

    dax = inputs.dax
    final = cache_root() / "nvdimm" / nvdimm_key(dax)
    files = [final / f"nvdimm{i}.img" for i in range(len(dax))]
    if all(f.exists() for f in files):
        return files
    say(f"devdax-lab: preparing NVDIMM labels for {prepare_arg(dax)} (once; ~10-20 s under TCG)")
    with atomic_entry(final) as tmp:
        blanks = tuple(tmp / f"nvdimm{i}.img" for i in range(len(dax)))
        for d, path in zip(dax, blanks, strict=True):
            with open(path, "wb") as f:
                f.truncate(d.size)
        spec = plan(BootInputs(**{**inputs.__dict__, "nvdimms": blanks}), prepare=True)
        with Vm(spec, say=say, console_log=final.parent / "last-prepare-console.log") as v:
            try:
                v.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired as exc:
                raise v.fail(VmTimeout, f"preparing the NVDIMM labels took over {timeout:.0f} s") from exc
            time.sleep(0.1)
            if not any("devdax-lab: prepare ok" in line for line in v.console_tail(60)):
                raise v.fail(VmError, "preparing the NVDIMM labels failed")
    return files
