"""The boot plan: one pure function from what was found to the VmSpec that
is started (no VM, no I/O)."""

from pathlib import Path

from lab import vm
from lab.model import DEFAULT_DAX, PUD_LAYOUT, KernelArtifacts
from lab.plan import RUN_DIR, BootInputs, KernelChoice, plan, prepare_arg

KERNEL = KernelArtifacts(name="before", release="6.12.0", vmlinuz=Path("/k/vmlinuz"),
                         vmlinux=Path("/k/vmlinux"))
INPUTS = BootInputs(kernel=KERNEL, initrd=Path("/k/initrd"), accel="tcg", dax=DEFAULT_DAX,
                    nvdimms=(Path("/c/nvdimm0.img"), Path("/c/nvdimm1.img")),
                    boot_file=Path("/k/vmlinux"), firmware=Path("/q/qboot.rom"))


def _pairs(argv, flag):
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_a_plan_names_its_run_dir_and_maps_private_copies_there():
    spec = plan(INPUTS)
    assert spec.run_dir == RUN_DIR
    assert spec.nvdimm_files == (RUN_DIR / "nvdimm0.img", RUN_DIR / "nvdimm1.img")
    assert spec.nvdimm_sources == INPUTS.nvdimms
    argv = vm.qemu_argv(spec)
    assert _pairs(argv, "-kernel") == ["/k/vmlinux"] and _pairs(argv, "-bios") == ["/q/qboot.rom"]
    assert all("/c/" not in a for a in argv)  # the cached files are never mapped
    assert vm.launch_command(spec)[:4] == ["setpriv", "--pdeathsig", "KILL", "--"]
    assert vm.launch_command(spec)[4:] == argv


def test_events_bring_a_gdbstub_and_one_cpu():
    spec = plan(INPUTS, events=True)
    assert spec.gdbstub and spec.cpus == 1
    assert _pairs(vm.qemu_argv(spec), "-gdb") == [f"unix:{RUN_DIR}/gdb.sock,server=on,wait=off"]
    assert plan(INPUTS).cpus == 2 and not plan(INPUTS).gdbstub
    assert plan(INPUTS, events=True, cpus=2).cpus == 2


def test_shell_puts_the_console_and_monitor_on_the_terminal():
    spec = plan(INPUTS, shell=True)
    argv = vm.qemu_argv(spec)
    assert _pairs(argv, "-serial") == ["mon:stdio"]
    assert vm.kernel_cmdline(spec).endswith("devdax_lab.shell=1")
    assert _pairs(vm.qemu_argv(plan(INPUTS)), "-serial") == ["stdio"]


def test_the_preparing_boot_writes_the_files_themselves():
    inputs = BootInputs(**{**INPUTS.__dict__, "dax": PUD_LAYOUT,
                           "nvdimms": tuple(Path(f"/tmp/p/nvdimm{i}.img") for i in range(3))})
    spec = plan(inputs, prepare=True)
    assert spec.nvdimm_files == inputs.nvdimms
    assert "devdax_lab.prepare=1G:4G,4K,2M" in vm.kernel_cmdline(spec)
    assert prepare_arg(PUD_LAYOUT) == "1G:4G,4K,2M"


def test_a_choice_keeps_the_spelling():
    tree = KernelArtifacts(name="obj", release="6.12.1", vmlinuz=Path("/t/obj/bz"),
                           vmlinux=Path("/t/obj/vmlinux"), root=Path("/t/obj"))
    choice = KernelChoice(spelling="/t/obj", artifacts=tree, source="tree")
    assert choice.name == "obj" and choice.spelling == "/t/obj"


def test_a_tree_by_path_resolves_once_with_the_path_kept(tmp_path):
    from lab.launch import resolve_kernel

    tree = tmp_path / "mytree"
    (tree / "arch" / "x86" / "boot").mkdir(parents=True)
    (tree / "arch" / "x86" / "boot" / "bzImage").write_bytes(b"bz")
    (tree / "vmlinux").write_bytes(b"elf")
    choice = resolve_kernel(str(tree))
    assert (choice.spelling, choice.name, choice.source) == (str(tree), "mytree", "tree")
    assert resolve_kernel(choice) is choice  # passed down, never resolved again
