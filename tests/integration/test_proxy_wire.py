"""The proxy's pure HTTP rules (``proxy.http_wire``): table tests and properties, no sockets.

Kept with the proxy's integration tests so the whole proxy suite runs with one pattern;
nothing here starts a server.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domum_gateway.proxy.http_wire import (
    ChunkScanner,
    PathProblem,
    WireError,
    check_app_path,
    cookie_value,
    map_location,
    parse_proxy_path,
    parse_response_head,
    rewrite_set_cookie,
    scan_request,
    strip_gateway_cookie,
)

NGINX = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Mon, 23 Nov 2026 07:45:42 GMT\r\nContent-Type: text/plain\r\n"
    b'Content-Length: 84\r\nConnection: keep-alive\r\nETag: "x"\r\n\r\n'
)


def test_response_head_drops_hop_by_hop_and_keeps_the_rest() -> None:
    head = parse_response_head(NGINX, request_method=b"GET")
    assert head.status == 200 and head.framing == "length" and head.length == 84 and head.keep_alive
    assert b"Connection" not in head.block
    assert head.block.startswith(b"HTTP/1.1 200 OK\r\nServer: nginx\r\n")
    assert head.block.endswith(b'ETag: "x"\r\n')
    assert not head.rewrite


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length : 5\r\n\r\n",  # space before the colon
        b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\n\r\n",  # obsolete folding
        b"HTTP/1.1 200 OK\r\nNo colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\nY: b\r\n\r\n",  # bare LF
        b"HTTP/1.1 200 OK\r\nX: a\rY: b\r\n\r\n",  # bare CR
        b"HTTP/1.1 200 OK\r\nX: a\x00\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\ncontent-length: 6\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/2 200 OK\r\n\r\n",
        b"ICY 200 OK\r\n\r\n",
    ],
)
def test_ambiguous_response_heads_are_refused(raw: bytes) -> None:
    with pytest.raises(WireError):
        parse_response_head(raw, request_method=b"GET")


@pytest.mark.parametrize(
    ("raw", "method", "framing", "keep_alive"),
    [
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"GET", "chunked", True),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", b"GET", "close", False),
        (b"HTTP/1.1 200 OK\r\n\r\n", b"GET", "close", False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", b"GET", "length", False),
        (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\n", b"GET", "length", True),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n", b"GET", "length", False),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", b"HEAD", "none", True),
        (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n", b"GET", "none", True),
        (b"HTTP/1.1 204 No Content\r\n\r\n", b"GET", "none", True),
        (b"HTTP/1.1 100 Continue\r\n\r\n", b"POST", "none", True),
    ],
)
def test_response_framing(raw: bytes, method: bytes, framing: str, keep_alive: bool) -> None:
    head = parse_response_head(raw, request_method=method)
    assert head.framing == framing
    assert head.keep_alive is keep_alive


def test_headers_named_in_connection_are_dropped() -> None:
    raw = b"HTTP/1.1 200 OK\r\nConnection: X-Hop, keep-alive\r\nX-Hop: 1\r\nx-hop: 2\r\nX-Keep: 3\r\n\r\n"
    head = parse_response_head(raw, request_method=b"GET")
    assert head.block == b"HTTP/1.1 200 OK\r\nX-Keep: 3\r\n"


def test_204_loses_its_content_length() -> None:
    head = parse_response_head(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n", request_method=b"GET")
    assert head.block == b"HTTP/1.1 204 No Content\r\n"


def _chunked(parts: list[bytes], trailers: bytes = b"") -> bytes:
    body = b"".join(b"%x\r\n" % len(p) + p + b"\r\n" for p in parts if p)
    return body + b"0\r\n" + trailers + b"\r\n"


@settings(max_examples=200, deadline=None)
@given(
    parts=st.lists(st.binary(min_size=1, max_size=300), max_size=8),
    cuts=st.lists(st.integers(min_value=1, max_value=50), max_size=30),
    extra=st.binary(max_size=20),
)
def test_chunk_scanner_finds_the_end_however_it_is_split(
    parts: list[bytes], cuts: list[int], extra: bytes
) -> None:
    body = _chunked(parts, b"X-Trailer: 1\r\n")
    stream = body + extra
    scanner = ChunkScanner()
    decoder = ChunkScanner(decode=True)
    consumed = 0
    pos = 0
    pieces = []
    for cut in [*cuts, len(stream)]:
        piece = stream[pos : pos + cut]
        pos += len(piece)
        if not piece or scanner.done:
            continue
        used = scanner.feed(piece)
        decoder.feed(piece)
        consumed += used
        pieces.append(piece[:used])
    assert scanner.done
    assert consumed == len(body)
    assert b"".join(pieces) == body
    assert b"".join(decoder.out) == b"".join(parts)


@pytest.mark.parametrize("bad", [b"zz\r\n", b"5\r\nhelloX\r\n", b"5\nhello\r\n", b"\r\n", b"-1\r\n"])
def test_chunk_scanner_refuses_malformed_chunks(bad: bytes) -> None:
    with pytest.raises(WireError):
        ChunkScanner().feed(bad + b"0\r\n\r\n")


@pytest.mark.parametrize(
    ("url", "name", "rest", "query"),
    [
        (b"/t/wiki/", "wiki", b"/", b""),
        (b"/t/wiki/a/b?x=1&y=%2F", "wiki", b"/a/b", b"?x=1&y=%2F"),
        (b"/t/w-1_x/a//b", "w-1_x", b"/a/b", b""),
    ],
)
def test_proxy_paths(url: bytes, name: str, rest: bytes, query: bytes) -> None:
    where = parse_proxy_path(url)
    assert where is not None
    assert (where.name, where.rest, where.query, where.redirect) == (name, rest, query, b"")


def test_proxy_path_without_slash_redirects_and_bad_names_are_none() -> None:
    where = parse_proxy_path(b"/t/wiki?a=1")
    assert where is not None and where.redirect == b"/t/wiki/?a=1"
    for url in (b"/t/Wiki/", b"/t/-x/", b"/t/a%62/", b"/x/wiki/", b"/t//"):
        assert parse_proxy_path(url) is None


_SEGMENT = st.sampled_from(["a", "b", "..", ".", "%2e", "%2E%2e", "..;x", "%2f", "%252e%252e", "x.y", "%20"])


@settings(max_examples=300, deadline=None)
@given(st.lists(_SEGMENT, min_size=1, max_size=6))
def test_accepted_paths_never_climb(segments: list[str]) -> None:
    """Whatever is accepted, resolved the way a lenient server would, stays at or below /."""
    from urllib.parse import unquote

    path = ("/" + "/".join(segments)).encode()
    try:
        checked = check_app_path(path)
    except PathProblem:
        return
    text = checked.decode()
    for _ in range(3):
        text = unquote(text)
    depth = 0
    for part in text.replace("\\", "/").split("/"):
        part = part.split(";")[0]
        if part == "..":
            depth -= 1
        elif part not in ("", "."):
            depth += 1
        assert depth >= 0


def test_cookie_helpers() -> None:
    header = b"a=1; __Host-domum=s3cr3t; b=2"
    assert cookie_value(header) == b"s3cr3t"
    assert strip_gateway_cookie(header) == b"a=1; b=2"
    assert cookie_value(b"x__Host-domum=no; y=1") is None
    assert strip_gateway_cookie(b"__Host-domum=only") == b""


def test_scan_request_drops_what_clients_may_not_send() -> None:
    scan = scan_request(
        [
            (b"Host", b"gw"),
            (b"Cookie", b"__Host-domum=v; app=1"),
            (b"X-Domum-User", b"mallory"),
            (b"X-Forwarded-For", b"6.6.6.6"),
            (b"X-Forwarded-User", b"root"),
            (b"Remote-User", b"root"),
            (b"Authorization", b"Domum abc"),
            (b"Connection", b"keep-alive, X-Private"),
            (b"X-Private", b"p"),
            (b"Accept", b"*/*"),
        ]
    )
    assert scan.cookie == b"v"
    assert scan.block == b"Accept: */*\r\nCookie: app=1\r\n"
    assert scan.host == b"gw"
    kept = scan_request([(b"Authorization", b"Basic eA==")])
    assert kept.block == b"Authorization: Basic eA==\r\n"


@pytest.mark.parametrize(
    ("value", "prefix", "public", "expected"),
    [
        (b"/x", b"", b"/t/w", b"/t/w/x"),
        (b"http://up:8080/x?y", b"", b"/t/w", b"/t/w/x?y"),
        (b"HTTP://UP:8080", b"", b"/t/w", b"/t/w/"),
        (b"//up:8080/z", b"", b"/t/w", b"/t/w/z"),
        (b"/app/x", b"/app", b"/t/w", b"/t/w/x"),
        (b"/app", b"/app", b"/t/w", b"/t/w/"),
        (b"/other", b"/app", b"/t/w", b"/other"),
        (b"/application", b"/app", b"/t/w", b"/application"),
        (b"rel/x", b"", b"/t/w", b"rel/x"),
        (b"https://elsewhere/x", b"", b"/t/w", b"https://elsewhere/x"),
        (b"http://up:8080/app/x", b"/app", b"", b"/x"),
    ],
)
def test_map_location(value: bytes, prefix: bytes, public: bytes, expected: bytes) -> None:
    origins = (b"http://up:8080", b"//up:8080")
    assert map_location(value, prefix, public, origins) == expected


@pytest.mark.parametrize(
    ("value", "prefix", "public", "expected"),
    [
        (b"a=1; Path=/; HttpOnly", b"", b"/t/w", b"a=1; Path=/t/w/; HttpOnly"),
        (b"a=1; Domain=up; Path=/app/x", b"/app", b"/t/w", b"a=1; Path=/t/w/x"),
        (b"a=1; domain=.example.com", b"", b"", b"a=1"),
        (b"a=1", b"", b"/t/w", b"a=1"),
        (b"__Host-domum=evil; Path=/", b"", b"/t/w", None),
    ],
)
def test_rewrite_set_cookie(value: bytes, prefix: bytes, public: bytes, expected: bytes | None) -> None:
    assert rewrite_set_cookie(value, prefix, public) == expected
