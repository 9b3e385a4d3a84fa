"""QEMU: the command line (a pure function of a VmSpec), the one owner of the
QEMU process, its QMP connection, its console and the agent socket. Every
QEMU the lab starts is started by :meth:`Vm.launch` (the interactive shell is
a mode of it), from a spec made by :func:`lab.plan.plan`.

A guest is *ready* when the agent answers and every requested device-dax
namespace exists. Namespaces are not created at boot: the NVDIMM backing
files are prepared once per device layout (ndctl under a throw-away boot,
cached) and copied sparsely for each boot, so the labels bring the namespaces
up by themselves when the modules load.

QEMU runs under ``setpriv --pdeathsig KILL`` so it dies with the Python
process even on SIGKILL; its private run directory (sockets, console log, RAM
and NVDIMM files) is removed on every way out, and a directory left by a
killed process is swept by the next start.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

from .agent import AgentClient, AgentDisconnected, AgentError, AgentTimeout
from .console import Complaint, MmMessage, find_complaint, find_mm_message
from .errors import LabFailure
from .model import GiB, KernelArtifacts, MiB, UserError, VmSpec, format_size
from .plan import RUN_DIR
from .procs import pid_alive

__all__ = [
    "VmError",
    "GuestCrashed",
    "VmTimeout",
    "qemu_argv",
    "kernel_cmdline",
    "launch_command",
    "probe_accel",
    "copy_sparse",
    "Vm",
    "VmGroup",
    "VmStopped",
    "RUN_PREFIX",
    "sweep_stale_run_dirs",
]

AGENT_PORT_NAME = "org.devdax-lab.agent"
LABEL_SIZE = 128 * 1024
RUN_PREFIX = "devdax-lab-run-"
# Largest NVDIMM backend alignment we need (ndctl -a 1G still works with 2M).
BACKEND_ALIGN = 2 * MiB


class VmError(LabFailure):
    """QEMU or the guest failed. Carries the command line and the console tail."""

    def __init__(self, message: str, *, argv: Sequence[str] = (), console_tail: Sequence[str] = ()):
        self.argv = list(argv)
        self.console_tail = list(console_tail)
        super().__init__(message)

    def __str__(self) -> str:
        msg = super().__str__()
        if self.console_tail:
            msg += "\n--- last lines of the guest console ---\n" + "\n".join(self.console_tail)
        return msg


class VmStopped(VmError):
    """The :class:`VmGroup` of this thread was stopped: another thread (the
    one Ctrl-C and SIGTERM reach) is ending the job."""


class GuestCrashed(VmError):
    """The guest kernel panicked or oopsed."""


class VmTimeout(VmError, TimeoutError):
    """A wait on the guest ran out of time."""


# ----------------------------------------------------------------------------
# Pure builders


def kernel_cmdline(spec: VmSpec) -> str:
    """The guest kernel's command line for *spec*."""
    # loglevel=5: KERN_WARNING lines (WARN_ON splats) reach the console, where
    # the host records them as complaints of the step that caused them.
    words = ["console=ttyS0", "loglevel=5", "panic=-1", "printk.time=1"]
    words += list(spec.cmdline_extra)
    return " ".join(words)


def accel_arg(spec: VmSpec) -> str:
    """``-accel``'s value. TCG with more than one vCPU runs them on one host
    thread: with one thread per vCPU (QEMU 7.2's default) the 7.x kernels
    died while booting about one time in ten with "Oops: int3" in code the
    kernel was patching (text_poke_bp: one vCPU ran a stale translation of
    the int3 another had just replaced), measured 2 of 20 boots of `after`;
    with one thread, 0 of 50, at about 0.5 s more to ready."""
    if spec.accel == "tcg" and spec.cpus > 1:
        return "tcg,thread=single"
    return spec.accel


def qemu_argv(spec: VmSpec) -> list[str]:
    """The exact QEMU command line for *spec*.

    The serial console is ``stdio``: captured by the owner, or with
    ``spec.shell`` this terminal with QEMU's monitor behind Ctrl-A
    (``mon:stdio``; Ctrl-A X quits).
    """
    run = spec.run_dir
    console = "mon:stdio" if spec.shell else "stdio"
    # A restored guest maps the saved RAM and NVDIMM files copy-on-write
    # (share=off): the saved state never changes, and runs from it at once
    # do not see each other (lab.warm).
    share = "off" if spec.restore_from is not None else "on"
    nvdimm_total = sum(d.size for d in spec.dax)
    maxmem = spec.memory + nvdimm_total + GiB
    argv = [
        spec.qemu,
        "-name", "devdax-lab",
        "-accel", accel_arg(spec),
        "-smp", str(spec.cpus),
        "-m", f"{spec.memory // MiB}M,slots={max(1, len(spec.dax))},maxmem={maxmem // MiB}M",
        "-object", f"memory-backend-file,id=ram0,size={spec.memory // MiB}M,"
                   f"mem-path={spec.ram_file},share={share}",
        "-machine", "pc,nvdimm=on,memory-backend=ram0",
        "-nodefaults", "-display", "none", "-no-reboot", "-nic", "none",
        "-serial", console, "-monitor", "none",
        "-qmp", f"unix:{run / 'qmp.sock'},server=on,wait=off",
        "-qmp", f"unix:{run / 'drgn-qmp.sock'},server=on,wait=off",
        "-device", "vmcoreinfo",
        "-device", "virtio-serial-pci,id=vser0",
        "-chardev", f"socket,id=agent0,path={run / 'agent.sock'},server=on,wait=off",
        "-device", f"virtserialport,bus=vser0.0,chardev=agent0,name={AGENT_PORT_NAME}",
    ]
    if spec.needs_1g_pages or spec.accel == "kvm":
        # 1G pages for PUD mappings; 4-level paging keeps the page-table walk
        # the same as on the default CPU.
        argv += ["-cpu", "host" if spec.accel == "kvm" else "max,la57=off"]
    for i, (dax, path) in enumerate(zip(spec.dax, spec.nvdimm_files, strict=True)):
        argv += [
            "-object", f"memory-backend-file,id=nvm{i},share={share},mem-path={path},"
                       f"size={dax.size // MiB}M,align={BACKEND_ALIGN // MiB}M",
            "-device", f"nvdimm,memdev=nvm{i},id=nv{i},label-size={LABEL_SIZE // 1024}K",
        ]
    if spec.gdbstub:
        argv += ["-gdb", f"unix:{run / 'gdb.sock'},server=on,wait=off"]
    if spec.firmware:
        argv += ["-bios", str(spec.firmware)]
    kernel = spec.boot_file or spec.kernel.vmlinuz
    if spec.restore_from is not None:
        # QEMU reads the whole -kernel file at start even to restore (for
        # fw_cfg); the state keeps a copy without debug sections (lab.warm)
        kernel = spec.restore_from / "kernel"
    argv += [
        "-kernel", str(kernel),
        "-initrd", str(spec.initrd),
        "-append", kernel_cmdline(spec),
        *spec.extra_args,
    ]
    if spec.restore_from is not None:
        argv += ["-incoming", "defer"]
    return argv


def launch_command(spec: VmSpec) -> list[str]:
    """The command :meth:`Vm.launch` starts: QEMU under ``setpriv
    --pdeathsig KILL``, so that it dies with the Python process even on
    SIGKILL (setpriv execs QEMU: the pid is QEMU's)."""
    return ["setpriv", "--pdeathsig", "KILL", "--", *qemu_argv(spec)]


# A boot sector that writes to QEMU's isa-debug-exit port: QEMU then exits
# with status (0x31 << 1) | 1 = 99. mov al,0x31; out 0xf4,al; hlt; jmp $
_PROBE_SECTOR = bytes([0xB0, 0x31, 0xE6, 0xF4, 0xF4, 0xEB, 0xFE]).ljust(510, b"\0") + b"\x55\xaa"
_PROBE_EXIT = 99


def probe_argv(qemu: str, accel: str, disk: Path) -> list[str]:
    """QEMU line of the accelerator probe: a one-instruction guest."""
    return [
        qemu, "-accel", accel, "-nodefaults", "-display", "none", "-no-reboot",
        "-m", "16M", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
        "-drive", f"file={disk},format=raw,if=ide", "-boot", "c",
    ]


QBOOT = Path("/usr/share/qemu/qboot.rom")
_XEN_ELFNOTE_PHYS32_ENTRY = 18


def elf_note_segments(header: bytes) -> list[tuple[int, int]]:
    """(offset, size) of each PT_NOTE segment, from the first bytes of an
    x86-64 ELF file (its ELF and program headers)."""
    if header[:4] != b"\x7fELF" or header[4] != 2:
        return []
    phoff, = struct.unpack_from("<Q", header, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", header, 0x36)
    segments = []
    for i in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from("<IIQQQQ", header, phoff + i * phentsize)
        if p_type == 4:  # PT_NOTE
            segments.append((p_offset, p_filesz))
    return segments


def has_pvh_entry(notes: bytes) -> bool:
    """Whether ELF *notes* hold the Xen PHYS32_ENTRY note QEMU's PVH boot needs."""
    pos = 0
    while pos + 12 <= len(notes):
        namesz, descsz, ntype = struct.unpack_from("<III", notes, pos)
        name = notes[pos + 12:pos + 12 + namesz].rstrip(b"\0")
        if name == b"Xen" and ntype == _XEN_ELFNOTE_PHYS32_ENTRY:
            return True
        pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def boot_file_for(kernel: KernelArtifacts) -> Path:
    """The file -kernel should load: vmlinux when it can be booted by PVH
    (no decompressor: faster under TCG), else the bzImage."""
    try:
        with open(kernel.vmlinux, "rb") as f:
            for offset, size in elf_note_segments(f.read(4096)):
                f.seek(offset)
                if has_pvh_entry(f.read(size)):
                    return kernel.vmlinux
    except (OSError, struct.error):
        pass
    return kernel.vmlinuz


def fast_boot(kernel: KernelArtifacts) -> dict:
    """VmSpec fields for the fastest boot this machine allows."""
    return {"boot_file": boot_file_for(kernel), "firmware": QBOOT if QBOOT.exists() else None}


# ----------------------------------------------------------------------------
# Processes and files


_accel_lock = threading.Lock()
_accel_cache: dict[str, str] = {}


def cpu_has_virt_extensions(cpuinfo: str | None = None) -> bool:
    """Whether /proc/cpuinfo's flags include vmx (Intel) or svm (AMD)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return bool(flags & {"vmx", "svm"})
    return False


def probe_accel(qemu: str = "qemu-system-x86_64", *, say=print) -> str:
    """``kvm`` if a probe guest really runs under KVM here, else ``tcg``.

    /dev/kvm existing proves nothing (on these machines KVM guests die with
    emulation failures), so a one-instruction guest is started under KVM and
    must exit through isa-debug-exit. ``DEVDAX_LAB_ACCEL`` forces a choice.
    """
    forced = os.environ.get("DEVDAX_LAB_ACCEL")
    if forced:
        if forced not in ("kvm", "tcg"):
            raise UserError(f"DEVDAX_LAB_ACCEL={forced!r}: use kvm or tcg")
        return forced
    with _accel_lock:  # kernels booted side by side probe once, and say it once
        if qemu in _accel_cache:
            return _accel_cache[qemu]
        accel, why = "tcg", "no /dev/kvm"
        if os.access("/dev/kvm", os.R_OK | os.W_OK) and not cpu_has_virt_extensions():
            # Seen here: /dev/kvm exists and a real-mode probe even runs, but
            # without vmx/svm a Linux guest dies with KVM emulation failures.
            why = "the CPU shows no vmx/svm flag"
        elif os.access("/dev/kvm", os.R_OK | os.W_OK):
            with tempfile.TemporaryDirectory(prefix="devdax-lab-probe-") as tmp:
                disk = Path(tmp) / "probe.img"
                disk.write_bytes(_PROBE_SECTOR)
                try:
                    proc = subprocess.run(probe_argv(qemu, "kvm", disk), capture_output=True,
                                          text=True, timeout=10, stdin=subprocess.DEVNULL)
                    if proc.returncode == _PROBE_EXIT:
                        accel, why = "kvm", ""
                    else:
                        last = (proc.stderr.strip().splitlines() or ["no output"])[0]
                        why = f"a KVM probe guest failed ({last})"
                except subprocess.TimeoutExpired:
                    why = "a KVM probe guest did not finish in 10 s"
                except FileNotFoundError as exc:
                    raise UserError(f"{qemu} not found: run `devdax-lab doctor`") from exc
        if accel == "tcg":
            say(f"devdax-lab: KVM unusable ({why}); using TCG (software emulation)")
        _accel_cache[qemu] = accel
        return accel


def _remove_tree(path: Path, attempts: int = 5) -> None:
    """Remove a run directory for sure: under load a console reader that
    outlived its join may still add a file while rmtree walks the tree."""
    for _ in range(attempts):
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            return
        time.sleep(0.1)


def copy_sparse(src: Path, dst: Path) -> None:
    """Copy *src* to *dst* writing only its data extents (SEEK_DATA/SEEK_HOLE),
    so a 1 GiB NVDIMM file with 18 MiB of data costs 18 MiB."""
    size = src.stat().st_size
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fout.truncate(size)
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fin.fileno(), pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole is left
                    break
                raise
            end = os.lseek(fin.fileno(), start, os.SEEK_HOLE)
            while start < end:  # copy_file_range fails across filesystems (EXDEV)
                block = os.pread(fin.fileno(), min(end - start, 1 << 20), start)
                if not block:
                    raise OSError(f"{src} ended early at {start}")
                os.pwrite(fout.fileno(), block, start)
                start += len(block)
            pos = end


def run_parent() -> Path:
    """Where run directories go: tmpfs (/dev/shm) when there is one."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


#: A run directory with no pid file yet is being made (its owner writes
#: owner.pid right after mkdtemp): stale only once older than this.
UNCLAIMED_GRACE = 60.0


def sweep_stale_run_dirs(parent: Path | None = None) -> list[Path]:
    """Remove run directories whose owner and QEMU are both gone (a Python
    process killed with SIGKILL cannot clean up after itself). One that
    names no owner yet is another run's being made (seen: two kernels of a
    compare starting at once, one removed the other's new directory) unless
    it is older than :data:`UNCLAIMED_GRACE`."""
    removed = []
    for d in (parent or run_parent()).glob(RUN_PREFIX + "*"):
        pids = []
        for name in ("owner.pid", "qemu.pid"):
            try:
                pids.append(int((d / name).read_text()))
            except (OSError, ValueError):
                pass
        if not pids:
            try:
                if time.time() - d.stat().st_mtime < UNCLAIMED_GRACE:
                    continue
            except OSError:
                continue
        if not any(pid_alive(p) for p in pids):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def make_run_dir() -> Path:
    """A private (0700) run directory owned by this process."""
    sweep_stale_run_dirs()
    run = Path(tempfile.mkdtemp(prefix=RUN_PREFIX, dir=run_parent()))
    os.chmod(run, 0o700)
    (run / "owner.pid").write_text(str(os.getpid()))
    return run


class ThreadedQmp:
    """qemu.qmp's synchronous client, run on one private thread.

    Its sync shim drives an asyncio loop with run_until_complete(), which
    fails in a thread whose loop is already running: a Jupyter kernel's.
    """

    def __init__(self, address):
        from concurrent.futures import ThreadPoolExecutor

        from qemu.qmp.legacy import QEMUMonitorProtocol

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="devdax-qmp")
        self._qmp = self._call(QEMUMonitorProtocol, address)

    def _call(self, fn, *args, **kwargs):
        return self._pool.submit(fn, *args, **kwargs).result()

    def settimeout(self, timeout: float | None) -> None:
        self._call(self._qmp.settimeout, timeout)

    def connect(self, negotiate: bool = True):
        return self._call(self._qmp.connect, negotiate)

    def cmd(self, name: str, **kwargs):
        return self._call(self._qmp.cmd, name, **kwargs)

    def close(self) -> None:
        try:
            self._call(self._qmp.close)
        finally:
            try:
                self._call(self._close_loop)
            finally:
                self._pool.shutdown(wait=True)

    @staticmethod
    def _close_loop() -> None:
        """Close the asyncio loop qemu.qmp made for this thread; left to the
        garbage collector at exit, it prints an "Exception ignored" traceback."""
        import asyncio

        loop = asyncio.get_event_loop_policy().get_event_loop()
        if not loop.is_running() and not loop.is_closed():
            loop.close()
        asyncio.set_event_loop(None)


_thread = threading.local()  # .group: the VmGroup the VMs this thread launches join


def check_group() -> None:
    """:raises VmStopped: this thread's :class:`VmGroup` was stopped (the
    job is ending: no fallback, no retry)."""
    group = getattr(_thread, "group", None)
    if group is not None:
        group.check()


class VmGroup:
    """The VMs launched by the threads of one parallel job (the kernels of a
    compare), so that the thread that started the job can stop them all:
    signals reach only the main thread, while each VM's owner (its
    :class:`Vm`, in a worker thread) is busy booting it or driving it.

    :meth:`stop` sends QEMU SIGTERM; each owner then meets a dead guest,
    unwinds and removes its run directory as on any failure, and a thread
    of the group that has not launched yet gets :class:`VmStopped` instead.
    Nothing else: each VM keeps its one owner.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._vms: set[Vm] = set()
        self._stopped: str | None = None

    @contextlib.contextmanager
    def member(self) -> Iterator[VmGroup]:
        """The VMs this thread launches inside the ``with`` block join the group."""
        before = getattr(_thread, "group", None)
        _thread.group = self
        try:
            yield self
        finally:
            _thread.group = before

    def check(self) -> None:
        """:raises VmStopped: the group was stopped."""
        if self._stopped is not None:
            raise VmStopped(f"stopped: {self._stopped}")

    def _add(self, vm: Vm) -> None:
        with self._lock:
            self.check()
            self._vms.add(vm)

    def _discard(self, vm: Vm) -> None:
        with self._lock:
            self._vms.discard(vm)

    def stop(self, why: str) -> None:
        """Stop every VM of the group, and every later launch in it."""
        with self._lock:
            self._stopped = why
            running = [vm.proc for vm in self._vms if vm.proc is not None]
        for proc in running:
            if proc.poll() is None:
                proc.terminate()  # its owner reaps it


class Vm:
    """The one owner of a QEMU process.

    Nothing starts before :meth:`launch`, which makes the run directory (a
    spec from :func:`lab.plan.plan` names it ``RUN_DIR`` until then), copies
    the NVDIMM files into it and starts :func:`launch_command`. With
    ``spec.shell`` the console is this terminal instead (:meth:`interact`).
    :meth:`close` (also run by the context manager, on exceptions and Ctrl-C)
    powers the guest off, then quits QEMU over QMP, then kills it, always
    reaps it and removes the run directory.
    """

    def __init__(self, spec: VmSpec, *, console_log: Path | None = None, say=print):
        self.spec = spec
        self.argv = qemu_argv(spec)
        self.command = launch_command(spec)
        self._console_log = console_log
        self.say = say
        self.proc: subprocess.Popen | None = None
        self._stdin_pump: threading.Thread | None = None
        self._ready = threading.Event()
        self._saved = False  # its state was saved (the guest stays stopped)
        self.restored_at = 0.0  # a restored guest: when its device state was in
        # when QEMU's sockets answered and when the agent first did (bench boot)
        self.connected_at = 0.0
        self.answered_at = 0.0
        self.tail: collections.deque[str] = collections.deque(maxlen=60)
        self.complaints: list[tuple[int, Complaint]] = []  # (console line number, complaint)
        self.mm_messages: list[tuple[int, MmMessage]] = []  # memory failure, OOM, page dumps
        self.lines_seen = 0
        self._marker = 0
        self.marks: list[tuple[float, str]] = []  # (seconds since launch, /init's line)
        self._lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self._agent_sock: socket.socket | None = None
        self.agent: AgentClient | None = None
        self.qmp = None
        self.started_at = 0.0
        self.ready_at = 0.0
        self.release = ""
        self.devices: list[dict] = []
        self._group: VmGroup | None = None

    # -- lifecycle ---------------------------------------------------------
    def __enter__(self) -> Vm:
        if self.proc is None:  # boot() hands over a Vm that is already running
            self.launch()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def console_log(self) -> Path:
        return self._console_log or self.spec.run_dir / "console.log"

    def launch(self) -> None:
        """Make the run directory, start QEMU and connect to its agent socket
        and QMP."""
        self._group = getattr(_thread, "group", None)
        if self._group is not None:
            self._group.check()
        if self.spec.run_dir == RUN_DIR:
            self.spec = replace(self.spec, run_dir=make_run_dir())
        self.argv = qemu_argv(self.spec)
        self.command = launch_command(self.spec)
        try:
            if not self.spec.nvdimms_in_place and self.spec.restore_from is None:
                for src, dst in zip(self.spec.nvdimm_sources, self.spec.nvdimm_files, strict=True):
                    copy_sparse(src, dst)
            self.started_at = time.monotonic()
            self.proc = self._popen()
        except BaseException:
            shutil.rmtree(self.spec.run_dir, ignore_errors=True)
            raise
        try:
            if self._group is not None:
                self._group._add(self)  # stopped meanwhile: VmStopped, and closed below
            (self.spec.run_dir / "qemu.pid").write_text(str(self.proc.pid))
            if not self.spec.shell:
                self._reader = threading.Thread(target=self._drain_console, name="qemu-console",
                                                daemon=True)
                self._reader.start()
            self._connect()
        except BaseException:
            self.close()
            raise

    def _popen(self) -> subprocess.Popen:
        try:
            if not self.spec.shell:
                return subprocess.Popen(
                    self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # Ctrl-C reaches us, and we stop QEMU in order
                )
            # The console is this terminal (QEMU makes it raw: Ctrl-C goes to
            # the guest). Input that is not a terminal is passed on by a
            # thread, which ends the guest's shell when the input ends.
            stdin_is_tty = os.isatty(0)
            proc = subprocess.Popen(self.command, stdin=None if stdin_is_tty else subprocess.PIPE)
            if not stdin_is_tty:
                self._stdin_pump = threading.Thread(target=self._pump_stdin, args=(proc,),
                                                    name="qemu-stdin", daemon=True)
                self._stdin_pump.start()
            return proc
        except FileNotFoundError as exc:
            raise UserError(f"{exc.filename} not found: run `devdax-lab doctor`") from exc

    def _pump_stdin(self, proc: subprocess.Popen) -> None:
        """Copy our stdin to the guest console once the guest is ready (the
        console is open in the guest from /init on, so nothing is lost; input
        sent while its serial driver starts could be); at the end of the
        input send "exit" (and Ctrl-D), which ends the guest's shell, and
        /init then powers off: a script's `devdax-lab boot --shell <
        commands` returns once they ran."""
        assert proc.stdin
        while not self._ready.wait(0.1):
            if proc.poll() is not None:
                return
        try:
            while block := os.read(0, 4096):
                proc.stdin.write(block)
                proc.stdin.flush()
            # "exit" rather than Ctrl-D alone: a Ctrl-D that reaches the tty
            # while the shell has it in canonical mode (between commands) is
            # lost when the line editor switches it to raw mode (seen here)
            proc.stdin.write(b"\nexit\n\x04")
            proc.stdin.flush()
        except OSError:  # QEMU went away first
            pass

    def interact(self) -> int:
        """Wait while the person at the terminal (or the input piped in) uses
        the guest's shell; return QEMU's exit status. The guest powers off
        when its shell ends (``exit``, Ctrl-D, end of input); Ctrl-A X quits
        QEMU at once."""
        assert self.spec.shell and self.proc
        return self.proc.wait()

    def _drain_console(self) -> None:
        assert self.proc and self.proc.stdout
        with open(self.console_log, "a", encoding="utf-8", errors="replace") as log:
            for raw in iter(self.proc.stdout.readline, b""):
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                log.write(line + "\n")
                log.flush()
                with self._lock:
                    self.lines_seen += 1
                    self.tail.append(line)
                    if line.startswith("devdax-lab:"):
                        self.marks.append((time.monotonic() - self.started_at, line))
                    complaint = find_complaint(line)
                    if complaint:
                        self.complaints.append((self.lines_seen, complaint))
                    message = find_mm_message(line)
                    if message:
                        self.mm_messages.append((self.lines_seen, message))

    def console_tail(self, n: int = 30) -> list[str]:
        with self._lock:
            return list(self.tail)[-n:]

    def fail(self, cls, message: str) -> VmError:
        """An error of class *cls* carrying the command and the console tail."""
        time.sleep(0.2)  # let the console reader catch the last lines
        return cls(message, argv=self.argv, console_tail=self.console_tail())

    def sync_console(self, timeout: float = 5.0) -> str:
        """Return once every kernel message logged so far has reached the
        console reader: a marker goes into the kernel log and is waited for
        (the console prints records in order). Returns the marker's console
        line (its printk time is the guest's uptime)."""
        assert self.agent
        self._marker += 1
        token = f"devdax-lab: console mark {self._marker}"
        self.agent.kmsg(f"<4>{token}")
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                for line in list(self.tail)[-20:]:
                    if line.endswith(token):  # "mark 1" is not "mark 10"
                        return line
            self.check_alive()
            if time.monotonic() > deadline:
                raise self.fail(VmTimeout, f"the guest console fell silent for {timeout:.0f} s")
            time.sleep(0.002)

    def _settle(self, timeout: float = 3.0) -> None:
        """After the guest went quiet: give QEMU time to exit and the console
        reader time to read its last lines."""
        if self.proc:
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                return
        if self._reader:
            self._reader.join(timeout=timeout)

    def check_alive(self) -> None:
        """Raise if QEMU exited or the guest panicked/oopsed."""
        with self._lock:
            fatal = [c for _, c in self.complaints if c.fatal]
        if fatal:
            raise self.fail(GuestCrashed, f"the guest kernel crashed: {fatal[0].text}")
        if self.proc and self.proc.poll() is not None:
            raise self.fail(VmError, f"QEMU exited with status {self.proc.returncode}")

    def _wait_for_socket(self, path: Path, deadline: float) -> socket.socket:
        while True:
            self.check_alive()
            if path.exists():
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.connect(str(path))
                    return s
                except (ConnectionRefusedError, FileNotFoundError):
                    s.close()
            if time.monotonic() > deadline:
                raise self.fail(VmTimeout, f"QEMU did not create {path.name} within 10 s")
            time.sleep(0.003)

    def _connect(self) -> None:
        deadline = time.monotonic() + 10
        # The agent first: a restored guest's agent then finds its host at
        # once (connected after `cont`, its reconnect pause costs ~0.24 s).
        self._agent_sock = self._wait_for_socket(self.spec.run_dir / "agent.sock", deadline)
        self.agent = AgentClient(self._agent_sock)
        qmp_sock = self._wait_for_socket(self.spec.run_dir / "qmp.sock", deadline)
        self.qmp = ThreadedQmp(qmp_sock)
        self.qmp.settimeout(10)
        from qemu.qmp import QMPError

        try:
            self.qmp.connect(negotiate=True)
        except (OSError, QMPError) as exc:  # QEMU gave up at once (a kernel it cannot load)
            time.sleep(0.2)  # let it exit
            status = self.proc.poll()
            why = f"exited with status {status}" if status is not None else "did not answer"
            raise self.fail(VmError, f"QEMU {why} before its QMP monitor answered "
                            f"({type(exc).__name__}: {exc})") from exc
        self.connected_at = time.monotonic()
        if self.spec.restore_from is not None:
            self._restore(self.spec.restore_from / "state")

    def _qmp(self, name: str, **args):
        """One QMP command's result; an error answer is a VmError."""
        from qemu.qmp import ExecuteError

        try:
            return self.qmp.cmd(name, **args)
        except ExecuteError as exc:
            raise self.fail(VmError, f"QMP {name} failed: {exc}") from exc

    def _ignore_shared(self) -> None:
        """Leave the shared RAM and NVDIMM blocks out of the migration stream
        (QEMU 7.2 has no command-line property for it: QMP on both sides)."""
        self._qmp("migrate-set-capabilities",
                  capabilities=[{"capability": "x-ignore-shared", "state": True}])

    def _restore(self, state: Path, timeout: float = 30.0) -> None:
        """Load the saved device state into this QEMU (started with
        ``-incoming defer``) and let the guest run."""
        self._ignore_shared()
        self._qmp("migrate-incoming", uri=f"exec:cat {shlex.quote(str(state))}")
        deadline = time.monotonic() + timeout
        while True:
            status = self._qmp("query-status")["status"]
            if status in ("paused", "running"):
                break
            if status != "inmigrate":
                raise self.fail(VmError, f"restoring the saved state {state.parent} ended in "
                                         f"state {status!r}")
            migration = self._qmp("query-migrate").get("status")
            if migration == "failed":
                raise self.fail(VmError, f"restoring the saved state {state.parent} failed")
            if time.monotonic() > deadline:
                raise self.fail(VmTimeout, f"restoring the saved state {state.parent} took over "
                                           f"{timeout:.0f} s")
            time.sleep(0.002)
        self.restored_at = time.monotonic()
        if status == "paused":  # saved stopped: the state says so
            self._qmp("cont")

    def save_state(self, state: Path, timeout: float = 60.0) -> float:
        """Stop the guest for good and write its device state to *state*
        (RAM and NVDIMMs stay in their shared files: copy them now, while it
        is stopped). One save per QEMU. Returns the seconds it took."""
        t0 = time.monotonic()
        self._qmp("stop")
        self._saved = True
        self._ignore_shared()
        self._qmp("migrate", uri=f"exec:cat > {shlex.quote(str(state))}")
        deadline = time.monotonic() + timeout
        while True:
            info = self._qmp("query-migrate")
            if info.get("status") == "completed":
                return time.monotonic() - t0
            if info.get("status") in ("failed", "cancelled"):
                raise self.fail(VmError, f"saving the guest state failed: "
                                         f"{info.get('error-desc', info.get('status'))}")
            if time.monotonic() > deadline:
                raise self.fail(VmTimeout, f"saving the guest state took over {timeout:.0f} s")
            time.sleep(0.005)

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Wait until the agent answers and every requested namespace exists."""
        deadline = time.monotonic() + timeout
        assert self.agent
        while True:
            self.check_alive()
            try:
                info = self.agent.request("ping", timeout=0.5)
                self.release = info["release"]
                self.answered_at = time.monotonic()
                break
            except AgentTimeout:
                pass
            except AgentDisconnected as exc:
                self._settle()
                self.check_alive()  # a crash explains a closed channel best
                raise self.fail(VmError, f"the agent channel closed: {exc}") from exc
            if time.monotonic() > deadline:
                raise self.fail(VmTimeout, f"the guest agent did not answer within {timeout:.0f} s")
        want = sorted(d.align for d in self.spec.dax)
        while True:
            self.check_alive()
            self.devices = self.agent.request("namespaces", timeout=5)["devices"]
            if sorted(d["align"] for d in self.devices) == want:
                break
            if time.monotonic() > deadline:
                have = ", ".join(f"{d['name']} (align {format_size(d['align'])})" for d in self.devices)
                raise self.fail(
                    VmTimeout,
                    f"device-dax namespaces with aligns {', '.join(map(format_size, want))} "
                    f"did not appear within {timeout:.0f} s (present: {have or 'none'})",
                )
            time.sleep(0.05)
        self.ready_at = time.monotonic()
        self._ready.set()

    @property
    def time_to_ready(self) -> float:
        return self.ready_at - self.started_at

    def device(self, align: int | str) -> dict:
        """The namespace with alignment *align* (``"4K"``, ``"2M"``, ``1 << 30``)."""
        from .model import parse_size

        want = parse_size(align)
        for d in self.devices:
            if d["align"] == want:
                return d
        have = ", ".join(format_size(d["align"]) for d in self.devices) or "none"
        raise UserError(f"no device-dax namespace with alignment {format_size(want)} (have: {have})")

    def close(self, timeout: float = 10.0) -> None:
        """Stop QEMU gently, then firmly; always reap it and clean up."""
        proc = self.proc
        try:
            if proc and proc.poll() is None:
                self._stop(proc, timeout)
        finally:
            if proc:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
            for closer in (self._agent_sock, self.qmp):
                try:
                    if closer:
                        closer.close()
                except Exception:  # noqa: BLE001 - closing a dead socket may fail any way
                    pass
            if self._reader:
                self._reader.join(timeout=2)
            _remove_tree(self.spec.run_dir)
            if self._group is not None:
                self._group._discard(self)

    def _stop(self, proc: subprocess.Popen, timeout: float) -> None:
        # A restored guest's memory is a private copy that nobody keeps, and a
        # saved one is stopped for good: quit at once instead of powering off.
        gentle = self.spec.restore_from is None and not self._saved
        try:
            if self.agent and gentle:
                self.agent.request("poweroff", timeout=2)
                proc.wait(timeout=timeout / 2)
                return
        except (AgentError, AgentTimeout, AgentDisconnected, subprocess.TimeoutExpired, OSError):
            pass
        try:
            if self.qmp:
                self.qmp.cmd("quit")
            proc.wait(timeout=timeout / 2)
            return
        except Exception:  # noqa: BLE001 - any QMP failure leads to the same kill
            pass
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            proc.kill()


def qemu_version(qemu: str = "qemu-system-x86_64") -> str:
    """First line of ``qemu --version`` (for the provenance of a run)."""
    try:
        out = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.splitlines()[0] if out else "unknown"
