"""Path tricks cannot reach another target: raw bytes on a TLS socket, then count hits.

Clients normalise paths before sending, so these requests are written by hand. Target
``a`` is granted and target ``b`` (a separate upstream) too; every request below names
``a`` or is malformed, and ``b`` must see no request at all. Where a request is refused
the gateway answers 400 or 404 itself; where it is accepted it reaches ``a`` only.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from ..conftest import Running
from ..peers.upstreams import ProxyEnv, Upstream, grant_targets, raw_exchange, start_upstream, status_of

pytestmark = pytest.mark.asyncio


@dataclass
class Two:
    user: ProxyEnv
    a: Upstream
    b: Upstream


@pytest.fixture
async def two(running: Running) -> AsyncIterator[Two]:
    async with start_upstream() as a, start_upstream() as b:
        user = await grant_targets(running, {"a": a.url + "/base", "b": b.url + "/"})
        yield Two(user, a, b)


def _get(target: bytes, cookie: str, host: bytes = b"gw.example") -> bytes:
    return (
        b"GET "
        + target
        + b" HTTP/1.1\r\nHost: "
        + host
        + b"\r\nCookie: __Host-domum="
        + cookie.encode()
        + b"\r\nConnection: close\r\n\r\n"
    )


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (b"/t/a/../b/", 400),
        (b"/t/a/%2e%2e/b/", 400),
        (b"/t/a/%2E%2e/%2e%2E/b/", 400),
        (b"/t/a/..%2fb/", 400),
        (b"/t/a/%2e%2e%2fb%2f", 400),
        (b"/t/a/%252e%252e/b/", 400),
        (b"/t/a/..;/b/", 400),
        (b"/t/a/.%2e/b/", 400),
        (b"/t/a/./x", 400),
        (b"/t/a/x\\..\\..\\b", 400),
        (b"/t/a\\..\\b/", 404),
        (b"/t/%62/", 404),
        (b"/t/a%2fb/", 404),
        (b"/t/A/", 404),
        (b"/t//b/", 404),
        (b"/t/a/x%00y", 400),
        (b"/t/a/x#frag", 400),
    ],
)
async def test_traversal_never_reaches_the_other_target(two: Two, target: bytes, expected: int) -> None:
    out = await raw_exchange(two.user, _get(target, two.user.cookie))
    assert status_of(out) == expected, out[:200]
    assert two.b.hits == []
    assert two.a.hits == []


@pytest.mark.parametrize(
    ("target", "upstream_path"),
    [
        (b"/t/a//b/x", "/base/b/x"),  # repeated slashes merged, still under a's prefix
        (b"/t/a///127.0.0.1:1/x", "/base/127.0.0.1:1/x"),
        (b"/t/a/%2f%2fb/x", "/base/%2f%2fb/x"),  # encoded slashes stay encoded, inside a
        (b"/t/a/x/..b/..c", "/base/x/..b/..c"),  # not dot segments
        (b"/t/a/.well-known/x", "/base/.well-known/x"),
    ],
)
async def test_odd_but_harmless_paths_stay_inside_the_target(
    two: Two, target: bytes, upstream_path: str
) -> None:
    out = await raw_exchange(two.user, _get(target, two.user.cookie))
    assert status_of(out) == 200, out[:300]
    assert two.a.hits == [upstream_path]
    assert two.b.hits == []


async def test_absolute_form_request_line_cannot_pick_a_host(two: Two) -> None:
    b_authority = two.b.url.split("://")[1].encode()
    for target in (
        b"http://" + b_authority + b"/",
        b"http://" + b_authority + b"/t/a/x",
        b"https://" + b_authority + b"/t/b/../../",
    ):
        out = await raw_exchange(two.user, _get(target, two.user.cookie, host=b_authority))
        assert status_of(out) in (200, 400, 404), out[:200]
    assert two.b.hits == []
    # An absolute-form target still selects by /t/{name} only: a, at a's own address.
    assert all(hit.startswith("/base/") for hit in two.a.hits)


async def test_host_header_cannot_pick_a_host(two: Two) -> None:
    b_authority = two.b.url.split("://")[1].encode()
    out = await raw_exchange(two.user, _get(b"/t/a/y", two.user.cookie, host=b_authority))
    assert status_of(out) == 200
    assert two.a.hits == ["/base/y"]
    assert two.b.hits == []


async def test_smuggling_attempts_are_refused(two: Two) -> None:
    cookie = f"Cookie: __Host-domum={two.user.cookie}\r\n".encode()
    attacks = [
        # CL and TE together: llhttp refuses, nothing is forwarded.
        b"POST /t/a/x HTTP/1.1\r\nHost: g\r\n"
        + cookie
        + b"Content-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"0\r\n\r\nGET /t/b/ HTTP/1.1\r\nHost: g\r\n\r\n",
        # Two Host headers.
        b"GET /t/a/x HTTP/1.1\r\nHost: g\r\nHost: h\r\n" + cookie + b"Connection: close\r\n\r\n",
        # Obsolete line folding.
        b"GET /t/a/x HTTP/1.1\r\nHost: g\r\n" + cookie + b"X-A: 1\r\n b\r\nConnection: close\r\n\r\n",
        # A space in the request target.
        b"GET /t/a/x /t/b/ HTTP/1.1\r\nHost: g\r\n" + cookie + b"Connection: close\r\n\r\n",
    ]
    for data in attacks:
        out = await raw_exchange(two.user, data)
        assert status_of(out) == 400, out[:200]
    assert two.b.hits == []
    assert two.a.hits == []


async def test_pipelined_request_for_other_target_is_admitted_on_its_own(two: Two) -> None:
    """A second request behind the first is parsed and checked like any other."""
    cookie = f"Cookie: __Host-domum={two.user.cookie}\r\n".encode()
    data = (
        b"GET /t/a/one HTTP/1.1\r\nHost: g\r\n"
        + cookie
        + b"\r\n"
        + b"GET /t/b/two HTTP/1.1\r\nHost: g\r\n"
        + cookie
        + b"Connection: close\r\n\r\n"
    )
    out = await raw_exchange(two.user, data)
    assert out.count(b"HTTP/1.1 200") == 2
    assert two.a.hits == ["/base/one"]
    assert two.b.hits == ["/two"]
