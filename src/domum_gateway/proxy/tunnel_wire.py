"""RFC 6455 framing and the byte pump shared by both ends of a TCP tunnel.

Why not aiohttp's ``WebSocketResponse``: a tunnel moves bulk bytes, and the generic path
(a message object and a queue entry per frame, a task per direction, a copy per layer)
reached about half of a plain TCP relay upstream and a quarter downstream. Here each end
is two buffered protocols wired back to back:

* TLS decrypts straight into one scratch buffer shared by every tunnel of an event loop
  (callbacks run one at a time, so one read buffer serves them all and an idle tunnel
  holds no buffer at all);
* frames are parsed in place; a masked payload costs the one copy that unmasking needs
  anyway (aiohttp's C routine does the XOR), an unmasked one is written onward as a slice
  of the scratch buffer;
* the other direction reads into the same scratch buffer behind 14 bytes of head room,
  writes the frame header into that room and sends header and payload as one slice;
* when a transport keeps a slice it could not send at once, the scratch buffer is
  handed over to it and a fresh one is allocated, so bytes are never overwritten.

Flow control is the transports' own: a full write buffer on one side pauses reading on
the other, so a slow side slows the other and memory per tunnel is bounded by the two
write-buffer limits plus one read.

Conventions beyond RFC 6455 (both ends are ours; a browser page can follow them too):

* data travels in binary frames, fragmented or not; message boundaries carry no meaning;
* an empty binary frame with FIN set ends the stream in that direction (TCP half-close);
  once both directions have ended, either side closes with 1000;
* text frames are refused with 1003.

This module is imported by the gateway (``proxy.tunnel``) and by the ``connect`` client,
so it depends on the standard library and aiohttp's mask helper only.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import struct
from collections.abc import Callable
from typing import cast

__all__ = [
    "CLOSE_GOING_AWAY",
    "CLOSE_INTERNAL",
    "CLOSE_NORMAL",
    "CLOSE_POLICY",
    "CLOSE_PROTOCOL",
    "CLOSE_TOO_BIG",
    "CLOSE_UNSUPPORTED",
    "HEAD_ROOM",
    "MAX_FRAME",
    "READ_SIZE",
    "Scratch",
    "TcpEnd",
    "WsEnd",
    "accept_key",
    "close_payload",
    "new_key",
    "parse_close",
    "server_close_frame",
]

READ_SIZE = 256 * 1024
"""Bytes read at once from either side; one read becomes at most one frame."""

HEAD_ROOM = 14
"""The longest frame header: 2 bytes, 8 for the length, 4 for the mask key."""

MAX_FRAME = 1024 * 1024
"""Largest payload accepted in one frame; bigger frames close the tunnel with 1009."""

WRITE_HIGH_WATER = 512 * 1024
"""Bytes a transport may buffer before the opposite side stops reading."""

CLOSE_WAIT = 2.0
"""Seconds to wait for the peer's close frame (or, for a client, the server's FIN)."""

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL = 1002
CLOSE_UNSUPPORTED = 1003
CLOSE_NO_STATUS = 1005
CLOSE_ABNORMAL = 1006
CLOSE_INVALID_DATA = 1007
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_MAX_REASON = 123  # a close payload holds at most 125 bytes: 2 for the code


def _mask_python(mask: bytes, data: bytearray) -> None:
    # Fallback when aiohttp's C helper is missing: XOR as one big integer.
    if not data:
        return
    n = len(data)
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "little")
    data[:] = (int.from_bytes(data, "little") ^ key).to_bytes(n, "little")


_apply_mask: Callable[[bytes, bytearray], None]
try:  # aiohttp ships a C routine; its module is private, so fall back if it moves.
    from aiohttp._websocket.helpers import websocket_mask as _apply_mask
except ImportError:  # pragma: no cover - depends on the aiohttp build
    _apply_mask = _mask_python


def new_key() -> str:
    """A fresh ``Sec-WebSocket-Key``."""
    return base64.b64encode(os.urandom(16)).decode("ascii")


def accept_key(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` value that answers ``key``."""
    digest = hashlib.sha1(key.encode("ascii") + _GUID).digest()  # noqa: S324 - fixed by RFC 6455
    return base64.b64encode(digest).decode("ascii")


def close_payload(code: int, reason: str) -> bytes:
    """A close frame's payload: the code and the reason cut to fit (on a UTF-8 boundary)."""
    raw = reason.encode("utf-8")
    if len(raw) > _MAX_REASON:
        raw = raw[:_MAX_REASON].decode("utf-8", "ignore").encode("utf-8")
    return struct.pack("!H", code) + raw


def server_close_frame(code: int, reason: str) -> bytes:
    """A complete, unmasked close frame (what a server sends)."""
    payload = close_payload(code, reason)
    return _header(OP_CLOSE, len(payload), False) + payload


def parse_close(payload: bytes) -> tuple[int, str] | None:
    """(code, reason) from a received close payload, or None when it is malformed."""
    if not payload:
        return CLOSE_NO_STATUS, ""
    if len(payload) < 2:
        return None
    code = struct.unpack("!H", payload[:2])[0]
    if not (code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011) or 3000 <= code <= 4999):
        return None
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        return None
    return code, reason


def _header(opcode: int, length: int, masked: bool) -> bytes:
    b0 = 0x80 | opcode
    m = 0x80 if masked else 0
    if length < 126:
        return bytes((b0, m | length))
    if length < 65536:
        return struct.pack("!BBH", b0, m | 126, length)
    return struct.pack("!BBQ", b0, m | 127, length)


class Scratch:
    """The read buffer every tunnel of one event loop shares.

    ``view`` receives websocket bytes; ``tail`` (the same buffer after ``HEAD_ROOM``
    bytes) receives TCP bytes, so a frame header fits in front of them. ``renew`` hands
    the current buffer to whichever transport kept a slice of it.
    """

    __slots__ = ("_keys", "_next_key", "buf", "size", "tail", "view")

    def __init__(self, size: int = READ_SIZE) -> None:
        self.size = size
        self.buf = bytearray(size + HEAD_ROOM)
        self.view = memoryview(self.buf)
        self.tail = self.view[HEAD_ROOM:]
        self._keys = b""
        self._next_key = 0

    def mask_key(self) -> bytes:
        """A fresh masking key from the OS CSPRNG (drawn 1,024 keys at a time)."""
        at = self._next_key
        if at >= len(self._keys):
            self._keys = os.urandom(4096)
            at = 0
        self._next_key = at + 4
        return self._keys[at : at + 4]

    def renew(self) -> None:
        self.buf = bytearray(self.size + HEAD_ROOM)
        self.view = memoryview(self.buf)
        self.tail = self.view[HEAD_ROOM:]


class TcpEnd(asyncio.BufferedProtocol):
    """The plain TCP side of a tunnel; everything it sees goes to its :class:`WsEnd`.

    Until the websocket side exists (``ws`` is None) nothing is forwarded: reading is
    paused, and the one read that may slip through first (uvloop starts reading right
    after ``connection_made`` even when it paused) is kept in ``early``, with any EOF or
    loss, for :meth:`WsEnd.start` to replay.
    """

    __slots__ = ("early", "early_eof", "lost", "spare", "transport", "ws")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.ws: WsEnd | None = None
        self.early: bytearray | None = None
        self.spare: bytearray | None = None
        self.early_eof = False
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = t = cast(asyncio.Transport, transport)
        t.pause_reading()
        t.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    def get_buffer(self, sizehint: int) -> memoryview:
        ws = self.ws
        if ws is not None:
            return ws.scratch.tail
        # Not wired yet: uvloop's first read slipped past the pause. (Pausing here,
        # inside uvloop's allocation callback, would crash it: buffer_updated does.)
        self.spare = bytearray(64 * 1024)
        return memoryview(self.spare)

    def buffer_updated(self, nbytes: int) -> None:
        ws = self.ws
        if ws is not None:
            ws.send_data(nbytes)
            return
        spare, self.spare = self.spare, None
        if spare is not None:
            if self.early is None:
                self.early = bytearray()
            self.early += memoryview(spare)[:nbytes]
        if self.transport is not None:
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        if self.ws is not None:
            self.ws.tcp_eof()
        else:
            self.early_eof = True
        return True  # keep the write side open: the other direction may go on

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.ws is not None:
            self.ws.tcp_lost(exc)

    def pause_writing(self) -> None:
        if self.ws is not None:
            self.ws.tcp_write_paused(True)

    def resume_writing(self) -> None:
        if self.ws is not None:
            self.ws.tcp_write_paused(False)


class WsEnd(asyncio.BufferedProtocol):
    """The websocket side of a tunnel, as server (``client=False``) or client.

    The server side expects masked frames and sends unmasked ones; the client the
    reverse. Every frame rule of RFC 6455 that matters to a byte stream is enforced here
    (a violation closes with 1002, 1003 or 1009 and the rest of the frame is skipped, so
    the peer's own close frame is still read); subclasses only react to the end
    (:meth:`closed`) and name the close sent when the TCP side goes first.
    """

    __slots__ = (
        "_close_timer",
        "_ctrl",
        "_eof_in",
        "_eof_out",
        "_fragmented",
        "_key",
        "_loop",
        "_mpos",
        "_opcode",
        "_out",
        "_partial",
        "_remaining",
        "_tcp_reading",
        "_ws_full",
        "_ws_reading",
        "client",
        "close_code",
        "close_reason",
        "close_received",
        "close_sent",
        "ended",
        "max_frame",
        "ping_outstanding",
        "rx",
        "rx_frames",
        "scratch",
        "tcp",
        "transport",
        "tx",
    )

    def __init__(self, scratch: Scratch, tcp: TcpEnd, *, client: bool, max_frame: int = MAX_FRAME) -> None:
        self.scratch = scratch
        self.tcp = tcp
        self.client = client
        self.max_frame = max_frame
        self.transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        # parser
        self._partial = b""
        self._out: list[bytearray | memoryview] = []
        self._remaining = 0
        self._opcode = 0
        self._key: bytes | None = None
        self._mpos = 0
        self._ctrl: bytearray | None = None
        self._fragmented = False
        # flow and lifecycle
        self._ws_reading = True
        self._ws_full = False
        self._tcp_reading = False
        self._eof_in = False
        self._eof_out = False
        self._close_timer: asyncio.TimerHandle | None = None
        self.close_sent = False
        self.close_received = False
        self.close_code = CLOSE_ABNORMAL
        self.close_reason = ""
        self.ended = False
        self.ping_outstanding = False
        # counters (payload bytes): rx = websocket -> TCP, tx = TCP -> websocket
        self.rx = 0
        self.tx = 0
        self.rx_frames = 0

    # wiring ---------------------------------------------------------------------
    def start(self, transport: asyncio.Transport, pending: bytes = b"") -> None:
        """Begin pumping on an open websocket ``transport``; ``pending`` are bytes
        that arrived with the handshake."""
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        tcp = self.tcp
        tcp.ws = self
        if pending:
            self.feed(memoryview(pending))
        early = tcp.early
        if early:
            tcp.early = None
            for i in range(0, len(early), self.scratch.size):
                part = early[i : i + self.scratch.size]
                self.scratch.tail[: len(part)] = part
                self.send_data(len(part))
        if tcp.early_eof:
            self.tcp_eof()
        if tcp.lost:
            self.tcp_lost(None)
        elif not self.close_sent:
            self._set_tcp_reading(True)

    # asyncio callbacks: websocket side -----------------------------------------------
    def get_buffer(self, sizehint: int) -> memoryview:
        return self.scratch.view

    def buffer_updated(self, nbytes: int) -> None:
        self.feed(self.scratch.view[:nbytes])

    def eof_received(self) -> bool:
        return False

    def pause_writing(self) -> None:
        self._set_tcp_reading(False, ws_full=True)

    def resume_writing(self) -> None:
        self._set_tcp_reading(True, ws_full=False)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        tcp = self.tcp.transport
        if tcp is not None and not tcp.is_closing():
            if self.close_code in (CLOSE_NORMAL, CLOSE_ABNORMAL, CLOSE_GOING_AWAY) or self.close_received:
                tcp.close()  # deliver what was already written, then FIN
            else:
                tcp.abort()  # refused by policy or broken: not one more byte onward
        if not self.ended:
            self.ended = True
            self.closed()

    # hooks --------------------------------------------------------------------------
    def closed(self) -> None:
        """Called once, when the websocket connection is gone."""

    def tcp_lost_reason(self, exc: Exception | None) -> tuple[int, str]:
        """The close code and reason to send when the TCP side goes away first."""
        return CLOSE_NORMAL, "the connection was closed"

    # frames in ------------------------------------------------------------------------
    def feed(self, data: memoryview) -> None:
        """Parse websocket bytes, forwarding payload as it arrives.

        Payload found in one read is written onward with one ``writelines`` (a read
        rarely ends on a frame boundary, and one system call beats two).
        """
        try:
            self._feed(data)
        finally:
            if self._out:
                self._flush_out()

    def _feed(self, data: memoryview) -> None:
        pos = 0
        end = len(data)
        while pos < end:
            if self.close_received:
                return
            remaining = self._remaining
            if remaining:
                take = remaining if remaining <= end - pos else end - pos
                self._payload(data[pos : pos + take])
                pos += take
                self._remaining = remaining - take
                if not self._remaining:
                    self._frame_done()
                continue
            # A header: at most 14 bytes, possibly split across reads.
            had = len(self._partial)
            head: bytes | memoryview
            head = self._partial + bytes(data[pos : pos + HEAD_ROOM]) if had else data[pos : pos + HEAD_ROOM]
            parsed = self._parse_header(head)
            if parsed == 0:
                self._partial = bytes(head)
                return
            pos += parsed - had
            self._partial = b""
            if not self._remaining:
                self._frame_done()

    def _parse_header(self, head: bytes | memoryview) -> int:
        """Length of a complete header in ``head`` (state updated), 0 if incomplete."""
        if len(head) < 2:
            return 0
        b0 = head[0]
        b1 = head[1]
        length = b1 & 0x7F
        masked = b1 & 0x80
        size = 2 + (2 if length == 126 else 8 if length == 127 else 0) + (4 if masked else 0)
        if len(head) < size:
            return 0
        if length == 126:
            length = (head[2] << 8) | head[3]
        elif length == 127:
            length = int.from_bytes(head[2:10], "big")
        opcode = b0 & 0x0F
        fin = bool(b0 & 0x80)
        self.rx_frames += 1
        self._remaining = length
        self._key = bytes(head[size - 4 : size]) if masked else None
        self._mpos = 0
        self._opcode = opcode
        self._ctrl = None
        problem = self._check(b0, opcode, fin, bool(masked), length)
        if problem is not None:
            # Say why and skip the frame: the peer's close frame still has to be read
            # (hanging up on unread bytes would reset the connection and lose our close).
            self.close(*problem)
            self._opcode = OP_BINARY
            return size
        if opcode & 0x8:
            self._ctrl = bytearray()
        elif length == 0 and opcode == OP_BINARY and fin:
            self._peer_eof()
        return size

    def _check(self, b0: int, opcode: int, fin: bool, masked: bool, length: int) -> tuple[int, str] | None:
        """Why this frame breaks RFC 6455 or our rules (None when it does not)."""
        if b0 & 0x70:
            return CLOSE_PROTOCOL, "reserved bits set without an extension"
        if masked == self.client:
            return CLOSE_PROTOCOL, "frame masking is wrong for this side"
        if opcode & 0x8:
            if opcode not in (OP_CLOSE, OP_PING, OP_PONG):
                return CLOSE_PROTOCOL, "unknown control opcode"
            if length > 125 or not fin:
                return CLOSE_PROTOCOL, "control frames are short and not fragmented"
            return None
        if opcode == OP_BINARY:
            if self._fragmented:
                return CLOSE_PROTOCOL, "new message inside a fragmented one"
        elif opcode == OP_CONTINUATION:
            if not self._fragmented:
                return CLOSE_PROTOCOL, "continuation without a message"
        elif opcode == OP_TEXT:
            return CLOSE_UNSUPPORTED, "this tunnel carries binary frames only"
        else:
            return CLOSE_PROTOCOL, "unknown opcode"
        if length > self.max_frame:
            return CLOSE_TOO_BIG, f"frames are limited to {self.max_frame} bytes"
        self._fragmented = not fin
        return None

    def _payload(self, seg: memoryview) -> None:
        ctrl = self._ctrl
        if ctrl is not None:
            ctrl += seg
            return
        n = len(seg)
        self.rx += n
        tcp = self.tcp.transport
        if self.close_sent or self._eof_in or tcp is None or tcp.is_closing():
            return  # nowhere to go: dropped, like bytes after a FIN
        key = self._key
        if key is not None:
            chunk = bytearray(seg)
            o = self._mpos
            _apply_mask(key if o == 0 else key[o:] + key[:o], chunk)
            self._mpos = (o + n) & 3
            self._out.append(chunk)
        else:
            self._out.append(seg)

    def _flush_out(self) -> None:
        out = self._out
        self._out = []
        tcp = self.tcp.transport
        if tcp is None or tcp.is_closing():
            return
        if len(out) == 1:
            tcp.write(out[0])
        else:
            tcp.writelines(out)
        if self.client and tcp.get_write_buffer_size():
            self.scratch.renew()  # the transport kept a slice of the scratch buffer

    def _frame_done(self) -> None:
        ctrl = self._ctrl
        if ctrl is None:
            return
        self._ctrl = None
        if self._key is not None:
            _apply_mask(self._key, ctrl)
        payload = bytes(ctrl)
        op = self._opcode
        if op == OP_PING:
            # A peer that floods pings and never reads would otherwise queue a pong per
            # ping without bound: while our write side is full, skip them (RFC 6455
            # section 5.5.3 allows answering only the most recent ping).
            if not self.close_sent and not self._ws_full:
                self._write_frame(OP_PONG, payload)
        elif op == OP_PONG:
            self.ping_outstanding = False
        else:
            self._peer_close(payload)

    def _peer_eof(self) -> None:
        if self._eof_in:
            return
        if self._out:
            self._flush_out()  # the data before the end first
        self._eof_in = True
        tcp = self.tcp.transport
        if tcp is not None and not tcp.is_closing() and tcp.can_write_eof():
            tcp.write_eof()
        if self._eof_out:
            self.close(CLOSE_NORMAL, "both directions finished")

    def _peer_close(self, payload: bytes) -> None:
        if self._out:
            self._flush_out()
        self.close_received = True
        parsed = parse_close(payload)
        if parsed is None:
            code, reason = CLOSE_PROTOCOL, "malformed close frame"
        else:
            code, reason = parsed
        if not self.close_sent:
            self.close_code, self.close_reason = code, reason
            echo = CLOSE_PROTOCOL if parsed is None else (CLOSE_NORMAL if code == CLOSE_NO_STATUS else code)
            self._send_close(echo, reason if parsed is not None else "")
        self._set_tcp_reading(False)
        tcp = self.tcp.transport
        if tcp is not None and not tcp.is_closing():
            tcp.close()
        transport = self.transport
        if transport is not None and not self.client:
            transport.close()  # RFC 6455 7.1.1: the server closes TCP first
        self._arm_close_timer()

    # frames out -----------------------------------------------------------------------
    def send_data(self, nbytes: int) -> None:
        """Frame ``nbytes`` just read into ``scratch.tail`` and send them."""
        transport = self.transport
        if transport is None or self.close_sent or transport.is_closing():
            return
        self.tx += nbytes
        sc = self.scratch
        if self.client:
            key = sc.mask_key()
            head = _header(OP_BINARY, nbytes, True) + key
            size = len(head)
            frame = bytearray(sc.view[HEAD_ROOM - size : HEAD_ROOM + nbytes])
            shift = -size & 3  # align the key with the payload's first byte
            _apply_mask(key[shift:] + key[:shift] if shift else key, frame)
            frame[:size] = head
            transport.write(frame)
        else:
            head = _header(OP_BINARY, nbytes, False)
            start = HEAD_ROOM - len(head)
            sc.buf[start:HEAD_ROOM] = head
            transport.write(sc.view[start : HEAD_ROOM + nbytes])
            if transport.get_write_buffer_size():
                sc.renew()

    def _write_frame(self, opcode: int, payload: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self.client:
            key = self.scratch.mask_key()
            body = bytearray(payload)
            _apply_mask(key, body)
            transport.write(_header(opcode, len(payload), True) + key + body)
        else:
            transport.write(_header(opcode, len(payload), False) + payload)

    def ping(self) -> None:
        """Send a keepalive ping; ``ping_outstanding`` stays True until the pong."""
        if not self.close_sent:
            self.ping_outstanding = True
            self._write_frame(OP_PING, b"")

    def _send_close(self, code: int, reason: str) -> None:
        self.close_sent = True
        self._write_frame(OP_CLOSE, close_payload(code, reason))

    def close(self, code: int, reason: str) -> None:
        """Start the closing handshake (no more data either way), once."""
        if self.close_sent:
            return
        self.close_code, self.close_reason = code, reason
        self._send_close(code, reason)
        self._set_tcp_reading(False)
        if self.close_received:
            return
        self._arm_close_timer()

    def abort(self) -> None:
        """Drop both connections now (a dead peer)."""
        for t in (self.transport, self.tcp.transport):
            if t is not None:
                t.abort()

    def _arm_close_timer(self) -> None:
        if self._close_timer is None and self.transport is not None:
            self._close_timer = self._loop.call_later(CLOSE_WAIT, self._close_timeout)

    def _close_timeout(self) -> None:
        self._close_timer = None
        if self.transport is not None:
            self.transport.abort()

    # TCP side events ------------------------------------------------------------------
    def tcp_eof(self) -> None:
        if self._eof_out or self.close_sent:
            return
        self._eof_out = True
        self._write_frame(OP_BINARY, b"")
        if self._eof_in:
            self.close(CLOSE_NORMAL, "both directions finished")

    def tcp_lost(self, exc: Exception | None) -> None:
        if self.close_sent:
            return
        code, reason = self.tcp_lost_reason(exc)
        self.close(code, reason)

    def tcp_write_paused(self, paused: bool) -> None:
        self._set_ws_reading(not paused)

    # flow control ---------------------------------------------------------------------
    def _set_tcp_reading(self, on: bool, *, ws_full: bool | None = None) -> None:
        if ws_full is not None:
            self._ws_full = ws_full
        want = on and not self.close_sent and not self._ws_full and not self._eof_out
        tcp = self.tcp.transport
        if want == self._tcp_reading or tcp is None or tcp.is_closing():
            self._tcp_reading = want
            return
        self._tcp_reading = want
        if want:
            tcp.resume_reading()
        else:
            tcp.pause_reading()

    def _set_ws_reading(self, on: bool) -> None:
        transport = self.transport
        if on == self._ws_reading or transport is None or transport.is_closing():
            return
        self._ws_reading = on
        if on:
            transport.resume_reading()
        else:
            transport.pause_reading()
