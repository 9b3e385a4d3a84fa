"""The QEMU command line and the file plumbing around it (no VM started)."""

import os
import subprocess
import time
from pathlib import Path

import pytest

from lab import plan, vm
from lab.model import DEFAULT_DAX, PUD_LAYOUT, KernelArtifacts, VmSpec

KERNEL = KernelArtifacts(name="before", release="6.12.0", vmlinuz=Path("/k/vmlinuz"),
                         vmlinux=Path("/k/vmlinux"))


def spec(**kw) -> VmSpec:
    dax = kw.pop("dax", DEFAULT_DAX)
    return VmSpec(kernel=KERNEL, initrd=Path("/k/initrd"), run_dir=Path("/run/x"),
                  nvdimm_sources=tuple(Path(f"/cache/nv{i}") for i in range(len(dax))), dax=dax,
                  **kw)


def _pairs(argv, flag):
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_argv_has_one_nvdimm_per_device_and_no_network():
    argv = vm.qemu_argv(spec())
    devices = _pairs(argv, "-device")
    assert [d for d in devices if d.startswith("nvdimm,")] == [
        "nvdimm,memdev=nvm0,id=nv0,label-size=128K", "nvdimm,memdev=nvm1,id=nv1,label-size=128K"]
    objects = _pairs(argv, "-object")
    assert any("mem-path=/run/x/nvdimm0.img" in o and "size=1090M" in o for o in objects)
    assert ["-nic", "none"] == argv[argv.index("-nic"):argv.index("-nic") + 2]
    assert "-nodefaults" in argv and "-no-reboot" in argv
    assert "vmcoreinfo" in devices
    assert _pairs(argv, "-machine") == ["pc,nvdimm=on,memory-backend=ram0"]
    assert "slots=2" in _pairs(argv, "-m")[0]
    assert "-cpu" not in argv  # the default CPU: 1G pages are only asked for with a 1G device


def test_tcg_runs_several_vcpus_on_one_thread():
    assert _pairs(vm.qemu_argv(spec()), "-accel") == ["tcg,thread=single"]
    assert _pairs(vm.qemu_argv(spec(cpus=1)), "-accel") == ["tcg"]  # nothing to share
    assert _pairs(vm.qemu_argv(spec(accel="kvm")), "-accel") == ["kvm"]


def test_1g_device_asks_for_a_cpu_with_1g_pages_and_4_level_paging():
    argv = vm.qemu_argv(spec(dax=PUD_LAYOUT))
    assert _pairs(argv, "-cpu") == ["max,la57=off"]
    assert plan.prepare_arg(PUD_LAYOUT) == "1G:4G,4K,2M"


def test_sockets_live_in_the_run_dir():
    argv = vm.qemu_argv(spec(gdbstub=True))
    for value in _pairs(argv, "-qmp") + _pairs(argv, "-chardev") + _pairs(argv, "-gdb"):
        assert "/run/x/" in value


def test_kernel_cmdline_carries_extras_and_panics_end_the_run():
    line = vm.kernel_cmdline(spec(cmdline_extra=("devdax_lab.shell=1",)))
    assert "console=ttyS0" in line and "panic=-1" in line and line.endswith("devdax_lab.shell=1")


def test_cpu_virt_flags():
    assert vm.cpu_has_virt_extensions("processor: 0\nflags\t\t: fpu svm lm\n")
    assert not vm.cpu_has_virt_extensions("flags\t\t: fpu hypervisor lm\n")


def test_probe_guest_exits_through_isa_debug_exit_under_tcg(tmp_path):
    disk = tmp_path / "probe.img"
    disk.write_bytes(vm._PROBE_SECTOR)
    proc = subprocess.run(vm.probe_argv("qemu-system-x86_64", "tcg", disk), timeout=30,
                          capture_output=True, stdin=subprocess.DEVNULL)
    assert proc.returncode == vm._PROBE_EXIT


def test_copy_sparse_keeps_holes_and_data(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    with open(src, "wb") as f:
        f.truncate(64 << 20)
        f.seek(1 << 20)
        f.write(b"label" * 1000)
        f.seek((64 << 20) - 4096)
        f.write(b"end")
    vm.copy_sparse(src, dst)
    assert dst.read_bytes() == src.read_bytes()
    assert os.stat(dst).st_blocks * 512 < 1 << 20


def test_sweep_removes_only_dirs_whose_processes_are_gone(tmp_path):
    dead = tmp_path / (vm.RUN_PREFIX + "dead")
    live = tmp_path / (vm.RUN_PREFIX + "live")
    for d in (dead, live):
        d.mkdir()
        (d / "agent.sock").write_text("")
    (dead / "owner.pid").write_text("999999999")
    (live / "owner.pid").write_text(str(os.getpid()))
    assert vm.sweep_stale_run_dirs(tmp_path) == [dead]
    assert live.exists() and not dead.exists()


def _elf_with_notes(notes: bytes) -> bytes:
    """A minimal ELF64 header + one PT_NOTE program header + the notes."""
    import struct

    ehdr = bytearray(64)
    ehdr[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", ehdr, 0x20, 64)  # e_phoff
    struct.pack_into("<HH", ehdr, 0x36, 56, 1)  # e_phentsize, e_phnum
    phdr = struct.pack("<IIQQQQQQ", 4, 0, 120, 0, 0, len(notes), len(notes), 4)
    return bytes(ehdr) + phdr + notes


def _note(name: bytes, ntype: int, desc: bytes) -> bytes:
    import struct

    pad = lambda b: b + b"\0" * (-len(b) % 4)  # noqa: E731
    return struct.pack("<III", len(name) + 1, len(desc), ntype) + pad(name + b"\0") + pad(desc)


def test_pvh_note_found_only_when_present(tmp_path):
    with_pvh = _elf_with_notes(_note(b"GNU", 3, b"\x01" * 20) + _note(b"Xen", 18, b"\0" * 4))
    without = _elf_with_notes(_note(b"GNU", 3, b"\x01" * 20) + _note(b"Xen", 17, b"\0" * 4))
    for data, expected in ((with_pvh, True), (without, False)):
        segments = vm.elf_note_segments(data)
        assert segments == [(120, len(data) - 120)]
        assert vm.has_pvh_entry(data[120:]) is expected
        path = tmp_path / f"vmlinux-{expected}"
        path.write_bytes(data)
        k = KernelArtifacts(name="x", release="r", vmlinuz=Path("/k/bz"), vmlinux=path)
        assert vm.boot_file_for(k) == (path if expected else Path("/k/bz"))


def test_a_dir_being_made_is_not_stale_until_it_is_old(tmp_path):
    """mkdtemp, then owner.pid: between the two another run's sweep must
    leave it (two kernels of a compare start at once)."""
    new = tmp_path / (vm.RUN_PREFIX + "new")
    old = tmp_path / (vm.RUN_PREFIX + "old")
    for d in (new, old):
        d.mkdir()
    past = time.time() - vm.UNCLAIMED_GRACE - 5
    os.utime(old, (past, past))
    assert vm.sweep_stale_run_dirs(tmp_path) == [old]
    assert new.exists()


def test_a_stopped_group_is_no_failed_restore():
    """launch._start falls back to a cold boot on a failed restore, but not
    when the thread's group was stopped (the guest died because the job is
    ending): check_group raises then, and only then."""
    vm.check_group()  # no group: nothing to say
    group = vm.VmGroup()
    with group.member():
        vm.check_group()
        group.stop("SIGTERM")
        with pytest.raises(vm.VmStopped):
            vm.check_group()
