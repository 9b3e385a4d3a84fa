"""Booting the usual way: what a boot needs, found or made once on this
machine (the kernel resolved once per run, keeping the user's spelling; its
guest image; the accelerator; NVDIMM files whose labels already describe the
namespaces), :func:`lab.plan.plan` of it, and :class:`lab.vm.Vm` started
from that plan.

Creating namespaces with ndctl costs about 6 s under TCG, so the NVDIMM
backing files are prepared once per device layout by a throw-away boot and
cached; every boot then maps private sparse copies and the labels bring the
namespaces up by themselves when the modules load.
"""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from .cache import cache_root, cached_entry, discard, hash_inputs
from .model import DEFAULT_DAX, DaxSpec, KernelArtifacts, VmSpec
from .plan import BootInputs, KernelChoice, plan, prepare_arg
from .progress import silent
from . import warm
from .vm import (LABEL_SIZE, Vm, VmError, VmStopped, VmTimeout, check_group, fast_boot,
                 probe_accel)

__all__ = ["boot", "boot_inputs", "boot_spec", "nvdimm_key", "prepare_nvdimms", "resolve_kernel",
           "start"]


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
    from . import image

    initrd = image.build_image(kernel)
    accel = probe_accel(say=say)
    base = BootInputs(kernel=kernel, initrd=initrd, accel=accel, dax=tuple(dax), nvdimms=(),
                      **fast_boot(kernel))
    nvdimms = prepare_nvdimms(base, say=say)
    return BootInputs(**{**base.__dict__, "nvdimms": tuple(nvdimms)})


def nvdimm_key(dax: Sequence) -> str:
    return hash_inputs(json.dumps([[d.align, d.size, d.namespace_size] for d in dax]),
                       str(LABEL_SIZE), "v1")


def prepare_nvdimms(inputs: BootInputs, *, say=print, timeout: float = 300.0) -> list[Path]:
    """NVDIMM backing files whose labels already describe one device-dax
    namespace each, made once per layout by booting ``inputs.kernel`` with
    ndctl and cached (a file prepared under one kernel works under the
    others). ``inputs.nvdimms`` is ignored."""
    dax = inputs.dax
    final = cache_root() / "nvdimm" / nvdimm_key(dax)
    names = [f"nvdimm{i}.img" for i in range(len(dax))]

    def build(tmp: Path) -> None:
        say(f"devdax-lab: preparing NVDIMM labels for {prepare_arg(dax)} (once; ~10-20 s under TCG)")
        blanks = tuple(tmp / n for n in names)
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

    cached_entry(final, build, complete=lambda e: all((e / n).exists() for n in names),
                 what=f"preparing NVDIMM labels for {prepare_arg(dax)}", say=say)
    return [final / n for n in names]


def boot_spec(kernel, *, dax: Sequence[DaxSpec] = DEFAULT_DAX, events: bool = False,
              shell: bool = False, cmdline_extra: Sequence[str] = (), cpus: int | None = None,
              cold: bool = False, say=print, progress=None) -> VmSpec:
    """The plan of one boot of *kernel* (a name, a PATH, a
    :class:`lab.plan.KernelChoice` or artifacts): resolve it, build its image,
    probe the accelerator, prepare the NVDIMM files (each once, cached), then
    :func:`lab.plan.plan`; unless *cold*, started from the saved state of that
    plan where a restore is possible (:mod:`lab.warm`; made on first use by
    :func:`start`). Nothing is started."""
    choice = resolve_kernel(kernel, progress=progress)
    inputs = boot_inputs(choice.artifacts, dax, say=say)
    spec = plan(inputs, events=events, shell=shell, cmdline_extra=cmdline_extra, cpus=cpus)
    if not cold and warm.can_restore(spec, choice.source):
        spec = warm.warm_spec(spec)
    return spec


def _launch_ready(spec: VmSpec, ready_timeout: float, say, console_log: Path | None,
                  alongside, manifest: dict | None) -> Vm:
    vm = Vm(spec, say=say, console_log=console_log)
    vm.launch()
    try:
        pool = future = None
        if alongside is not None and spec.restore_from is not None:
            # A restored kernel is all there once its state is in: drgn loads
            # its debug info while the agent is asked (a booting one must
            # first load the modules drgn reads vmcoreinfo through).
            pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="devdax-alongside")
            future = pool.submit(alongside, vm)
        try:
            vm.wait_ready(ready_timeout)
            if manifest is not None:
                warm.check_restored(vm, manifest)
        finally:
            if pool is not None:
                pool.shutdown(wait=True)
        if future is not None:
            future.result()
        elif alongside is not None:
            alongside(vm)
        return vm
    except BaseException:
        vm.close()
        raise


def start(spec: VmSpec, *, ready_timeout: float = 120.0, say=print,
          console_log: Path | None = None, alongside=None, progress=None) -> Vm:
    """Launch *spec* and wait until the guest is ready; the returned
    :class:`Vm` is running (use it as a context manager). The boot is one
    step of *progress* (lab.progress), named after the kernel.
    """
    report = progress or silent
    stage = f"{'start' if spec.restore_from else 'boot'} {spec.kernel.name}"
    report(stage, 0, 1, unit="boot")
    vm = _start(spec, ready_timeout, say, console_log, alongside)
    report(stage, 1, 1, unit="boot")
    return vm


def _start(spec: VmSpec, ready_timeout: float, say, console_log: Path | None, alongside) -> Vm:
    """:func:`start` without the progress report.

    A spec to restore (``restore_from``) makes its saved state first if
    there is none (a cold boot, once), restores it and checks the guest is
    the one saved; if the restore fails, the guest boots cold (one line says
    why). *alongside(vm)* (drgn attaching) runs before this returns: for a
    restored guest in a thread while the guest is made ready, else after."""
    if spec.restore_from is not None:
        manifest = warm.make_state(spec, ready_timeout=ready_timeout, say=say)
        try:
            vm = _launch_ready(spec, ready_timeout, say, console_log, alongside, manifest)
            warm.used(spec.restore_from)
            return vm
        except VmError as exc:
            if isinstance(exc, VmStopped):
                raise
            check_group()  # a guest stopped with its group is no failed restore
            say(f"devdax-lab: warm start from {spec.restore_from} failed "
                f"({str(exc).splitlines()[0]}); booting cold")
            if isinstance(exc, warm.WarmStartError):  # not the guest saved: of no use to anyone
                discard(spec.restore_from)
            spec = replace(spec, restore_from=None)
    return _launch_ready(spec, ready_timeout, say, console_log, alongside, None)


def boot(kernel, *, dax: Sequence[DaxSpec] = DEFAULT_DAX,
         ready_timeout: float = 120.0, gdbstub: bool = False, say=print,
         progress=None, cmdline_extra: Sequence[str] = (), console_log: Path | None = None,
         cpus: int | None = None, cold: bool = False) -> Vm:
    """Resolve *kernel*, build its image, boot it (or, unless *cold*, restore
    its saved post-boot state) and wait until it is ready.

    The returned :class:`Vm` is running; use it as a context manager (or call
    ``close()``) so QEMU is always stopped.
    """
    spec = boot_spec(kernel, dax=dax, events=gdbstub, cmdline_extra=cmdline_extra, cpus=cpus,
                     cold=cold, say=say, progress=progress)
    return start(spec, ready_timeout=ready_timeout, say=say, console_log=console_log,
                 progress=progress)
