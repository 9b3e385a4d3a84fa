"""The real guest agent, compiled and run on the host against a socketpair.

A regular 16 MiB file stands in for /dev/dax0.0 (--device-dir) and a fake
sysfs tree for /sys/bus/dax/devices (--sysfs-dax), so every command runs
without a VM.  Nothing here powers anything off: poweroff must be refused.
"""

from __future__ import annotations

import errno
import mmap as _mmap
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from lab.agent import AgentClient, AgentDisconnected, AgentError, AgentTimeout
from lab.data import data_path

AGENT_SRC = data_path("vm-images", "agent", "agent.c")
PAGE = _mmap.PAGESIZE
MiB = 1 << 20
DEV_SIZE = 16 * MiB
MADV_DONTNEED = 4


@pytest.fixture(scope="session")
def agent_bin(tmp_path_factory) -> Path:
    """agent.c built exactly as the image builder does; warnings fail the test."""
    gcc = shutil.which("gcc")
    assert gcc, "gcc is required to build the guest agent"
    out = tmp_path_factory.mktemp("agent") / "agent"
    cmd = [gcc, "-static", "-O2", "-Wall", "-Wextra", "-o", str(out), str(AGENT_SRC)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"agent.c does not compile:\n{proc.stderr}"
    assert "warning" not in proc.stderr, f"agent.c compiles with warnings:\n{proc.stderr}"
    return out


@pytest.fixture
def fake_dirs(tmp_path) -> tuple[Path, Path]:
    """A device dir with a 16 MiB dax0.0 file and a sysfs tree in which
    dax0.0 links into region0 (as on a real kernel) and dax1.0 is a plain
    directory without an align file."""
    dev = tmp_path / "dev"
    dev.mkdir()
    with open(dev / "dax0.0", "wb") as f:
        f.truncate(DEV_SIZE)

    sysfs = tmp_path / "sys"
    real = sysfs / "devices" / "platform" / "e820_pmem" / "ndbus0" / "region0" / "dax0.0"
    real.mkdir(parents=True)
    (real / "size").write_text(f"{DEV_SIZE}\n")
    (real / "align").write_text("2097152\n")
    (real / "resource").write_text("0x240000000\n")
    bus = sysfs / "bus" / "dax" / "devices"
    bus.mkdir(parents=True)
    (bus / "dax0.0").symlink_to(os.path.relpath(real, bus))
    other = bus / "dax1.0"
    other.mkdir()
    (other / "size").write_text("1073741824\n")
    (other / "resource").write_text("0x1000000000\n")
    return dev, bus


class Agent:
    """A running agent: its process, the client, and the raw host socket."""

    def __init__(self, proc: subprocess.Popen, sock: socket.socket, dev: Path, log: Path,
                 files: Path):
        self.proc = proc
        self.sock = sock
        self.client = AgentClient(sock)
        self.dev = dev
        self.log = log
        self.files = files


@pytest.fixture
def agent(agent_bin, fake_dirs, tmp_path):
    dev, sysfs = fake_dirs
    host, child = socket.socketpair()
    log = tmp_path / "agent.stderr"
    files = tmp_path / "files"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [str(agent_bin), "-", "--device-dir", str(dev), "--sysfs-dax", str(sysfs),
             "--files-dir", str(files)],
            stdin=child, stdout=child, stderr=err,
        )
    child.close()
    try:
        yield Agent(proc, host, dev, log, files)
    finally:
        proc.kill()
        proc.wait(timeout=10)
        host.close()


def _errno_of(excinfo) -> int:
    return excinfo.value.errno


def _wait_gone(pid: int, zombie_ok: bool = True, timeout: float = 5.0) -> None:
    """Wait until *pid* has exited.  With *zombie_ok* a zombie counts as gone:
    once the agent itself is dead, reaping its orphans is the host init's job."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            return
        if zombie_ok and stat.rsplit(")", 1)[1].split()[0] == "Z":
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} did not go away")


# -- agent-level commands -----------------------------------------------------


def test_ping(agent):
    info = agent.client.ping()
    assert info == {"release": os.uname().release, "pid": agent.proc.pid}


def test_namespaces_parses_fake_sysfs(agent):
    devs = agent.client.namespaces()
    assert devs == [
        {"name": "dax0.0", "size": DEV_SIZE, "align": 2 * MiB, "start": 0x240000000,
         "region": "region0"},
        {"name": "dax1.0", "size": 1 << 30, "align": None, "start": 0x1000000000,
         "region": None},
    ]


@pytest.mark.parametrize(
    "text",
    [
        "",
        'quotes " and \\ backslashes \\" \\\\',
        "control \n\r\t\b\f \x01 \x1f \x7f",
        "unicode é ß 中文 😀 \U0010ffff",
        "nul \x00 inside",
        "json-looking {\"id\": 1, \"ok\": false}",
    ],
)
def test_echo_round_trips(agent, text):
    assert agent.client.echo(text) == text


def test_poweroff_is_refused_on_the_host(agent):
    with pytest.raises(AgentError) as info:
        agent.client.poweroff()
    assert info.value.errno == errno.EPERM
    assert "poweroff" in info.value.message
    assert agent.client.ping()["pid"] == agent.proc.pid


@pytest.mark.parametrize("path, err", [
    ("/etc/hostname", errno.EINVAL),  # only files under /sys
    ("/sys/../etc/hostname", errno.EINVAL),
    ("/sys/devdax-lab-no-such-file", errno.ENOENT),  # sysfs creates nothing
])
def test_sysfs_writes_only_existing_files_under_sys(agent, path, err):
    with pytest.raises(AgentError) as info:
        agent.client.sysfs(path, "x")
    assert info.value.errno in (err, errno.EACCES) and "sysfs" in info.value.message


def test_unknown_command_and_bad_arguments(agent):
    c = agent.client
    with pytest.raises(AgentError) as info:
        c.request("frobnicate")
    assert info.value.errno == errno.EINVAL and "frobnicate" in info.value.message
    with pytest.raises(AgentError) as info:
        c.request("touch", proc="nobody", addrs=[], write=True)
    assert info.value.errno == errno.ENOENT and "nobody" in info.value.message
    with pytest.raises(AgentError) as info:
        c.request("mmap", proc="a", device="dax0.0")  # no length
    assert info.value.errno == errno.EINVAL and "length" in info.value.message
    with pytest.raises(AgentError) as info:
        c.request("mmap", proc="a", device="dax0.0", length="4096")
    assert info.value.errno == errno.EINVAL and "length" in info.value.message
    with pytest.raises(AgentError) as info:
        c.request("mmap", proc="a/b", device="dax0.0", length=PAGE)
    assert info.value.errno == errno.EINVAL
    with pytest.raises(AgentError) as info:
        c.request("echo")
    assert info.value.errno == errno.EINVAL
    assert c.ping()


def test_malformed_lines_get_answers(agent):
    c = agent.client
    cases = [
        (b"{not json\n", -1),
        (b"[1, 2]\n", -1),
        (b'{"cmd": "ping"}\n', -1),
        (b'{"id": 7, "cmd": 5}\n', 7),
        (b'{"id": 8, "cmd": "echo", "text": 1.5}\n', 8),
        (b'{"id": 9, "cmd": "echo", "text": {"a": 1}}\n', 9),
        (b'{"id": 10, "cmd": "echo", "text": "x"} trailing\n', 10),
        (b'{"id": 11, "cmd": "echo", "text": "\\ud800"}\n', 11),
        (b'{"id": 12, "cmd": "touch", "proc": "a", "addrs": [18446744073709551616]}\n', 12),
        (b'{"id": 13, "cmd": "touch", "proc": "a", "addrs": [-1]}\n', 13),
        (b'{"id": 14, "cmd": "ping", "id": 15}\n', 14),
        (b'{"id": 16, "cmd": "touch", "proc": "a", "addrs": [1 2]}\n', 16),
        (b'{"id": 17, "cmd": "echo", "text": "x", "argv": ["a" "b"]}\n', 17),
    ]
    for line, want_id in cases:
        resp = c.exchange_raw(line)
        assert resp["id"] == want_id, line
        assert resp["ok"] is False and resp["errno"] == errno.EINVAL, (line, resp)
        if want_id in (16, 17):  # an element not followed by , or ]
            assert "expected , or ] in array" in resp["error"], resp
    # Blank lines are ignored; \r\n endings and spacing are fine.
    resp = c.exchange_raw(b'\n  \n{ "id" : 20 , "cmd" : "echo" , "text" : "ok" }\r\n')
    assert resp == {"id": 20, "ok": True, "text": "ok"}
    assert c.ping()["pid"] == agent.proc.pid


def test_stale_responses_are_skipped(agent):
    agent.sock.sendall(b'{"id": 0, "cmd": "echo", "text": "stale"}\n')
    assert agent.client.echo("fresh") == "fresh"


def test_disconnect_is_reported(agent):
    agent.proc.kill()
    agent.proc.wait(timeout=10)
    with pytest.raises(AgentDisconnected):
        agent.client.ping(timeout=5)


def test_timeout_is_reported(agent):
    agent.proc.send_signal(signal.SIGSTOP)
    try:
        with pytest.raises(AgentTimeout) as info:
            agent.client.ping(timeout=0.2)
        assert info.value.cmd == "ping" and info.value.timeout == 0.2
    finally:
        agent.proc.send_signal(signal.SIGCONT)
    # The late answer to the timed-out ping is skipped by id.
    assert agent.client.echo("after") == "after"


# -- worker commands ------------------------------------------------------------


def test_mmap_touch_pagemap(agent):
    c = agent.client
    addr = c.mmap("a", "dax0.0", DEV_SIZE)
    assert addr % PAGE == 0
    pages = [addr + i * PAGE for i in range(8)]
    before = c.pagemap("a", pages)
    assert [e["addr"] for e in before] == pages
    assert c.touch("a", pages[:4], write=True) == 4
    after = c.pagemap("a", pages)
    for entry in after[:4]:
        assert entry["present"] is True
        assert entry["raw"] >> 63 == 1
        if os.geteuid() == 0:  # PFNs are hidden from non-root
            assert entry["pfn"] > 0
    assert after[4]["pfn"] is None or after[4]["present"]
    assert c.touch("a", pages[4:], write=False) == 4
    assert all(e["present"] for e in c.pagemap("a", pages))
    assert c.procs() == {"a": c.procs()["a"]}
    # The store reached the file through the shared mapping.
    with open(agent.dev / "dax0.0", "rb") as f:
        assert f.read(1) != b"\0"


def test_mmap_errors_name_the_device(agent):
    with pytest.raises(AgentError) as info:
        agent.client.mmap("a", "dax9.9", PAGE)
    assert info.value.errno == errno.ENOENT
    assert info.value.message.startswith("mmap dax9.9: open ")
    with pytest.raises(AgentError) as info:
        agent.client.mmap("a", "../etc", PAGE)
    assert info.value.errno == errno.EINVAL


def test_mmap_align_and_options(agent):
    c = agent.client
    align = 8 * MiB
    addr = c.mmap("a", "dax0.0", 4 * MiB, offset=4 * MiB, align=align)
    assert addr % align == 0
    ro = c.mmap("a", "dax0.0", MiB, write=False, shared=False)
    with pytest.raises(AgentError) as info:
        c.touch("a", [ro], write=True)
    assert info.value.errno == errno.EFAULT
    assert c.touch("a", [ro], write=False) == 1
    anon = c.mmap("a", "anon", 2 * MiB, shared=False)
    assert c.touch("a", [anon], write=True) == 1


def test_fork_then_touch_in_child(agent):
    c = agent.client
    addr = c.mmap("parent", "dax0.0", DEV_SIZE)
    c.touch("parent", [addr], write=True)
    pid = c.fork("parent", "child")
    procs = c.procs()
    assert procs["child"] == pid and procs["parent"] != pid
    assert c.touch("child", [addr, addr + PAGE], write=True) == 2
    entries = c.pagemap("child", [addr, addr + PAGE])
    assert all(e["present"] for e in entries)
    with pytest.raises(AgentError) as info:
        c.fork("parent", "child")
    assert info.value.errno == errno.EEXIST
    with pytest.raises(AgentError) as info:
        c.fork("parent", "parent")
    assert info.value.errno == errno.EEXIST
    # The child outlives its parent worker.
    c.exit("parent")
    assert c.touch("child", [addr], write=False) == 1
    grandchild = c.fork("child", "grandchild")
    assert c.procs() == {"child": pid, "grandchild": grandchild}
    # Neither a worker's own child nor an orphan (reparented to the agent,
    # a subreaper) is left a zombie.
    c.exit("grandchild")
    _wait_gone(grandchild, zombie_ok=False)
    c.exit("child")
    _wait_gone(pid, zombie_ok=False)


def test_munmap_then_touch_faults_and_agent_survives(agent):
    c = agent.client
    addr = c.mmap("a", "dax0.0", MiB)
    c.touch("a", [addr], write=True)
    c.munmap("a", addr, MiB)
    with pytest.raises(AgentError) as info:
        c.touch("a", [addr], write=True)
    assert info.value.errno == errno.EFAULT
    assert "SIGSEGV" in info.value.message and hex(addr) in info.value.message
    assert c.ping()["pid"] == agent.proc.pid
    assert c.touch("a", [], write=True) == 0  # the worker survived too
    with pytest.raises(AgentError) as info:
        c.munmap("a", addr + 1, PAGE)
    assert info.value.errno == errno.EINVAL


def test_sigbus_beyond_end_of_file(agent):
    c = agent.client
    addr = c.mmap("a", "dax0.0", 2 * DEV_SIZE)  # the file is only DEV_SIZE long
    assert c.touch("a", [addr], write=True) == 1
    with pytest.raises(AgentError) as info:
        c.touch("a", [addr, addr + DEV_SIZE + PAGE], write=False)
    assert info.value.errno == errno.EFAULT
    assert "SIGBUS" in info.value.message and "1 of 2" in info.value.message


def test_huge_addresses_parse(agent):
    c = agent.client
    c.mmap("a", "dax0.0", PAGE)
    top = (1 << 64) - PAGE
    with pytest.raises(AgentError) as info:
        c.touch("a", [top], write=False)
    assert info.value.errno == errno.EFAULT and hex(top) in info.value.message
    [entry] = c.pagemap("a", [top])
    assert entry == {"addr": top, "raw": 0, "present": False, "pfn": None}


def test_madvise(agent):
    c = agent.client
    addr = c.mmap("a", "anon", MiB, shared=False)
    c.touch("a", [addr], write=True)
    c.madvise("a", addr, MiB, MADV_DONTNEED)
    assert c.pagemap("a", [addr])[0]["present"] is False
    with pytest.raises(AgentError) as info:
        c.madvise("a", addr, MiB, 12345)
    assert info.value.errno == errno.EINVAL
    assert "madvise" in info.value.message and "12345" in info.value.message


def test_mprotect(agent):
    c = agent.client
    addr = c.mmap("a", "dax0.0", MiB)
    c.mprotect("a", addr, MiB, "r")
    with pytest.raises(AgentError) as info:
        c.touch("a", [addr], write=True)
    assert info.value.errno == errno.EFAULT
    c.mprotect("a", addr, MiB, "")
    with pytest.raises(AgentError):
        c.touch("a", [addr], write=False)
    c.mprotect("a", addr, MiB, "rw")
    assert c.touch("a", [addr], write=True) == 1
    with pytest.raises(AgentError) as info:
        c.mprotect("a", addr, MiB, "rq")
    assert info.value.errno == errno.EINVAL


def _vma(maps: list[dict], addr: int) -> dict | None:
    """The VMA that contains *addr*, or None."""
    return next((v for v in maps if v["start"] <= addr < v["end"]), None)


def test_mremap_grow_in_place_then_move_then_shrink(agent):
    c = agent.client
    addr = c.mmap("a", "dax0.0", 48 * 1024)
    c.touch("a", [addr], write=True)
    c.munmap("a", addr + 16 * 1024, 16 * 1024)
    # the 16K after the first part is free: it grows where it is
    assert c.mremap("a", addr, 16 * 1024, 32 * 1024) == addr
    vma = _vma(c.maps("a"), addr)
    assert vma["path"].endswith("/dax0.0") and vma["offset"] == 0
    assert vma["end"] - addr == 48 * 1024  # merged with the untouched last 16K
    # no room after 32K without moving
    with pytest.raises(AgentError) as info:
        c.mremap("a", addr, 32 * 1024, 64 * 1024)
    assert info.value.errno == errno.ENOMEM and info.value.message.startswith("mremap 0x")
    new = c.mremap("a", addr, 32 * 1024, 64 * 1024, maymove=True)
    assert new != addr
    maps = c.maps("a")
    moved = _vma(maps, new)
    assert (moved["start"], moved["end"], moved["offset"]) == (new, new + 64 * 1024, 0)
    assert _vma(maps, addr) is None  # the old range is gone ...
    assert _vma(maps, addr + 32 * 1024)["offset"] == 32 * 1024  # ... but not what followed it
    # the page table entry moved with the mapping: same page, same data
    assert c.pagemap("a", [new])[0]["present"] is True
    assert c.mremap("a", new, 64 * 1024, PAGE) == new
    assert _vma(c.maps("a"), new)["end"] == new + PAGE


def test_mremap_fixed_and_refusals(agent):
    c = agent.client
    addr = c.mmap("a", "dax0.0", 4 * MiB, align=2 * MiB)
    target = c.mmap("a", "anon", 2 * MiB, shared=False)
    assert c.mremap("a", addr, MiB, MiB, maymove=True, fixed=True, new_addr=target) == target
    assert _vma(c.maps("a"), target)["path"].endswith("/dax0.0")
    with pytest.raises(AgentError) as info:  # MREMAP_FIXED needs MREMAP_MAYMOVE
        c.mremap("a", addr + MiB, MiB, MiB, fixed=True, new_addr=target)
    assert info.value.errno == errno.EINVAL
    with pytest.raises(AgentError) as info:
        c.mremap("a", addr + MiB + 1, PAGE, 2 * PAGE)
    assert info.value.errno == errno.EINVAL
    with pytest.raises(AgentError) as info:
        c.request("mremap", proc="a", addr=addr, old_length=PAGE)  # no new_length
    assert info.value.errno == errno.EINVAL and "new_length" in info.value.message


def test_mlock_munlock_show_in_smaps(agent):
    c = agent.client
    addr = c.mmap("a", "anon", 64 * 1024, shared=False)
    assert "lo" not in _vma(c.maps("a", smaps=True), addr)["vmflags"].split()
    c.mlock("a", addr, 64 * 1024)
    vma = _vma(c.maps("a", smaps=True), addr)
    assert "lo" in vma["vmflags"].split()
    assert vma["locked"] == vma["rss"] == 64 * 1024  # mlock faults the range in
    c.munlock("a", addr, 64 * 1024)
    vma = _vma(c.maps("a", smaps=True), addr)
    assert "lo" not in vma["vmflags"].split() and vma["locked"] == 0
    other = c.mmap("a", "anon", 64 * 1024, shared=False)
    c.mlock("a", other, 64 * 1024, onfault=True)
    vma = _vma(c.maps("a", smaps=True), other)
    assert {"lo", "lf"} <= set(vma["vmflags"].split()) and vma["rss"] == 0
    with pytest.raises(AgentError) as info:
        c.mlock("a", 1 << 46, PAGE)  # nothing mapped there
    assert info.value.errno == errno.ENOMEM and info.value.message.startswith("mlock")
    # plain maps has no smaps fields
    assert "vmflags" not in _vma(c.maps("a"), other)


# -- programs from the host ------------------------------------------------------

SCRIPT = b"""#!/bin/sh
echo "args:$#:$1|$2"
echo "to stderr" >&2
case "$1" in
  exit) exit "$2" ;;
  kill) kill -TERM $$ ;;
  sleep) sleep "$2" ;;
  big) head -c "$2" /dev/zero ;;
  bytes) printf '\377\001\n' ;;
  orphan) sleep 30 & echo started ;;
esac
"""


def test_put_and_run_status_output_and_args(agent):
    c = agent.client
    assert c.put_file("prog", SCRIPT) == len(SCRIPT)
    assert (agent.files / "prog").read_bytes() == SCRIPT
    assert os.stat(agent.files / "prog").st_mode & 0o777 == 0o700
    res = c.run("prog", ["exit", "3"])
    assert (res.status, res.signal, res.timed_out, res.ok) == (3, None, False, False)
    assert res.stdout == b"args:2:exit|3\n" and res.stderr == b"to stderr\n"
    assert c.run("prog", ["two words", "é"]).stdout == "args:2:two words|é\n".encode()
    assert c.run("prog").stdout == b"args:0:|\n" and c.run("prog").ok
    res = c.run("prog", ["kill"])
    assert (res.status, res.signal) == (None, signal.SIGTERM)
    assert c.run("prog", ["bytes"]).stdout.endswith(b"\xff\x01\n")


def test_run_timeout_and_output_limit(agent):
    c = agent.client
    c.put_file("prog", SCRIPT)
    res = c.run("prog", ["sleep", "20"], timeout=0.5)
    assert res.timed_out and res.signal == signal.SIGKILL and res.elapsed < 5
    res = c.run("prog", ["big", str(3 * MiB)])
    assert res.ok and res.stdout_bytes == 3 * MiB + len("args:2:big|3145728\n")
    assert len(res.stdout) == MiB
    # a background child holding stdout is killed with the program's group
    res = c.run("prog", ["orphan"], timeout=20)
    assert res.ok and res.stdout.endswith(b"started\n") and res.elapsed < 5
    assert c.ping()


def test_put_in_chunks_and_run_binary(agent, agent_bin):
    c = agent.client
    data = os.urandom(3 * 1024 * 1024 + 17)  # four chunks
    assert c.put_file("blob", data) == len(data)
    assert (agent.files / "blob").read_bytes() == data
    assert c.put_file("blob", b"short") == 5  # a new put replaces the file
    # a real static binary: the agent itself answers --help
    res = c.run_binary(agent_bin, ["--help"])
    assert res.ok and res.stdout.startswith(b"usage: agent")


def test_put_and_run_refusals(agent):
    c = agent.client
    for name in ("../x", "a/b", ""):
        with pytest.raises(AgentError) as info:
            c.put_file(name, b"x")
        assert info.value.errno == errno.EINVAL
    with pytest.raises(AgentError) as info:
        c.request("put", name="x", data="not base64!")
    assert info.value.errno == errno.EINVAL and "base64" in info.value.message
    with pytest.raises(AgentError) as info:
        c.run("missing")
    assert info.value.errno == errno.ENOENT and "put first" in info.value.message
    c.put_file("x", b"#!/bin/sh\n")
    with pytest.raises(AgentError) as info:
        c.request("run", name="x", args=[1, 2])
    assert info.value.errno == errno.EINVAL and "args" in info.value.message
    with pytest.raises(AgentError) as info:
        c.request("run", name="x", timeout_ms=0)
    assert info.value.errno == errno.EINVAL


@pytest.mark.parametrize("device", ["dax0.0", "anon"])
def test_pin_unpin(agent, device):
    """io_uring may refuse a file mapping (or be disabled): then the refusal
    must come back as a clean error and everything keeps working."""
    c = agent.client
    addr = c.mmap("a", device, 2 * MiB, shared=device != "anon")
    c.touch("a", [addr], write=True)
    try:
        pin = c.pin("a", addr, 2 * MiB)
    except AgentError as exc:
        assert exc.errno in (errno.EOPNOTSUPP, errno.EFAULT, errno.EPERM, errno.ENOSYS,
                             errno.ENOMEM, errno.EINVAL), exc
        assert exc.message.startswith("pin")
    else:
        assert isinstance(pin, int) and pin > 0
        second = c.pin("a", addr, PAGE)
        assert second != pin
        c.unpin("a", pin)
        c.unpin("a", second)
        with pytest.raises(AgentError) as info:
            c.unpin("a", pin)
        assert info.value.errno == errno.ENOENT
    assert c.touch("a", [addr], write=True) == 1
    assert c.ping()


def test_splice_and_drain(agent):
    c = agent.client
    addr = c.mmap("a", "dax0.0", 4 * MiB)
    c.touch("a", [addr + i * PAGE for i in range(16)], write=True)
    got = c.splice("a", addr, 16 * PAGE)
    assert got["bytes"] == 16 * PAGE
    big = c.splice("a", addr, 4 * MiB)  # more than a default pipe can hold
    assert 0 < big["bytes"] <= 4 * MiB
    assert big["pipe"] != got["pipe"]
    c.munmap("a", addr, 4 * MiB)  # the pipes keep their page references
    assert c.drain("a", got["pipe"]) == 16 * PAGE
    assert c.drain("a", big["pipe"]) == big["bytes"]
    with pytest.raises(AgentError) as info:
        c.drain("a", got["pipe"])
    assert info.value.errno == errno.ENOENT
    with pytest.raises(AgentError) as info:
        c.splice("a", addr, PAGE)  # unmapped now
    assert info.value.errno == errno.EFAULT


def test_exit_then_esrch_and_name_reuse(agent):
    c = agent.client
    c.mmap("a", "dax0.0", PAGE)
    pid = c.procs()["a"]
    assert c.exit("a", status=3) == pid
    # the answer comes once the process is gone (its mm torn down), not before
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(AgentError) as info:
        c.touch("a", [], write=False)
    assert info.value.errno == errno.ESRCH
    assert info.value.message == "touch: process a has exited"
    with pytest.raises(AgentError) as info:
        c.exit("a")
    assert info.value.errno == errno.ESRCH
    assert "a" not in c.procs()
    _wait_gone(pid, zombie_ok=False)  # reaped by the agent, no zombie left
    # mmap creates a fresh worker under the old name.
    c.mmap("a", "dax0.0", PAGE)
    assert c.procs()["a"] != pid
    with pytest.raises(AgentError) as info:
        c.exit("a", status=300)
    assert info.value.errno == errno.EINVAL


def test_exit_of_a_forked_child_answers_once_it_is_gone(agent):
    c = agent.client
    c.mmap("a", "dax0.0", PAGE)
    c.fork("a", "b")
    pid = c.procs()["b"]
    assert c.exit("b") == pid
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert "a" in c.procs() and "b" not in c.procs()


def test_worker_death_is_noticed(agent):
    c = agent.client
    c.mmap("a", "dax0.0", PAGE)
    pid = c.procs()["a"]
    os.kill(pid, signal.SIGKILL)
    _wait_gone(pid, zombie_ok=False)
    with pytest.raises(AgentError) as info:
        c.touch("a", [], write=False)
    assert info.value.errno == errno.ESRCH
    assert c.procs() == {}


def test_workers_die_with_the_agent(agent):
    c = agent.client
    c.mmap("a", "dax0.0", PAGE)
    c.fork("a", "b")
    pids = list(c.procs().values())
    agent.proc.kill()
    agent.proc.wait(timeout=10)
    for pid in pids:
        _wait_gone(pid)


def test_many_requests_in_flight(agent):
    """Pipelined requests to several workers all come back, each once."""
    c = agent.client
    addr = c.mmap("a", "dax0.0", MiB)
    c.mmap("b", "dax0.0", MiB)
    lines = []
    for i in range(100, 160):
        proc = "a" if i % 2 else "b"
        lines.append(f'{{"id":{i},"cmd":"pagemap","proc":"{proc}","addrs":[{addr}]}}\n')
    agent.sock.sendall("".join(lines).encode())
    seen = sorted(c.exchange_raw(b"")["id"] for _ in range(60))
    assert seen == list(range(100, 160))


def test_large_requests_and_replies(agent):
    """Replies far above the default socket buffer still cross the worker
    channel; the array limit is enforced with E2BIG."""
    c = agent.client
    addr = c.mmap("a", "dax0.0", DEV_SIZE)
    pages = [addr + i * PAGE for i in range(DEV_SIZE // PAGE)]
    assert c.touch("a", pages, write=True) == len(pages)
    entries = c.pagemap("a", pages)
    assert len(entries) == len(pages) and all(e["present"] for e in entries)
    big = [addr] * 32768
    assert len(c.request("pagemap", proc="a", addrs=big)["entries"]) == 32768
    with pytest.raises(AgentError) as info:
        c.request("pagemap", proc="a", addrs=big + [addr])
    assert info.value.errno == errno.E2BIG
    assert c.ping()


# -- signals and deaths are data ------------------------------------------------


def test_a_signal_outside_a_touch_is_recorded_and_survived(agent):
    """A signal the worker survives comes back with its next answer (here
    SIGUSR1 from kill, whose default would end it), and the worker stays usable."""
    c = agent.client
    addr = c.mmap("a", "dax0.0", PAGE)
    pid = c.procs()["a"]
    assert c.kill("a", signal.SIGUSR1) == pid
    sigs = c.signals("a")
    assert [(s["proc"], s["signal"], s["code"], s["sender"]) for s in sigs] == [
        ("a", signal.SIGUSR1, 0, agent.proc.pid)]  # si_code SI_USER, sent by the agent
    assert c.signals("a") == []  # drained
    assert c.touch("a", [addr], write=True) == 1
    assert c.take_signals() == sigs


def test_a_fault_is_reported_with_its_si_code_and_address(agent):
    c = agent.client
    addr = c.mmap("a", "dax0.0", PAGE)
    c.munmap("a", addr, PAGE)
    with pytest.raises(AgentError):
        c.touch("a", [addr], write=True)
    (sig,) = c.take_signals()
    assert (sig["cmd"], sig["signal"], sig["code"], sig["addr"]) == (
        "touch", signal.SIGSEGV, 1, addr)  # SEGV_MAPERR
    # the handler stays armed: the next fault is recorded the same way
    with pytest.raises(AgentError):
        c.touch("a", [addr], write=False)
    assert [s["signal"] for s in c.take_signals()] == [signal.SIGSEGV]


def test_a_signal_between_requests_waits_for_the_next_answer(agent):
    c = agent.client
    c.mmap("a", "dax0.0", PAGE)
    pid = c.procs()["a"]
    os.kill(pid, signal.SIGTERM)
    time.sleep(0.1)
    assert c.procs()["a"] == pid  # recorded and survived
    c.touch("a", [], write=False)
    assert [(s["cmd"], s["signal"]) for s in c.take_signals()] == [("touch", signal.SIGTERM)]


def test_how_a_worker_ended_is_reported(agent):
    """The agent reaps every worker (a forked one too: CLONE_PARENT makes it
    the agent's child) and says how it ended: exit status or signal."""
    c = agent.client
    c.mmap("a", "dax0.0", PAGE)
    c.fork("a", "b")
    pid_b = c.procs()["b"]
    stat = Path(f"/proc/{pid_b}/stat").read_text()
    assert int(stat.rsplit(")", 1)[1].split()[1]) == agent.proc.pid  # ppid
    assert c.kill("b", signal.SIGKILL) == pid_b  # answered once b is gone
    live, exited = c.proc_table()
    assert live == {"a": c.procs()["a"]}
    assert exited == [{"name": "b", "pid": pid_b, "status": None, "signal": signal.SIGKILL,
                       "core": False}]
    with pytest.raises(AgentError) as info:
        c.touch("b", [], write=False)
    assert info.value.errno == errno.ESRCH
    c.exit("a", status=3)
    _, exited = c.proc_table()
    assert {e["name"]: (e["status"], e["signal"]) for e in exited} == {
        "a": (3, None), "b": (None, signal.SIGKILL)}
    with pytest.raises(AgentError) as info:
        c.kill("a")
    assert info.value.errno == errno.ESRCH


def test_a_worker_killed_from_outside_is_reported_with_the_signal(agent):
    c = agent.client
    c.mmap("a", "dax0.0", PAGE)
    pid = c.procs()["a"]
    os.kill(pid, signal.SIGKILL)
    _wait_gone(pid, zombie_ok=False)  # reaped by the agent
    live, exited = c.proc_table()
    assert live == {} and exited[0]["signal"] == signal.SIGKILL
