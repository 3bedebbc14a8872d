"""HTTP/1.1 wire rules of the reverse proxy, free of sockets and of the event loop.

Everything here is a pure function of bytes (like h11: "this file does not know about
what role we're playing"): where a request path may go, what a target receives as its
request head, how a target's response head is checked, framed and rewritten, and how a
chunked body is delimited without copying it. The I/O around it (``http_front``,
``upstream``, ``http_proxy``) calls these and acts on the values.

Why the rules are strict:

* A proxied path selects a target by *name*; the rest is appended to that target's own
  URL prefix. Dot segments in any spelling (``..``, ``%2e%2e``, ``..;``, ``%2e%2E%2f``),
  backslashes and NUL bytes are refused, so a path can neither escape the target's
  prefix nor be read differently by the target than by the gateway.
* A response head is parsed exactly once, here, and the framing the gateway acts on is
  the framing the client will see; heads a browser could read differently (bare LF,
  obsolete line folding, conflicting lengths) are refused as a bad gateway answer.
"""

from __future__ import annotations

import re
from typing import NamedTuple
from urllib.parse import unquote_to_bytes

__all__ = [
    "GATEWAY_COOKIE",
    "HOP_BY_HOP",
    "ChunkScanner",
    "PathProblem",
    "ProxyPath",
    "RequestScan",
    "ResponseHead",
    "WireError",
    "check_app_path",
    "cookie_value",
    "map_location",
    "parse_proxy_path",
    "parse_response_head",
    "rewrite_set_cookie",
    "scan_request",
    "strip_gateway_cookie",
]

GATEWAY_COOKIE = b"__Host-domum"

# RFC 9110 7.6.1 plus the historical ones every proxy strips.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)

_NAME = re.compile(rb"[a-z0-9](?:[a-z0-9_-]{0,62}[a-z0-9])?")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# A path gets a closer look when it has an escape, a path parameter, a backslash, NUL,
# an empty segment or a dot segment; the common path has none and costs one search.
_SUSPECT = re.compile(rb"[%;\\\x00]|//|/\.\.?(?=/|$)")
_SEPARATORS = re.compile(rb"[/\\]")
_MAX_HEAD = 65536
_CONNECTION_OPTIONS = frozenset({b"", b"close", b"keep-alive", b"upgrade"})


class WireError(ValueError):
    """A message the proxy must not pass on (the reason is for logs, not for users)."""


class PathProblem(ValueError):
    """A request path the proxy refuses (400)."""


class ProxyPath(NamedTuple):
    """A parsed ``/t/{name}/rest?query``; ``redirect`` is set for ``/t/{name}`` without slash."""

    name: str
    rest: bytes  # path below the target root, starting with "/"
    query: bytes  # with its leading "?", or b""
    redirect: bytes = b""


def parse_proxy_path(url: bytes) -> ProxyPath | None:
    """Split an origin-form request target under ``/t/``.

    Returns None when ``url`` is not under ``/t/{valid name}`` (the caller answers 404).

    Raises:
        PathProblem: the path tries to leave the target's prefix or is ambiguous.
    """
    if not url.startswith(b"/t/"):
        return None
    if b"#" in url:
        raise PathProblem("fragment in request target")
    path, sep, query = url.partition(b"?")
    name, slash, rest = path[3:].partition(b"/")
    if _NAME.fullmatch(name) is None:
        return None
    if not slash:
        return ProxyPath(name.decode(), b"/", sep + query, b"/t/" + name + b"/" + sep + query)
    return ProxyPath(name.decode(), check_app_path(b"/" + rest), sep + query)


def check_app_path(path: bytes) -> bytes:
    """The path as it will be appended to a target's prefix; refuses traversal tricks.

    Repeated slashes are merged (as nginx does), so ``//host/x`` can never reach a target
    as a network-path reference.

    Raises:
        PathProblem: dot segments in any encoding, backslashes, NUL, control bytes.
    """
    if _SUSPECT.search(path) is None:
        return path
    if b"\\" in path or b"\x00" in path:
        raise PathProblem("backslash or NUL in path")
    while b"//" in path:
        path = path.replace(b"//", b"/")
    for segment in path.split(b"/"):
        if segment and (b"%" in segment or b";" in segment or segment in (b".", b"..")):
            _check_segment(segment)
    return path


def _check_segment(segment: bytes) -> None:
    text = segment
    # Decode up to three times: an upstream that decodes twice must not see ".." either.
    for _ in range(4):
        for piece in _SEPARATORS.split(text):
            bare = piece.split(b";", 1)[0].strip()
            if bare in (b".", b"..") or b"\x00" in piece:
                raise PathProblem("dot segment in path")
        if b"%" not in text:
            return
        decoded = unquote_to_bytes(text)
        if decoded == text:
            return
        if any(c < 0x20 or c == 0x7F for c in decoded) or b"\\" in decoded:
            raise PathProblem("encoded control byte or backslash in path")
        text = decoded


def cookie_value(header: bytes, name: bytes = GATEWAY_COOKIE) -> bytes | None:
    """The first value of cookie ``name`` in a ``Cookie`` header value."""
    start = 0
    key = name + b"="
    while True:
        i = header.find(key, start)
        if i < 0:
            return None
        if i == 0 or header[i - 1 : i] in (b";", b" ", b"\t"):
            j = header.find(b";", i)
            value = header[i + len(key) : j if j >= 0 else len(header)].strip()
            if value.startswith(b'"') and value.endswith(b'"') and len(value) >= 2:
                value = value[1:-1]
            return value
        start = i + 1


def strip_gateway_cookie(header: bytes, name: bytes = GATEWAY_COOKIE) -> bytes:
    """The ``Cookie`` header value without the gateway's cookie (b"" when nothing is left)."""
    if name not in header:
        return header
    kept = [p for p in header.split(b";") if p.strip().partition(b"=")[0].strip() != name]
    return b";".join(kept).strip()


class ResponseHead:
    """A target's response head, checked, with hop-by-hop headers removed.

    ``block`` is the status line and the kept header lines, each ending in CRLF (add more
    lines, then one CRLF, to finish the head). ``framing`` is ``"none"`` (no body),
    ``"length"`` (``length`` bytes), ``"chunked"`` or ``"close"`` (until the target
    closes). ``rewrite`` says a Location, Content-Location or Set-Cookie header is there.
    """

    __slots__ = ("block", "framing", "keep_alive", "length", "rewrite", "status", "upgrade")

    def __init__(
        self,
        status: int,
        block: bytes,
        framing: str,
        length: int,
        keep_alive: bool,
        upgrade: bytes = b"",
        rewrite: bool = False,
    ) -> None:
        self.status = status
        self.block = block
        self.framing = framing
        self.length = length
        self.keep_alive = keep_alive
        self.upgrade = upgrade
        self.rewrite = rewrite


# Every header line of the lower-cased head: ``findall`` yields the name of each line the
# proxy acts on and b"" for every other well-formed line. A head with any other kind of
# line (a space before the colon, obsolete folding, no colon, a control byte in the name)
# yields fewer items than it has lines, and is refused.
_LINES = re.compile(
    rb"\r\n(?:(c(?:onnection|ontent-length|ontent-location)|keep-alive|"
    rb"proxy-(?:connection|authenticate|authorization)|t(?:e|railer|ransfer-encoding)|upgrade|"
    rb"location|set-cookie)|[!#$%&'*+.^_`|~0-9a-z-]+):"
)
_REWRITTEN = frozenset({b"location", b"content-location", b"set-cookie"})


def parse_response_head(head: bytes, *, request_method: bytes) -> ResponseHead:
    """Check ``head`` (status line to the empty line); drop hop-by-hop headers.

    One regular-expression pass classifies every line; values are read only for the few
    headers the proxy acts on. This runs for every proxied response.

    Raises:
        WireError: malformed, ambiguous or oversized head.
    """
    if len(head) > _MAX_HEAD:
        raise WireError("response head too large")
    if (
        not head.startswith(b"HTTP/1.")
        or head[8:9] != b" "
        or not head[9:12].isdigit()
        or head[12:13] not in (b"\r", b" ")
    ):
        raise WireError("bad status line")
    crlf = head.count(b"\r\n")
    # Bare CR or LF, or NUL, could be read differently by the client.
    if head.count(b"\n") != crlf or head.count(b"\r") != crlf or b"\x00" in head:
        raise WireError("bare CR or LF, or NUL, in response head")
    low = head.lower()  # same length and offsets: only ASCII letters change
    found = _LINES.findall(low)
    if len(found) != crlf - 2:
        raise WireError("bad header line")
    status = int(head[9:12])
    if status < 100:
        raise WireError("bad status code")
    special = set(found)
    special.discard(b"")
    cut: list[tuple[int, int]] = []  # (start, end) of lines to remove
    conn_tokens: set[bytes] = set()
    cl_lines: list[tuple[int, int]] = []
    has_te = chunked = rewrite = False
    upgrade = b""
    length = -1
    for name in special:
        if name in _REWRITTEN:
            rewrite = True
            continue
        needle = b"\r\n" + name + b":"
        i = low.find(needle)
        while i >= 0:
            end = low.find(b"\r\n", i + 2)
            line = (i + 2, end + 2)
            value = low[i + len(needle) : end].strip()
            i = low.find(needle, end)
            if name == b"content-length":
                cl_lines.append(line)
                if value.isdigit() and length < 0:
                    length = int(value)
                    continue
                for v in value.split(b","):
                    v = v.strip()
                    if not v.isdigit() or (length >= 0 and int(v) != length):
                        raise WireError("bad or conflicting Content-Length")
                    length = int(v)
                continue
            cut.append(line)
            if name == b"connection":
                if value == b"keep-alive" or value == b"close":
                    conn_tokens.add(value)
                else:
                    conn_tokens.update(t.strip() for t in value.split(b","))
            elif name == b"transfer-encoding":
                has_te = True
                chunked = value.rsplit(b",", 1)[-1].strip() == b"chunked"
            elif name == b"upgrade":
                upgrade = value
    if len(conn_tokens) > 1 or (conn_tokens and not conn_tokens <= _CONNECTION_OPTIONS):
        for token in conn_tokens - _CONNECTION_OPTIONS:
            needle = b"\r\n" + token + b":"
            i = low.find(needle)
            while i >= 0:
                end = low.find(b"\r\n", i + 2)
                cut.append((i + 2, end + 2))
                i = low.find(needle, end)
    keep_alive = b"close" not in conn_tokens and (head[7:8] != b"0" or b"keep-alive" in conn_tokens)
    framing = "length"
    if status == 101:
        framing, keep_alive = "none", False
    elif request_method == b"HEAD" or status == 304:
        framing = "none"
    elif status < 200 or status == 204:
        framing = "none"
        cut += cl_lines
    elif has_te:
        if length >= 0:
            # RFC 9112 6.3: a sender must not send both; treat it as an error, never guess.
            raise WireError("both Transfer-Encoding and Content-Length")
        framing = "chunked" if chunked else "close"
    elif length < 0:
        framing = "close"
    if framing == "close":
        keep_alive = False
    if not cut:
        block = head[:-2]
    elif len(cut) == 1:
        a, b = cut[0]
        block = head[:a] + head[b:-2]
    else:
        cut.sort()
        pieces = []
        pos = 0
        for a, b in cut:
            if a >= pos:
                pieces.append(head[pos:a])
                pos = b
        pieces.append(head[pos:-2])
        block = b"".join(pieces)
    return ResponseHead(status, block, framing, max(length, 0), keep_alive, upgrade, rewrite)


class ChunkScanner:
    """Finds where a chunked body ends, passing the bytes through untouched.

    ``feed`` returns how many bytes of ``data`` belong to the body; the body is complete
    when ``done`` is set (anything after that offset is not part of this message). With
    ``decode=True`` the chunk payloads are collected in ``out`` instead (for HTTP/1.0
    clients, which cannot read chunked bodies).
    """

    __slots__ = ("_crlf", "_line", "_remaining", "_state", "decode", "done", "out")

    _SIZE, _DATA, _DATA_END, _TRAILER = range(4)

    def __init__(self, decode: bool = False) -> None:
        self._state = self._SIZE
        self._remaining = 0
        self._line = b""
        self._crlf = b""
        self.done = False
        self.decode = decode
        self.out: list[bytes] = []

    def feed(self, data: bytes) -> int:
        """Consume from ``data``; return the number of bytes that belong to the body.

        Raises:
            WireError: a malformed chunk size or delimiter.
        """
        pos = 0
        n = len(data)
        while pos < n and not self.done:
            state = self._state
            if state == self._DATA:
                take = min(self._remaining, n - pos)
                if self.decode:
                    self.out.append(data[pos : pos + take])
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = self._DATA_END
                    self._crlf = b""
            elif state == self._DATA_END:
                need = 2 - len(self._crlf)
                self._crlf += data[pos : pos + need]
                pos += min(need, n - pos)
                if len(self._crlf) == 2:
                    if self._crlf != b"\r\n":
                        raise WireError("chunk not followed by CRLF")
                    self._state = self._SIZE
            else:
                end = data.find(b"\n", pos)
                if end < 0:
                    self._line += data[pos:]
                    pos = n
                    if len(self._line) > 4096:
                        raise WireError("chunk line too long")
                    break
                line = self._line + data[pos : end + 1]
                self._line = b""
                pos = end + 1
                if not line.endswith(b"\r\n") or len(line) > 4096:
                    raise WireError("bad chunk line ending")
                if state == self._SIZE:
                    size_text = line[:-2].split(b";", 1)[0].strip()
                    if not size_text or len(size_text) > 16 or size_text.strip(b"0123456789abcdefABCDEF"):
                        raise WireError("bad chunk size")
                    size = int(size_text, 16)
                    if size == 0:
                        self._state = self._TRAILER
                    else:
                        self._remaining = size
                        self._state = self._DATA
                elif line == b"\r\n":
                    self.done = True
                elif line[:1] in (b" ", b"\t") or b":" not in line:
                    raise WireError("bad trailer line")
        return pos


def map_location(value: bytes, prefix: bytes, public_prefix: bytes, origins: tuple[bytes, ...]) -> bytes:
    """Rewrite a ``Location``/``Content-Location`` value from the target's view to the client's.

    ``prefix`` is the target URL's path without trailing slash (b"" for the root),
    ``public_prefix`` where the client sees that root (b"/t/wiki" in path mode, b"" in
    host mode), ``origins`` the lower-cased spellings of the target's origin
    (``http://h:p``, ``//h:p``). Relative references and values pointing elsewhere (or
    outside the prefix) are returned unchanged.
    """
    v = value.strip()
    if v.startswith(b"/") and not v.startswith(b"//"):
        path = v
    else:
        low = v.lower()
        for origin in origins:
            if low.startswith(origin) and low[len(origin) : len(origin) + 1] in (b"", b"/", b"?", b"#"):
                path = v[len(origin) :]
                break
        else:
            return value
    if prefix:
        if not path.startswith(prefix) or path[len(prefix) : len(prefix) + 1] not in (b"", b"/", b"?", b"#"):
            return value
        path = path[len(prefix) :]
    if not path.startswith(b"/"):
        path = b"/" + path
    return public_prefix + path


def rewrite_set_cookie(value: bytes, prefix: bytes, public_prefix: bytes) -> bytes | None:
    """A target's ``Set-Cookie`` value made to fit the client's view; None drops it.

    The ``Domain`` attribute is removed (cookies stay host-only, so one target cannot set
    cookies for another), ``Path`` is mapped under ``public_prefix`` and a cookie named
    like the gateway's session cookie is dropped.
    """
    parts = value.split(b";")
    name = parts[0].partition(b"=")[0].strip()
    if name == GATEWAY_COOKIE or not name:
        return None
    out = [parts[0]]
    changed = False
    for attr in parts[1:]:
        stripped = attr.strip()
        key = stripped.partition(b"=")[0].strip().lower()
        if key == b"domain":
            changed = True
            continue
        if key == b"path" and (prefix or public_prefix):
            path = stripped.partition(b"=")[2].strip() or b"/"
            if prefix and (path == prefix or path.startswith(prefix + b"/")):
                path = path[len(prefix) :]
            if not path.startswith(b"/"):
                path = b"/" + path
            out.append(b" Path=" + public_prefix + path)
            changed = True
            continue
        out.append(attr)
    return b";".join(out) if changed else value


# Request headers the gateway sets itself or must never pass on (besides hop-by-hop).
_REQ_DROP = frozenset(
    {
        b"host",
        b"forwarded",
        b"x-real-ip",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-forwarded-port",
        b"x-forwarded-prefix",
        b"x-forwarded-server",
        b"x-forwarded-ssl",
        b"x-forwarded-scheme",
    }
)
# Identity headers apps behind other auth proxies are often told to trust: a client must
# never be able to write them through the gateway.
_IDENTITY = frozenset({b"remote-user", b"x-remote-user", b"x-webauth-user"})
_REQ_WATCH = HOP_BY_HOP | _REQ_DROP | {b"cookie", b"authorization", b"content-length"}


class RequestScan:
    """What the proxy learnt from a client's request headers, and the lines it passes on.

    Class-level defaults: most requests set two or three of these.
    """

    host = b""  # the Host header as sent
    cookie: bytes | None = None  # the gateway cookie's value
    app_cookies = b""  # the Cookie header without the gateway cookie
    forwarded_for: tuple[bytes, ...] = ()
    websocket = False
    chunked = False
    has_length = False
    duplicate_host = False
    _block: bytes | None = None

    def __init__(self, lines: list[bytes]) -> None:
        self.lines = lines  # "Name: value" lines the target may see, in order

    @property
    def block(self) -> bytes:
        """The lines the target sees (with the app's cookies), each ending in CRLF."""
        block = self._block
        if block is None:
            lines = self.lines
            if self.app_cookies:
                lines = [*lines, b"Cookie: " + self.app_cookies]
            block = self._block = b"".join(line + b"\r\n" for line in lines)
        return block


_X_DROPPED = (b"x-domum-", b"x-forwarded-", b"x-auth-request-")


def scan_request(headers: list[tuple[bytes, bytes]]) -> RequestScan:
    """Sort a request's headers into what the target sees and what the gateway uses.

    Dropped: hop-by-hop headers and those named in ``Connection``; ``Host``,
    ``Forwarded``, ``X-Forwarded-*`` and ``X-Real-IP`` (the gateway writes its own);
    every ``X-Domum-*`` header (identity headers only the gateway may set) and the usual
    auth-proxy identity headers (``Remote-User``...); every header whose name holds an
    underscore (CGI, WSGI and PHP read ``X_Domum_User`` as ``HTTP_X_DOMUM_USER``, the
    same variable as ``X-Domum-User``: nginx drops them too); ``Authorization`` with the ``Domum``
    scheme (meant for the gateway). The gateway's cookie is removed from ``Cookie``; the
    app's own cookies stay.
    """
    lines: list[bytes] = []
    scan = RequestScan(lines)
    conn_tokens: list[bytes] | None = None
    upgrade = b""
    cookies: list[bytes] | None = None
    xff: list[bytes] | None = None
    watch = _REQ_WATCH
    for name, value in headers:
        lname = name.lower()
        if lname in watch:
            if lname == b"host":
                if scan.host:
                    scan.duplicate_host = True
                scan.host = value.strip()
            elif lname == b"cookie":
                if cookies is None:
                    cookies = [value]
                else:
                    cookies.append(value)
            elif lname == b"content-length":
                scan.has_length = True
                lines.append(name + b": " + value)
            elif lname == b"authorization":
                if value.lstrip()[:6].lower() != b"domum ":
                    lines.append(name + b": " + value)
            elif lname == b"connection":
                if conn_tokens is None:
                    conn_tokens = []
                conn_tokens.extend(t.strip().lower() for t in value.split(b","))
            elif lname == b"upgrade":
                upgrade = value.strip().lower()
            elif lname == b"transfer-encoding":
                scan.chunked = True  # llhttp accepted it, so chunked is the final coding
            elif lname == b"x-forwarded-for":
                if xff is None:
                    xff = []
                xff.append(value)
            continue
        if b"_" in lname or lname in _IDENTITY or (lname[:2] == b"x-" and lname.startswith(_X_DROPPED)):
            continue
        lines.append(name + b": " + value)
    if conn_tokens is not None:
        named = set(conn_tokens) - _CONNECTION_OPTIONS
        if named:
            scan.lines = lines = [ln for ln in lines if ln[: ln.find(b":")].lower() not in named]
            if b"x-forwarded-for" in named:
                xff = None  # a hop asked for it to be dropped: nobody vouches for it
        scan.websocket = upgrade == b"websocket" and b"upgrade" in conn_tokens
    if xff is not None:
        scan.forwarded_for = tuple(xff)
    if cookies is not None:
        if len(cookies) == 1:
            header = cookies[0]
            if header.startswith(b"__Host-domum=") and b";" not in header:
                scan.cookie = header[13:].strip()  # the browser sent only ours: nothing to keep
                return scan
        for header in cookies:
            if scan.cookie is None:
                scan.cookie = cookie_value(header)
        rest = [c for c in (strip_gateway_cookie(h) for h in cookies) if c]
        scan.app_cookies = b"; ".join(rest)
    return scan
