"""The saved state's command line and cache key (no VM): the key changes with
every input, and a restore maps the saved files copy-on-write."""

import dataclasses
import os

import pytest

from lab import vm, warm
from lab.model import DEFAULT_DAX, KernelArtifacts
from lab.plan import BootInputs, plan


@pytest.fixture
def spec(tmp_path, monkeypatch):
    monkeypatch.setenv("DEVDAX_LAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(warm, "_qemu_version", lambda qemu: "QEMU emulator version 7.2.0")
    files = {}
    for name in ("vmlinux", "bzImage", "initrd", "nvdimm0.img", "nvdimm1.img"):
        files[name] = tmp_path / name
        files[name].write_bytes(name.encode())
    kernel = KernelArtifacts(name="before", release="6.12.0", vmlinuz=files["bzImage"],
                             vmlinux=files["vmlinux"])
    inputs = BootInputs(kernel=kernel, initrd=files["initrd"], accel="tcg", dax=DEFAULT_DAX,
                        nvdimms=(files["nvdimm0.img"], files["nvdimm1.img"]),
                        boot_file=files["vmlinux"])
    return plan(inputs)


def _pairs(argv, flag):
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_a_restore_maps_the_saved_files_copy_on_write_and_waits_for_the_state(spec):
    hot = warm.warm_spec(spec)
    entry = hot.restore_from
    assert entry.parent.name == "warm" and entry.name.startswith("before-")
    argv = vm.qemu_argv(hot)
    objects = _pairs(argv, "-object")
    assert f"mem-path={entry}/ram,share=off" in objects[0]
    assert all("share=off" in o and f"mem-path={entry}/nvdimm" in o for o in objects[1:])
    assert argv[-2:] == ["-incoming", "defer"]
    cold = vm.qemu_argv(spec)
    assert "-incoming" not in cold and all("share=on" in o for o in _pairs(cold, "-object"))
    # the rest of the line is the cold boot's: what the state was saved from
    assert _pairs(argv, "-kernel") == [f"{entry}/kernel"]  # the copy without debug sections
    strip = lambda a: [x for x in a if "mem-path" not in x and "vmlinux" not in x  # noqa: E731
                       and not x.endswith("/kernel") and x not in ("-incoming", "defer")]
    assert strip(argv) == strip(cold)


def test_the_key_changes_with_every_input(spec):
    key = warm.state_key(spec)
    assert warm.state_key(spec) == key == warm.state_key(warm.warm_spec(spec))
    assert warm.state_key(dataclasses.replace(spec, cpus=1, gdbstub=True)) != key
    assert warm.state_key(dataclasses.replace(spec, cmdline_extra=("x=1",))) != key
    st = spec.initrd.stat()
    os.utime(spec.initrd, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # a rebuilt image
    assert warm.state_key(spec) != key


def test_no_restore_for_the_shell_the_preparing_boot_or_a_tree_by_path(spec):
    assert warm.can_restore(spec, "built") and warm.can_restore(spec, "system")
    assert not warm.can_restore(dataclasses.replace(spec, shell=True), "system")
    assert not warm.can_restore(dataclasses.replace(spec, nvdimms_in_place=True), "system")
    assert not warm.can_restore(spec, "tree")


def test_prune_keeps_the_most_recently_used_states_of_a_kernel(tmp_path):
    import os

    for i in range(6):
        d = tmp_path / f"before-{i:016x}"
        d.mkdir()
        (d / warm.MANIFEST).write_text("{}")
        os.utime(d, (1000 + i, 1000 + i))
    other = tmp_path / "after-0000000000000000"
    other.mkdir()
    (other / warm.MANIFEST).write_text("{}")
    os.utime(other, (1, 1))
    (tmp_path / "before-ffffffffffffffff").mkdir()  # no manifest yet: being made
    (tmp_path / "before-x-0000000000000000").mkdir()  # another kernel, "before-x"
    (tmp_path / "before-x-0000000000000000" / warm.MANIFEST).write_text("{}")
    warm.used(tmp_path / f"before-{0:016x}")  # the oldest, restored just now
    removed = warm.prune(tmp_path, "before", keep=4)
    assert sorted(d.name for d in removed) == [f"before-{i:016x}" for i in (1, 2)]
    assert other.exists() and (tmp_path / "before-ffffffffffffffff").exists()
    assert (tmp_path / "before-x-0000000000000000").exists()
