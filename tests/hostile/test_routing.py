"""``/t/{target}/`` encodings the integration suite (``tests/integration/test_proxy_paths.py``)
does not already send: overlong UTF-8 dots and slashes, encoded backslashes, double-encoded
slashes, and climbs aimed at the gateway's own files. Target ``a`` is granted, target
``b`` is granted too and must see no request; nothing may come back from the gateway's
static folder or the file system.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from ..conftest import Running
from ..integration.test_proxy_paths import Two
from ..peers.upstreams import grant_targets, raw_exchange, start_upstream, status_of

pytestmark = pytest.mark.asyncio


@pytest.fixture
async def two(running: Running) -> AsyncIterator[Two]:
    async with start_upstream() as a, start_upstream() as b:
        user = await grant_targets(running, {"a": a.url + "/base", "b": b.url + "/"})
        yield Two(user, a, b)


def _get(target: bytes, cookie: str) -> bytes:
    return (
        b"GET "
        + target
        + b" HTTP/1.1\r\nHost: gw.example\r\nCookie: __Host-domum="
        + cookie.encode()
        + b"\r\nConnection: close\r\n\r\n"
    )


@pytest.mark.parametrize(
    "target",
    [
        b"/t/a/%c0%ae%c0%ae/b/",
        b"/t/a/%c0%ae%c0%ae%c0%afb%c0%af",
        b"/t/a/%e0%80%ae%e0%80%ae/b/",
        b"/t/a/..%c0%afb/",
        b"/t/a/%2e%2e%5cb%5c",
        b"/t/a/..%5c..%5cb",
        b"/t/a/%252f..%252fb",
        b"/t/a/%25%32%65%25%32%65/b/",
        b"/t/a/../../static/public/site.css",
        b"/t/a/%2e%2e/%2e%2e/static/public/site.css",
        b"/t/a/../../../../../../etc/passwd",
        b"/t/a/%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        b"/t/a/..%00/b/",
        b"/t/%c0%ae%c0%ae/b/",
        b"/t/a%c0%afb/",
        b"/t/%2e%2e/b/",
        b"/t/./b/",
        b"/t/../t/b/",
    ],
)
async def test_encoded_climbs_never_reach_another_target_or_a_file(two: Two, target: bytes) -> None:
    out = await raw_exchange(two.user, _get(target, two.user.cookie))
    status = status_of(out)
    assert status in (200, 400, 404), out[:300]
    assert b"root:" not in out and b"text/css" not in out
    assert two.b.hits == []
    # Accepted only as a path inside a, below a's own prefix, bytes unchanged past the name.
    for hit in two.a.hits:
        assert hit.startswith("/base/"), hit
        assert target.split(b"/", 3)[3].decode() in hit, hit
