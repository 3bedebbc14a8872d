"""The tunnel's RFC 6455 pump as event sequences: bytes in, bytes and closes out.

No sockets: :class:`Recorder` stands in for both transports and keeps what was written,
so each test states exactly what the peer sends and what the other side receives,
including at every possible split of the input across reads.
"""

from __future__ import annotations

import os
import struct

import pytest

from domum_gateway.proxy.tunnel_wire import (
    HEAD_ROOM,
    Scratch,
    TcpEnd,
    WsEnd,
    accept_key,
    close_payload,
    parse_close,
)

pytestmark = pytest.mark.asyncio


class Recorder:
    """A transport that accepts everything and remembers it."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.eof = False
        self.closed = False
        self.aborted = False
        self.reading = True

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.data += data

    def writelines(self, parts: list[bytes | bytearray | memoryview]) -> None:
        for part in parts:
            self.data += part

    def write_eof(self) -> None:
        self.eof = True

    def can_write_eof(self) -> bool:
        return True

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


def frame(opcode: int, payload: bytes, *, fin: bool = True, key: bytes | None = b"\x01\x02\x03\x04") -> bytes:
    """A client frame as RFC 6455 writes it (masked unless ``key`` is None)."""
    b0 = (0x80 if fin else 0) | opcode
    n = len(payload)
    m = 0x80 if key is not None else 0
    if n < 126:
        head = bytes((b0, m | n))
    elif n < 65536:
        head = struct.pack("!BBH", b0, m | 126, n)
    else:
        head = struct.pack("!BBQ", b0, m | 127, n)
    if key is None:
        return head + payload
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def server(max_frame: int = 1024, scratch: int = 4096) -> tuple[WsEnd, Recorder, Recorder]:
    tcp = TcpEnd()
    tcp_t = Recorder()
    tcp.transport = tcp_t  # type: ignore[assignment]
    ws = WsEnd(Scratch(scratch), tcp, client=False, max_frame=max_frame)
    ws_t = Recorder()
    ws.start(ws_t)  # type: ignore[arg-type]
    return ws, ws_t, tcp_t


def feed_split(ws: WsEnd, data: bytes, at: int) -> None:
    ws.feed(memoryview(data[:at]))
    ws.feed(memoryview(data[at:]))


def server_frames(raw: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of unmasked frames a server wrote."""
    out, pos = [], 0
    while pos < len(raw):
        op, n = raw[pos] & 0x0F, raw[pos + 1] & 0x7F
        pos += 2
        if n == 126:
            n, pos = struct.unpack("!H", raw[pos : pos + 2])[0], pos + 2
        elif n == 127:
            n, pos = struct.unpack("!Q", raw[pos : pos + 8])[0], pos + 8
        out.append((op, bytes(raw[pos : pos + n])))
        pos += n
    return out


async def test_every_split_of_a_frame_sequence_gives_the_same_bytes() -> None:
    payloads = [b"", b"a", os.urandom(125), os.urandom(126), os.urandom(700)]
    stream = b"".join(frame(0x2, p) for p in payloads if p)
    stream += frame(0x9, b"are you there")  # a ping in between
    stream += frame(0x2, b"frag-", fin=False) + frame(0x0, b"mented")
    expected = b"".join(payloads) + b"frag-mented"
    for at in range(len(stream) + 1):
        ws, ws_t, tcp_t = server()
        feed_split(ws, stream, at)
        assert bytes(tcp_t.data) == expected, at
        assert server_frames(bytes(ws_t.data)) == [(0xA, b"are you there")], at
        assert not ws.close_sent


async def test_empty_binary_frame_is_a_half_close_then_both_ends_close_1000() -> None:
    ws, ws_t, tcp_t = server()
    ws.feed(memoryview(frame(0x2, b"last words") + frame(0x2, b"")))
    assert tcp_t.data == b"last words" and tcp_t.eof
    assert not ws.close_sent
    ws.tcp_eof()  # the target finishes too
    frames = server_frames(bytes(ws_t.data))
    assert frames[0] == (0x2, b"")  # our end-of-stream marker
    assert frames[1][0] == 0x8 and parse_close(frames[1][1]) == (1000, "both directions finished")


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        (frame(0x1, b"text"), 1003),
        (frame(0x2, b"x" * 1025), 1009),
        (frame(0x2, b"unmasked", key=None), 1002),
        (bytes((0xC2, 0x80)) + b"\x00" * 4, 1002),  # RSV1 set
        (frame(0x0, b"orphan continuation"), 1002),
        (frame(0x9, b"p" * 126), 1002),  # control frame too long
        (frame(0x3, b"reserved opcode"), 1002),
    ],
)
async def test_violations_close_with_their_code_and_still_read_the_peers_close(bad: bytes, code: int) -> None:
    ws, ws_t, tcp_t = server()
    ws.feed(memoryview(bad + frame(0x2, b"ignored after close") + frame(0x8, close_payload(1000, ""))))
    frames = server_frames(bytes(ws_t.data))
    assert frames[0][0] == 0x8 and parse_close(frames[0][1])[0] == code  # type: ignore[index]
    assert ws.close_received and ws_t.closed  # the peer's close was read; the server hangs up
    assert b"ignored" not in tcp_t.data


async def test_peer_close_is_echoed_and_the_target_connection_closed() -> None:
    ws, ws_t, tcp_t = server()
    ws.feed(memoryview(frame(0x2, b"bye") + frame(0x8, close_payload(1001, "going"))))
    assert tcp_t.data == b"bye" and tcp_t.closed
    assert server_frames(bytes(ws_t.data)) == [(0x8, close_payload(1001, "going"))]
    assert (ws.close_code, ws.close_reason) == (1001, "going")


async def test_server_frames_data_in_place_and_the_client_masks_it() -> None:
    ws, ws_t, _tcp_t = server(scratch=256 * 1024)
    data = os.urandom(70000)
    ws.scratch.tail[: len(data)] = data
    ws.send_data(len(data))
    assert server_frames(bytes(ws_t.data)) == [(0x2, data)]

    tcp = TcpEnd()
    tcp.transport = Recorder()  # type: ignore[assignment]
    client = WsEnd(Scratch(), tcp, client=True)
    client_t = Recorder()
    client.start(client_t)  # type: ignore[arg-type]
    client.scratch.tail[: len(data)] = data
    client.send_data(len(data))
    raw = bytes(client_t.data)
    assert raw[1] & 0x80 and raw[1] & 0x7F == 127  # masked, 64-bit length
    key = raw[10:14]
    assert bytes(b ^ key[i % 4] for i, b in enumerate(raw[14:])) == data
    assert HEAD_ROOM == 14


async def test_close_reason_is_cut_on_a_character_boundary_and_accept_key_is_rfc_6455() -> None:
    payload = close_payload(1008, "é" * 100)
    assert len(payload) <= 125 and parse_close(payload) == (1008, "é" * 61)
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
