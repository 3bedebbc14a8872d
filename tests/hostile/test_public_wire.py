"""Raw bytes at the public listener's own routes (login pages, portal, static): path tricks
and HTTP framing a normal client would never send. Nothing here touches ``/t/``.

Every case ends with the gateway answering 400-class (or closing), never 200 with
smuggled content, and with a normal request on a new connection still working.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from domum_gateway.proxy.login import GENERIC_REFUSAL

from ..conftest import Running
from ..integration.helpers import create_forwarded, seed
from .raw import exchange, open_raw, rss_kib, status_of

pytestmark = pytest.mark.asyncio

UNKNOWN = "Q" * 22


def _host(run: Running) -> bytes:
    return run.public_url.split("//", 1)[1].encode()


async def _get(run: Running, target: bytes, extra: bytes = b"") -> bytes:
    raw = (
        b"GET "
        + target
        + b" HTTP/1.1\r\nHost: "
        + _host(run)
        + b"\r\n"
        + extra
        + b"Connection: close\r\n\r\n"
    )
    return await exchange(run.public_url, run.ssl, raw)


async def _healthy(run: Running) -> None:
    got = await _get(run, b"/")
    assert status_of(got) == 200, got[:300]


def _body(response: bytes) -> bytes:
    return response.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in response else b""


@pytest.mark.parametrize(
    "suffix",
    [
        b"/..",
        b"/../../portal",
        b"/%2e%2e/%2e%2e/portal",
        b"%2f..%2f..%2fportal",
        b"/%2E%2E%2Fstatic%2Fpublic%2Fsite.css",
        b"//portal",
        b"/..\\..\\portal",
        b"%5c..%5c..%5cportal",
        b"/%252e%252e/%252e%252e/portal",
        b"/%c0%ae%c0%ae/%c0%ae%c0%ae/portal",
        b"/%c0%af..%c0%afportal",
        b"/./token",
        b"/%00",
        b";/../../portal",
        b"/..;/..;/portal",
    ],
)
async def test_link_path_tricks_reach_nothing_else(running: Running, suffix: bytes) -> None:
    """``/a/{link}`` with every encoding of a climb: the answer is the generic refusal or a
    404 page, never the portal, a static file, another route's page or a source file."""
    got = await _get(running, b"/a/" + UNKNOWN.encode() + suffix)
    status = status_of(got)
    assert status in (400, 403, 404), got[:300]
    body = _body(got)
    assert b"Time left" not in body and b"Sign out" not in body  # the portal
    assert b"--" not in body[:10] and b"{" not in body[:1]  # no CSS, no JSON
    assert b"import " not in body and b"Traceback" not in body
    if status == 403:
        assert GENERIC_REFUSAL.encode() in body
    await _healthy(running)


async def test_link_path_tricks_around_a_real_link_never_show_it(running: Running) -> None:
    """A valid link reached through a climb or an encoded slash is not the link page."""
    sd = await seed(running)
    _rid, link = await create_forwarded(running, sd)
    code = link.rsplit("/", 1)[1].encode()
    assert status_of(await _get(running, link.encode())) == 200
    for target in (
        b"/a/x/../" + code,
        b"/a/%2e%2e/a/" + code,
        b"/a/" + code + b"%2f",
        b"/a/" + code + b"%2ftoken",
        b"//a/" + code,
        b"/a//" + code,
        b"/a\\" + code,
        b"/A/" + code,
        b"/a/" + code + b"%00",
        b"/a/" + code[:-1] + b"%" + b"%02X" % code[-1],
    ):
        got = await _get(running, target)
        status = status_of(got)
        body = _body(got)
        if status == 200:
            # aiohttp resolves dot-segments before routing; then it must be the very same page.
            assert target in (b"/a/x/../" + code, b"/a/" + code[:-1] + b"%" + b"%02X" % code[-1]), target
            continue
        assert status in (301, 302, 307, 308, 400, 403, 404), (target, got[:300])
        assert b">Send token</button>" not in body, target


@pytest.mark.parametrize(
    "head",
    [
        pytest.param(b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", id="cl-and-te"),
        pytest.param(b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", id="te-and-cl"),
        pytest.param(b"Content-Length: 5\r\nContent-Length: 40\r\n", id="two-content-lengths"),
        pytest.param(b"Content-Length: 5, 40\r\n", id="content-length-list"),
        pytest.param(b"Content-Length: +5\r\n", id="content-length-sign"),
        pytest.param(b"Transfer-Encoding: chunked, identity\r\n", id="te-not-last-chunked"),
        pytest.param(b"Transfer-Encoding: xchunked\r\n", id="te-unknown"),
        pytest.param(b"Transfer-Encoding : chunked\r\n", id="space-before-colon"),
        pytest.param(b"Host: evil.example\r\n", id="two-hosts"),
        pytest.param(b"X-Bad\x00Name: x\r\n", id="nul-in-name"),
        pytest.param(b"X-Ok: a\x00b\r\n", id="nul-in-value"),
        pytest.param(b"X-Ok: a\rb\r\n", id="bare-cr-in-value"),
        pytest.param(b"X-Bad\rName: x\r\n", id="cr-in-name"),
        pytest.param(b"X Bad: x\r\n", id="space-in-name"),
        pytest.param(b" X-Folded: x\r\n", id="obs-fold-first"),
        pytest.param(b"X-A: a\r\n X-Folded: smuggled\r\n", id="obs-fold"),
    ],
)
async def test_ambiguous_framing_is_refused(running: Running, head: bytes) -> None:
    """POST to a login route with a second request hidden where a lenient parser would
    see a body: the gateway refuses the message and never answers the hidden request."""
    hidden = b"GET /static/public/site.css HTTP/1.1\r\nHost: " + _host(running) + b"\r\n\r\n"
    body = b"0\r\n\r\n" + hidden
    raw = (
        b"POST /a/"
        + UNKNOWN.encode()
        + b"/verify HTTP/1.1\r\nHost: "
        + _host(running)
        + b"\r\n"
        + head
        + b"Content-Type: application/x-www-form-urlencoded\r\n\r\n"
        + body
    )
    got = await exchange(running.public_url, running.ssl, raw, timeout=3)
    status = status_of(got)
    assert status is None or 400 <= status < 500, got[:300]
    assert got.count(b"HTTP/1.1 ") <= 1, got  # no second (smuggled) response
    assert b"text/css" not in got
    await _healthy(running)


@pytest.mark.parametrize(
    "request_line",
    [
        pytest.param(b"CONNECT 127.0.0.1:22 HTTP/1.1", id="connect"),
        pytest.param(b"CONNECT localhost:8443 HTTP/1.1", id="connect-self"),
        pytest.param(b"GET * HTTP/1.1", id="asterisk-form"),
        pytest.param(b"GET /portal HTTP/1.1 extra", id="extra-token"),
        pytest.param(b"GET /portal HTTP/9.9", id="bad-version"),
        pytest.param(b"GET /portal", id="http-0.9"),
        pytest.param(b"G\x00ET /portal HTTP/1.1", id="nul-in-method"),
    ],
)
async def test_odd_request_targets_never_proxy(running: Running, request_line: bytes) -> None:
    raw = request_line + b"\r\nHost: " + _host(running) + b"\r\nConnection: close\r\n\r\n"
    got = await exchange(running.public_url, running.ssl, raw, timeout=3)
    status = status_of(got) if got.startswith(b"HTTP/1.") else None
    assert status is None or 400 <= status < 500, got[:300]
    assert b"SSH-2.0" not in got and b"Sign out" not in got
    await _healthy(running)


@pytest.mark.parametrize(
    "target",
    [b"https://evil.example/", b"http://127.0.0.1:22/", b"https://127.0.0.1:1/static/public/site.css"],
)
async def test_absolute_form_is_served_as_the_gateways_own_path(running: Running, target: bytes) -> None:
    """RFC 9112 section 3.2.2: a server accepts absolute-form. The gateway serves its own
    page for the path and never fetches from the authority the client named."""
    path = b"/" + target.split(b"/", 3)[3]
    got = await _get(running, target)
    plain = await _get(running, path)
    assert status_of(got) == status_of(plain) == 200, got[:300]
    assert _body(got) == _body(plain)
    assert b"SSH-2.0" not in got


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(b"X-Big: " + b"a" * 70000 + b"\r\n", id="one-huge-header"),
        pytest.param(b"".join(b"X-%d: %s\r\n" % (i, b"v" * 200) for i in range(1000)), id="many-headers"),
        pytest.param(b"Cookie: " + b"c=" + b"x" * 70000 + b"\r\n", id="huge-cookie"),
    ],
)
async def test_oversized_header_block_is_431_or_400(running: Running, extra: bytes) -> None:
    got = await _get(running, b"/portal", extra)
    assert status_of(got) in (400, 431, None), got[:300]
    await _healthy(running)


async def test_64_kib_host_header_is_refused(running: Running) -> None:
    raw = b"GET / HTTP/1.1\r\nHost: " + b"h" * 65536 + b"\r\nConnection: close\r\n\r\n"
    got = await exchange(running.public_url, running.ssl, raw)
    assert status_of(got) in (400, 431, None), got[:300]
    await _healthy(running)


async def test_slowloris_headers_do_not_starve_others(running: Running) -> None:
    """Twenty connections trickle header lines; a normal request is still served at once."""
    slow = [await open_raw(running.public_url, running.ssl) for _ in range(20)]
    try:
        for _reader, writer in slow:
            writer.write(b"GET /portal HTTP/1.1\r\nHost: " + _host(running) + b"\r\n")
        for i in range(3):
            for _reader, writer in slow:
                writer.write(b"X-Slow-%d: 1\r\n" % i)
                await writer.drain()
            started = time.monotonic()
            await _healthy(running)
            assert time.monotonic() - started < 2
            await asyncio.sleep(0.5)
    finally:
        for _reader, writer in slow:
            writer.close()


@pytest.mark.parametrize(
    ("first", "drip"),
    [
        pytest.param(b"GET /por", b"t", id="request-line"),
        pytest.param(b"GET /portal HTTP/1.1\r\nHost: localhost\r\n", b"X-Slow: 1\r\n", id="headers"),
    ],
)
async def test_slowloris_connection_is_closed_within_the_head_timeout(
    running: Running, monkeypatch: pytest.MonkeyPatch, first: bytes, drip: bytes
) -> None:
    from domum_gateway.proxy import http_proxy

    monkeypatch.setattr(http_proxy, "_HEAD_TIMEOUT", 1.0)
    reader, writer = await open_raw(running.public_url, running.ssl)
    try:
        writer.write(first)
        deadline = time.monotonic() + 6
        closed = False
        while time.monotonic() < deadline and not closed:
            try:
                writer.write(drip)
                await writer.drain()
                got = await asyncio.wait_for(reader.read(4096), 0.5)
                assert status_of(got) in (None, 400, 408, 431), got[:200]
                closed = True
            except TimeoutError:
                continue
            except ConnectionError:
                closed = True
        assert closed, "slowloris connection still open"
    finally:
        writer.close()
    await _healthy(running)


@pytest.mark.parametrize(
    "framing", [b"Content-Length: %d\r\n" % (100 << 20), b"Transfer-Encoding: chunked\r\n"]
)
async def test_hundred_megabyte_form_post_is_refused_fast(running: Running, framing: bytes) -> None:
    """A 100 MB form body to a login route: refused (413, 403 or closed) long before the
    gateway has read it all, with the gateway's memory bounded."""
    rss_before = rss_kib()
    reader, writer = await open_raw(running.public_url, running.ssl)
    writer.write(
        b"POST /a/"
        + UNKNOWN.encode()
        + b"/verify HTTP/1.1\r\nHost: "
        + _host(running)
        + b"\r\n"
        + framing
        + b"Content-Type: application/x-www-form-urlencoded\r\n\r\n"
    )
    response = asyncio.ensure_future(reader.read(65536))
    chunk = b"token=" + b"1" * ((1 << 20) - 6)
    sent = 0
    started = time.monotonic()
    try:
        with contextlib.suppress(ConnectionError, TimeoutError):
            while sent < (100 << 20) and not response.done():
                part = chunk if framing.startswith(b"Content-Length") else b"100000\r\n" + chunk + b"\r\n"
                writer.write(part)
                await asyncio.wait_for(writer.drain(), 5)
                sent += len(chunk)
        with contextlib.suppress(ConnectionError):
            got = await asyncio.wait_for(response, 10)
    finally:
        writer.close()
    assert time.monotonic() - started < 15
    assert sent < (100 << 20), "the gateway read the whole body"
    assert status_of(got) in (None, 400, 403, 413), got[:300]
    assert rss_kib() - rss_before < 32 * 1024
    await _healthy(running)


async def test_invalid_utf8_nul_and_broken_multipart_in_a_login_form(running: Running) -> None:
    """Bodies that do not decode are a 400 (or the generic 403) page, never a 500."""
    sd = await seed(running)
    _rid, link = await create_forwarded(running, sd)
    form = b"application/x-www-form-urlencoded"
    multipart = b"multipart/form-data; boundary=XyZ"
    cases = [
        (form, b"token=\xff\xfe&csrf=\xc0\xae"),
        (form, b"token=%ff%fe&csrf=%c0%ae"),
        (form, b"token=1234%005678&csrf=x"),
        (multipart, b'--XyZ\r\nContent-Disposition: form-data; name="token"\r\n\r\n\xff\xfe\r\n--XyZ--\r\n'),
        (multipart, b"--XyZ\r\nno headers end here"),
        (multipart, b"garbage without a boundary"),
        (b"multipart/form-data", b"--\r\n"),
    ]
    for ctype, body in cases:
        raw = (
            b"POST "
            + link.encode()
            + b"/verify HTTP/1.1\r\nHost: "
            + _host(running)
            + b"\r\n"
            + b"Content-Type: "
            + ctype
            + b"\r\n"
            + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
            + body
        )
        got = await exchange(running.public_url, running.ssl, raw)
        assert status_of(got) in (400, 403), (ctype, body, got[:300])
        assert b"Traceback" not in got and b"Error" not in _body(got).split(b"<footer")[0]
    await _healthy(running)
