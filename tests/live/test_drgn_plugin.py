"""Live: the drgn helpers and the plugin's commands, run by drgn itself (a
subprocess with the plugin enabled) against the lab's guest on both kernels,
agree with the lab's readers on a fork-shared device-dax folio."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import pytest

from lab import inspect
from lab.inspect.attach import debug_files_for
from lab.model import MiB

pytestmark = pytest.mark.live



def plugin_env(tmp: Path) -> dict[str, str]:
    """Environment in which drgn finds the plugin by its ``drgn.plugins``
    entry point, as declared in pyproject.toml: a dist-info directory on the
    path carrying that entry point (what `pip install` writes), so the test
    does not depend on how the shared venv was installed."""
    meta = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    points = meta["project"]["entry-points"]["drgn.plugins"]
    dist = tmp / "devdax_lab_plugin_probe-0.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: devdax-lab-plugin-probe\n"
                                   "Version: 0\n")
    (dist / "entry_points.txt").write_text(
        "[drgn.plugins]\n" + "".join(f"{k} = {v}\n" for k, v in points.items()))
    path = os.pathsep.join(p for p in (str(tmp), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path}

_RUN = ("import sys\nfrom drgn.commands import run_command\n"
        "for c in sys.argv[1:]:\n    print('=== ' + c, flush=True)\n    run_command(prog, c)\n")


def run_drgn(target: list[str], kernel, *commands: str) -> dict[str, str]:
    """Run *commands* in `drgn` (the CLI, as a user would start it) on
    *target* (``--qemu SOCK`` or ``-c VMCORE``); {command: output}."""
    symbols = [a for p in debug_files_for(kernel) for a in ("-s", str(p))]
    argv = [sys.executable, "-m", "drgn", "--log-level", "warning", *target, "--no-default-symbols", *symbols,
            "-e", _RUN, *commands]
    with tempfile.TemporaryDirectory(prefix="drgn-plugin-") as tmp:
        env = {**os.environ, **plugin_env(Path(tmp)), "DRGN_PLUGINS": "devdax_lab"}
        out = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert "devdax_lab" not in out.stderr, out.stderr  # drgn's "not found"/"failed to load"
    assert "error" not in out.stdout.lower(), out.stdout
    parts = re.split(r"^=== (.*)\n", out.stdout, flags=re.M)[1:]
    return dict(zip(parts[::2], parts[1::2]))


def fields(text: str) -> dict[str, str]:
    """``name value ...`` lines of the folio command by name."""
    return {line.split()[0]: line.split()[1] for line in text.splitlines() if line.strip()}


def fork_share(session, proc="fs", child="fsc"):
    """A 2M device folio mapped by a process and its fork child (both
    touched): (pfn, address, {proc: pid})."""
    agent = session.agent
    dev = session.vm.device("2M")
    addr = agent.mmap(proc, dev["name"], 4 * MiB, align=2 * MiB)
    agent.touch(proc, [addr + 4096], write=True)
    agent.fork(proc, child)
    agent.touch(child, [addr + 4096], write=True)
    pfn = agent.pagemap(proc, [addr + 4096])[0]["pfn"]
    return pfn, addr + 4096, {p: session.pid(p) for p in (proc, child)}


def check_against_readers(session, out: dict[str, str], state, pgmap, ptes, pfn, pids, addr):
    folio = fields(out[f"folio {pfn:#x}"])
    assert int(folio["PFN"], 0) == pfn
    assert int(folio["refcount"]) == state.refcount
    assert int(folio["_mapcount"]) == state.mapcount
    assert int(folio["entire_mapcount"]) == state.entire_mapcount + 1
    assert int(folio["large_mapcount"]) == state.large_mapcount + 1
    assert int(folio["pincount"]) == state.pincount
    assert int(folio["pgmap"], 0) == pgmap.address
    text = out[f"pgmap {pfn:#x}"]
    assert f"ref {pgmap.ref.count}  ({pgmap.ref.mode})" in text
    assert f"vmemmap_shift {pgmap.vmemmap_shift}" in text
    for proc, pid in pids.items():
        leaf = [line for line in out[f"pte {pid} {addr:#x}"].splitlines() if "leaf" in line]
        assert len(leaf) == 1 and leaf[0].split()[0] == ptes[proc].level
        assert int(leaf[0].split()[2], 0) == ptes[proc].raw
    # the devdax listing: the 2M device, its folio count, and our folio
    # listed exactly when the kernel counts it as busy
    device = out["devdax"].split(f"pgmap {pgmap.address:#x}")[1].split("\n\n")[0]
    idle = int(re.search(r"idle refcount (-?\d+)", device).group(1))
    dev = session.vm.device("2M")  # the namespace's own account (sysfs)
    assert f"data from PFN {dev['start'] >> 12:#x}  folios {dev['size'] // (2 * MiB)}  " in device
    busy = state.large_mapcount >= 0 or state.pincount > 0 or state.refcount != idle
    listed = f"PFN {state.folio_pfn:#x}  refcount {state.refcount}  " in device
    assert listed == busy, device


def test_plugin_commands_agree_with_the_readers(session):
    pfn, addr, pids = fork_share(session)
    try:
        with session.stopped():
            state = inspect.folio_state(session.prog, pfn)
            pgmap = inspect.pgmap_state(session.prog, inspect.find_dev_pagemap(session.prog, pfn))
            ptes = {p: inspect.pte_state(session.prog, pid, addr) for p, pid in pids.items()}
            session.detach()  # QEMU serves one client per QMP socket: drgn's turn
            try:
                out = run_drgn(["--qemu", str(session.vm.spec.run_dir / "drgn-qmp.sock")],
                               session.kernel, f"folio {pfn:#x}", f"pgmap {pfn:#x}",
                               *(f"pte {pid} {addr:#x}" for pid in pids.values()), "devdax")
            finally:
                session.attach()
        # both processes map it: two entries whatever the kernel counts
        assert state.order == 9
        assert len({ptes[p].pfn for p in pids}) == 1
        check_against_readers(session, out, state, pgmap, ptes, pfn, pids, addr)
    finally:
        for proc in reversed(list(pids)):
            session.agent.exit(proc)


def test_a_dump_reads_like_the_live_guest(session, tmp_path):
    """A vmcore written at a fork-share state: the readers on the dump (no
    VM) see what they saw live, every struct page of the device included;
    plain `drgn -c` with the plugin and `devdax-lab inspect --core` print
    the same counters."""
    import numpy as np

    from lab.api import Lab
    from lab.inspect.core import dump_guest_memory

    pfn, addr, pids = fork_share(session, "ds", "dsc")
    dev = session.vm.device("2M")
    first, count = dev["start"] >> 12, dev["size"] >> 12
    vmcore = tmp_path / "vmcore"
    try:
        with session.stopped():
            prog = session.prog
            live = (inspect.folio_state(prog, pfn), inspect.folio_state(prog, pfn & ~511),
                    inspect.pgmap_state(prog, inspect.find_dev_pagemap(prog, pfn)),
                    {p: inspect.pte_state(prog, pid, addr) for p, pid in pids.items()},
                    {p: inspect.mm_rss(prog, pid) for p, pid in pids.items()})
            live_pages = inspect.read_pages(prog, first, count)
            info = dump_guest_memory(session.vm.qmp, vmcore)
        print(f"dump: {info.size / 2**30:.2f} GiB in {info.seconds:.1f} s")
        assert info.size > 1 << 30  # RAM (1 GiB) and the NVDIMMs
        core = Lab.open_core(vmcore, session.kernel_spelling)
        cprog = core.prog
        dumped = (core.folio(pfn), core.folio(pfn & ~511), core.pgmap(pfn),
                  {p: core.pte(pid, addr) for p, pid in pids.items()},
                  {p: inspect.mm_rss(cprog, pid) for p, pid in pids.items()})
        assert dumped == live
        core_pages = inspect.read_pages(cprog, first, count)
        for field in ("flags", "refcount", "mapcount", "head_pfn"):
            assert np.array_equal(getattr(core_pages, field), getattr(live_pages, field)), field
        del core, cprog

        state, _, pgmap, ptes, _ = live
        out = run_drgn(["-c", str(vmcore)], session.kernel, f"folio {pfn:#x}", f"pgmap {pfn:#x}",
                       *(f"pte {pid} {addr:#x}" for pid in pids.values()), "devdax")
        check_against_readers(session, out, state, pgmap, ptes, pfn, pids, addr)

        cli = subprocess.run(
            [sys.executable, "-m", "lab.cli", "inspect", "--core", str(vmcore), "--kernel",
             session.kernel_spelling, "--folio", hex(pfn)],
            capture_output=True, text=True, timeout=300)
        assert cli.returncode == 0, cli.stderr
        assert fields(cli.stdout) == fields(out[f"folio {pfn:#x}"])
    finally:
        vmcore.unlink(missing_ok=True)
        for proc in reversed(list(pids)):
            session.agent.exit(proc)


@pytest.mark.parametrize("kernel", ["before", "after"])
def test_run_dump_at_a_step_holds_that_steps_snapshot(kernel, tmp_path):
    """`devdax-lab run fork-share --dump-at 4` (b has touched pages 2, 3, 6):
    every timeline row of step 4, read again from the dump with no VM,
    has the counters and pgmap reference the run recorded live."""
    import pandas as pd

    from lab.api import Lab
    from lab.columns import COUNTERS
    from lab.paths import scenario_path

    out = tmp_path / "run"
    run = subprocess.run(
        [sys.executable, "-m", "lab.cli", "run", str(scenario_path("fork-share")), "--kernel",
         kernel, "--out", str(out), "--dump-at", "4"], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr
    vmcore = out / f"vmcore-{kernel}-step4"
    try:
        assert f"step 4: guest memory dumped to {vmcore}" in run.stdout
        rows = pd.read_parquet(out / "timeline.parquet").query("step == 4")
        assert len(rows) > 0
        core = Lab.open_core(vmcore, kernel)
        for row in rows.itertuples():
            state = core.folio(int(row.pfn))
            for column in COUNTERS:
                want = getattr(row, column.name)
                assert getattr(state, column.name) == (None if pd.isna(want) else want), \
                    (row.pfn, column.name)
            assert state.folio_pfn == row.folio_pfn and state.order == row.order
        assert core.pgmap(int(rows.pfn.iloc[0])).ref.count == rows.pgmap_ref.iloc[0]
    finally:
        vmcore.unlink(missing_ok=True)


def test_run_dump_at_complaint_dumps_the_step_that_complained(tmp_path):
    """`--dump-at complaint`: the first step whose console shows a kernel
    complaint is dumped (here a WARNING line written to /dev/kmsg, which the
    lab records as a complaint exactly as a real WARN splat), and no other."""
    from lab.api import Lab

    scenario = tmp_path / "warn.toml"
    scenario.write_text(
        '[device]\nalign = "4K"\n\n'
        '[[step]]\naction = "mmap"\nproc = "a"\nname = "m"\nlength = "16K"\n\n'
        '[[step]]\naction = "touch"\nmap = "m"\npages = [0]\nwrite = true\n\n'
        '[[step]]\naction = "snapshot"\n\n'
        '[[step]]\naction = "snapshot"\n\n'
        '[[step]]\naction = "kmsg"\ntext = "<4>WARNING: devdax-lab test complaint"\n\n'
        '[[step]]\naction = "snapshot"\n')
    out = tmp_path / "run"
    run = subprocess.run(
        [sys.executable, "-m", "lab.cli", "run", str(scenario), "--kernel", "after", "--out",
         str(out), "--dump-at", "complaint"], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr
    dumps = sorted(p.name for p in out.glob("vmcore-*"))
    try:
        assert dumps == ["vmcore-after-step5"], dumps  # the kmsg step, not the snapshot after
        core = Lab.open_core(out / dumps[0], "after")
        assert core.prog is not None
    finally:
        for p in out.glob("vmcore-*"):
            p.unlink()
