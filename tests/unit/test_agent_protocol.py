"""Pure encode/decode helpers of the guest agent protocol, and the client
against canned answers (no VM, no agent)."""

from __future__ import annotations

import errno
import json
import socket

import pytest

from lab.agent import (
    AgentClient,
    AgentDisconnected,
    AgentError,
    AgentTimeout,
    LineBuffer,
    check_response,
    decode_response,
    encode_request,
)


def test_encode_is_one_ascii_line():
    line = encode_request(7, "echo", {"text": 'a "quoted"\nline é 😀'})
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    line.decode("ascii")  # ensure_ascii: no raw UTF-8 on the wire
    assert json.loads(line) == {"id": 7, "cmd": "echo", "text": 'a "quoted"\nline é 😀'}


def test_encode_keeps_id_and_cmd_first_and_big_numbers_exact():
    addr = (1 << 64) - 4096
    line = encode_request(1, "touch", {"proc": "a", "addrs": (addr, 0), "write": True})
    assert line.startswith(b'{"id":1,"cmd":"touch",')
    assert json.loads(line)["addrs"] == [addr, 0]


@pytest.mark.parametrize(
    "args, exc",
    [
        ({"x": 1.5}, TypeError),
        ({"x": {"nested": 1}}, TypeError),
        ({"x": [1, "two"]}, TypeError),
        ({"x": [True]}, TypeError),
        ({"x": ["one", 2]}, TypeError),
        ({"x": ["nul\0inside"]}, ValueError),
        ({"x": 1 << 64}, ValueError),
        ({"x": [-1]}, ValueError),
        ({"id": 3}, ValueError),
        ({"cmd": "other"}, ValueError),
    ],
)
def test_encode_rejects_what_the_agent_cannot_parse(args, exc):
    with pytest.raises(exc):
        encode_request(1, "echo", args)


def test_encode_string_arrays_for_program_arguments():
    line = encode_request(2, "run", {"name": "p", "args": ("-v", "two words", "é")})
    assert json.loads(line)["args"] == ["-v", "two words", "é"]


def test_encode_rejects_bad_id_and_cmd():
    with pytest.raises(TypeError):
        encode_request(True, "ping", {})
    with pytest.raises(TypeError):
        encode_request(1, "", {})


def test_encode_accepts_negative_and_null():
    assert json.loads(encode_request(2, "x", {"n": -(1 << 63), "z": None})) == {
        "id": 2, "cmd": "x", "n": -(1 << 63), "z": None}


def test_decode_round_trip():
    resp = decode_response(b'{"id":3,"ok":true,"addr":18446744073709547520,"length":4096}')
    assert resp == {"id": 3, "ok": True, "addr": 18446744073709547520, "length": 4096}
    assert check_response("mmap", resp) == {"addr": 18446744073709547520, "length": 4096}


def test_decode_utf8_and_escapes():
    resp = decode_response('{"id":1,"ok":true,"text":"é\\"\\\\\\u0001😀"}'.encode())
    assert resp["text"] == 'é"\\\x01😀'


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"not json",
        b"[1,2]",
        b'{"ok":true}',
        b'{"id":"1","ok":true}',
        b'{"id":true,"ok":true}',
        b'{"id":1}',
        b'{"id":1,"ok":1}',
        b'{"id":1,"ok":false}',
        b'{"id":1,"ok":false,"errno":"x","error":"m"}',
        b'\xff\xfe',
    ],
)
def test_decode_rejects_garbage(line):
    with pytest.raises(ValueError):
        decode_response(line)


def test_error_mapping():
    resp = decode_response(b'{"id":4,"ok":false,"errno":14,"error":"touch: SIGBUS at 0x1000"}')
    with pytest.raises(AgentError) as info:
        check_response("touch", resp)
    err = info.value
    assert (err.cmd, err.errno, err.message) == ("touch", errno.EFAULT, "touch: SIGBUS at 0x1000")
    assert str(err) == "touch: touch: SIGBUS at 0x1000 (errno 14 EFAULT)"


def test_error_with_unknown_errno():
    assert str(AgentError("x", 4242, "odd")) == "x: odd (errno 4242 ?)"


def test_exception_types():
    t = AgentTimeout("ping", 1.5)
    assert isinstance(t, TimeoutError) and t.cmd == "ping" and t.timeout == 1.5
    assert "1.5" in str(t)
    assert issubclass(AgentDisconnected, ConnectionError)


def test_linebuffer_splits_partial_lines():
    buf = LineBuffer()
    assert buf.feed(b'{"id":1') == []
    assert buf.pending == b'{"id":1'
    assert buf.feed(b',"ok":true}\n{"id":2,') == [b'{"id":1,"ok":true}']
    assert buf.feed(b'"ok":true}\n\n{"id":3}\n') == [b'{"id":2,"ok":true}', b"", b'{"id":3}']
    assert buf.pending == b""


def test_linebuffer_byte_at_a_time():
    buf = LineBuffer()
    data = b"ab\ncd\n"
    lines = [line for i in range(len(data)) for line in buf.feed(data[i:i + 1])]
    assert lines == [b"ab", b"cd"]


def test_signals_in_answers_are_kept_for_take_signals():
    """A worker's answer carries the signals it received (an error answer
    too); the client moves them out of the results into take_signals(),
    tagged with the process and command, and a stale answer's are kept."""

    host, guest = socket.socketpair()
    client = AgentClient(host)
    sigbus = {"signal": 7, "code": 4, "addr": 4096, "addr_lsb": 12, "sender": 0}
    guest.sendall(b'{"id":99,"ok":true,"signals":[{"signal":10,"code":0,"addr":0,'
                  b'"addr_lsb":0,"sender":1}]}\n'
                  b'{"id":1,"ok":true,"signals":[' + json.dumps(sigbus).encode() + b"]}\n"
                  b'{"id":2,"ok":false,"errno":14,"error":"touch: SIGBUS","signals":['
                  + json.dumps(sigbus).encode() + b'],"signals_lost":2}\n')
    assert client.request("madvise", proc="a", addr=4096, length=4096, advice=100) == {}
    with pytest.raises(AgentError) as info:
        client.request("touch", proc="a", addrs=[4096], write=True)
    assert info.value.errno == 14
    taken = client.take_signals()
    assert [(s["proc"], s["cmd"], s["signal"]) for s in taken] == [
        (None, "?", 10), ("a", "madvise", 7), ("a", "touch", 7)]
    assert {k: taken[1][k] for k in sigbus} == sigbus
    assert client.take_signals() == []
    host.close()
    guest.close()
