"""The GDB remote protocol client (lab.events.rsp): framing, parsing, and a
replay of a recorded exchange with QEMU 7.2's gdbstub
(tests/golden/gdb/exchange-after.json, made by tests/golden/capture_gdb.py)."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest

from lab.events.rsp import (
    GdbRemote,
    PacketReader,
    RspError,
    RspTimeout,
    checksum,
    frame,
    parse_stop,
    parse_x86_64_registers,
)

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "gdb" / "exchange-after.json"


def test_frame_and_checksum():
    assert frame(b"g") == b"$g#67"
    assert frame(b"Z2,ffffea0004048034,4") == b"$Z2,ffffea0004048034,4#6d"  # as QEMU accepted it
    assert checksum(b"") == 0 and frame(b"") == b"$#00"
    # '#', '$', '}' and '*' are escaped with '}' and xor 0x20
    assert frame(b"a#b") == b"$a}\x03b#" + b"%02x" % checksum(b"a}\x03b")


def test_reader_splits_and_reassembles():
    r = PacketReader()
    assert r.feed(b"+$T05thread:01;wat") == [("ack", b"+")]
    assert r.feed(b"ch:ffffea0004048034;#e8") == [("packet", b"T05thread:01;watch:ffffea0004048034;")]
    assert r.feed(b"$OK#9a-$#00") == [("packet", b"OK"), ("nak", b"-"), ("packet", b"")]


def test_reader_unescapes_and_expands_run_length():
    r = PacketReader()
    body = b"a}\x03b0* "  # "a#b" then '0' repeated 1 + (ord(' ') - 29) = 4 times
    assert r.feed(b"$" + body + b"#%02x" % checksum(body)) == [("packet", b"a#b0000")]


def test_reader_rejects_a_bad_checksum():
    with pytest.raises(RspError, match="bad checksum"):
        PacketReader().feed(b"$OK#00")


@pytest.mark.parametrize("payload, expect", [
    (b"T05thread:01;watch:ffffea0004048034;", (5, 1, 0xffffea0004048034, "watch")),
    (b"T05thread:p01.02;awatch:10;", (5, 2, 0x10, "awatch")),
    (b"T02thread:01;", (2, 1, None, None)),
    (b"S05", (5, None, None, None)),
])
def test_parse_stop(payload, expect):
    stop = parse_stop(payload)
    assert (stop.signal, stop.thread, stop.watch, stop.watch_kind) == expect
    assert stop.cpu == (None if expect[1] is None else expect[1] - 1)


def test_parse_stop_other_packets_and_exit():
    assert parse_stop(b"OK") is None and parse_stop(b"") is None and parse_stop(b"E01") is None
    assert parse_stop(b"W00").exited


def test_registers_need_the_whole_general_set():
    with pytest.raises(RspError, match="too short"):
        parse_x86_64_registers(b"00" * 100)


class ReplayStub:
    """Plays QEMU's side of a recorded exchange on a socketpair: waits for
    the bytes the client sent then, and answers with what QEMU sent."""

    def __init__(self, exchange):
        self.client, self._server = socket.socketpair()
        self.exchange = exchange
        self.mismatch: str | None = None
        self._thread = threading.Thread(target=self._play, daemon=True)
        self._thread.start()

    def _play(self):
        got = b""
        for direction, text in self.exchange:
            data = text.encode("latin-1")
            if direction == "send":
                while len(got) < len(data):
                    chunk = self._server.recv(65536)
                    if not chunk:
                        return
                    got += chunk
                if got[:len(data)] != data:
                    self.mismatch = f"client sent {got[:len(data)]!r}, recorded {data!r}"
                    return
                got = got[len(data):]
            else:
                self._server.sendall(data)

    def close(self):
        self._server.close()
        self._thread.join(2)


def test_replay_of_a_recorded_watch_session():
    golden = json.loads(GOLDEN.read_text())
    res = golden["results"]
    stub = ReplayStub(golden["exchange"])
    rsp = GdbRemote(stub.client, timeout=5)
    try:
        start = rsp.start()
        assert vars(start) == res["start"]
        assert rsp.ack_mode  # QEMU 7.2 refuses QStartNoAckMode: acks stay on
        for _, address, size in res["counters"]:
            rsp.insert_watchpoint(address, size)
        rsp.cont()
        for hit in res["hits"]:
            stop = rsp.wait_stop()
            assert vars(stop) == hit["stop"] and stop.watch_kind == "watch"
            regs = rsp.read_registers()
            assert (regs["rip"], regs["rsp"]) == (hit["rip"], hit["rsp"])
            assert regs["rip"] >> 47 == 0x1ffff  # a kernel text address
            assert int.from_bytes(rsp.read_memory(stop.watch, 4), "little", signed=True) == hit["value"]
            rsp.cont()
        rsp.interrupt()
        assert vars(rsp.wait_stop()) == res["interrupt"] and res["interrupt"]["signal"] == 2
        rsp.detach()
        assert stub.mismatch is None, stub.mismatch
    finally:
        rsp.close()
        stub.close()
    # the recorded fault: refcount 1 -> 2, then mapcount -1 -> 0 (the `after` kernel)
    names = {address: name for name, address, _ in res["counters"]}
    assert [(names[h["stop"]["watch"]], h["value"]) for h in res["hits"]] == [
        ("refcount", 2), ("mapcount", 0)]


def test_a_stub_that_never_answers_times_out():
    client, server = socket.socketpair()
    try:
        rsp = GdbRemote(client, timeout=0.3)
        t = time.monotonic()
        with pytest.raises(RspTimeout, match="did not answer"):
            rsp.start()
        assert time.monotonic() - t < 2
    finally:
        client.close()
        server.close()


def test_a_stub_that_hangs_up():
    client, server = socket.socketpair()
    server.close()
    rsp = GdbRemote(client, timeout=1)
    with pytest.raises(RspError):
        rsp.request("?")
    client.close()


def test_connect_to_nothing_says_where(tmp_path):
    with pytest.raises(RspError, match="cannot connect to the gdbstub at"):
        GdbRemote.connect(tmp_path / "gdb.sock", timeout=0.5)
