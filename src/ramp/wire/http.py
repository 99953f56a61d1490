"""HTTP/1.1 proxy requests, sans I/O: CONNECT tunnels and absolute-form requests.

h11 parses the request head; this module decides what the head asks the proxy for: the
target (`host:port` for CONNECT, an `http://` URL otherwise), the Proxy-Authorization
credentials, and for an absolute-form request the head rewritten for the origin. Every
rejection is a `RequestRejected` carrying the complete response to send and the reason to
count, so the I/O side only sends bytes and closes.

Usage, with `recv()` standing for the caller's I/O::

    reader = RequestReader()
    while (head := reader.next_request()) is None:
        reader.receive_data(recv())            # b"" = the client closed
    value = proxy_authorization(head)          # when credentials are required
    request = interpret(head, reader.trailing)

An absolute-form request then has its body read with `RequestBody(reader, head)`: it yields
the body re-framed for the origin and says when the request is complete. Nothing past that
request is ever forwarded: a pipelined second request stays in the proxy, unparsed, and the
client connection closes after the first response (see `ramp.onramps.http_connect`).

A request with both Content-Length and Transfer-Encoding is refused (400, reason
`cl_and_te`): RFC 9112 6.3 allows treating it as an error, and forwarding either framing lets
a proxy and an origin that disagree on it smuggle a second request.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from dataclasses import dataclass
from http import HTTPStatus

import h11

MAX_HEAD = 16384  # request line + headers
REALM = "ramp"

REASONS = {
    200: "Connection Established",
    400: "Bad Request",
    403: "Forbidden",
    407: "Proxy Authentication Required",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}

CONNECT_OK = b"HTTP/1.1 200 Connection Established\r\n\r\n"

# Hop-by-hop headers (RFC 9110 7.6.1) and the proxy's own; never forwarded to the origin.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"proxy-connection",
        b"keep-alive",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"te",
        b"trailer",
        b"upgrade",
        b"host",  # rewritten from the URL (RFC 9112 3.2.2)
    }
)
# Body framing must reach the origin unchanged, whatever the Connection header lists.
_KEEP = frozenset({b"content-length", b"transfer-encoding"})

_HOST_RE = re.compile(rb"[A-Za-z0-9._-]{1,253}")
_PORT_RE = re.compile(rb"[0-9]{1,5}")


class BadBody(ValueError):
    """A request body that breaks its own framing, or ends before it is complete."""


class BadTarget(ValueError):
    """A request target that names no destination the proxy can dial."""


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def response(status: int, body: str = "", headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A complete error response; the connection closes after it."""
    text = (body + "\n").encode() if body else b""
    lines = [f"HTTP/1.1 {status} {REASONS.get(status) or _phrase(status)}"]
    lines += [f"{k}: {v}" for k, v in headers]
    lines += [
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(text)}",
        "Connection: close",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + text


class RequestRejected(Exception):
    """The request cannot be served. `reply` is the whole response to send before closing;
    `reason` the bad-input label to count, or None when the client did nothing wrong (a
    first request without credentials is the normal start of the auth exchange)."""

    def __init__(
        self,
        status: int,
        words: str,
        reason: str | None,
        *,
        headers: tuple[tuple[str, str], ...] = (),
        detail: str = "",
    ) -> None:
        super().__init__(detail or words)
        self.status = status
        self.reason = reason
        self.reply = response(status, f"ramp: {words}" if words else "", headers)


@dataclass(frozen=True, slots=True)
class ProxyRequest:
    """What a valid proxy request asks for."""

    host: str  # a hostname, or an IP literal without brackets
    port: int
    connect: bool  # CONNECT (reply `ok_reply`, then relay) or an absolute-form request
    ok_reply: bytes  # empty for absolute-form: the origin's own response is the answer
    initial: bytes  # bytes for the origin before anything else the client sends


class RequestReader:
    """Reads one request head with h11, bounded to `max_head` bytes."""

    def __init__(self, max_head: int = MAX_HEAD) -> None:
        self.max_head = max_head
        self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head)
        self.received = 0

    def receive_data(self, data: bytes) -> None:
        """Bytes from the client; b"" when it closed its side."""
        self._conn.receive_data(data)
        self.received += len(data)

    @property
    def trailing(self) -> bytes:
        """Bytes received after the head (a CONNECT client may send early data)."""
        return bytes(self._conn.trailing_data[0])

    def next_request(self) -> h11.Request | None:
        """The request head once complete, None while more bytes are needed; a head that
        is malformed or too large raises RequestRejected."""
        try:
            ev = self._conn.next_event()
        except h11.RemoteProtocolError as e:
            status = e.error_status_hint
            if status == 431:
                raise RequestRejected(
                    431, "request head too large", "header_too_large", detail=str(e)
                ) from None
            raise RequestRejected(
                status, "malformed HTTP request", "bad_request", detail=str(e)
            ) from None
        if ev is h11.NEED_DATA:
            return None
        if not isinstance(ev, h11.Request):
            # only a closed connection gets here (h11 yields ConnectionClosed)
            raise RequestRejected(400, "", "bad_request", detail=f"unexpected {ev!r}")
        # h11 bounds only an incomplete head; one that arrived whole may still be too big.
        if self.received - len(self._conn.trailing_data[0]) > self.max_head:
            raise RequestRejected(431, "request head too large", "header_too_large")
        return ev


def _parse_host_port(host: bytes, port: bytes | None, default_port: int | None) -> tuple[str, int]:
    if host.startswith(b"[") and host.endswith(b"]"):
        try:
            ip = ipaddress.IPv6Address(host[1:-1].decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise BadTarget(f"bad IPv6 address {host!r}") from None
        if ip.scope_id:
            raise BadTarget("IPv6 zone ids are not allowed")
        name = str(ip)
    elif _HOST_RE.fullmatch(host):
        name = host.decode("ascii")
    else:
        raise BadTarget(f"bad host {host!r}")
    if port is None or port == b"":
        if default_port is None:
            raise BadTarget("missing port")
        return name, default_port
    if not _PORT_RE.fullmatch(port) or not 1 <= int(port) <= 65535:
        raise BadTarget(f"bad port {port!r}")
    return name, int(port)


def _split_authority(authority: bytes) -> tuple[bytes, bytes | None]:
    if authority.startswith(b"["):
        end = authority.find(b"]")
        if end < 0:
            raise BadTarget("missing ']'")
        rest = authority[end + 1 :]
        if rest and not rest.startswith(b":"):
            raise BadTarget(f"bad authority {authority!r}")
        return authority[: end + 1], (rest[1:] if rest else None)
    host, sep, port = authority.partition(b":")
    return host, (port if sep else None)


def parse_authority(target: bytes) -> tuple[str, int]:
    """CONNECT's `host:port` (IPv6 in brackets); the port is required."""
    host, port = _split_authority(target)
    if port is None:
        raise BadTarget("CONNECT target needs a port")
    return _parse_host_port(host, port, None)


def parse_absolute_url(target: bytes) -> tuple[tuple[str, int], bytes, bytes]:
    """`http://authority/path?q` -> ((host, port), authority, origin-form target)."""
    scheme, sep, rest = target.partition(b"://")
    if not sep or scheme.lower() != b"http":
        raise BadTarget(f"unsupported URL scheme {scheme!r}")
    cut = min((i for i in (rest.find(c) for c in (b"/", b"?", b"#")) if i >= 0), default=len(rest))
    authority, path = rest[:cut], rest[cut:]
    if b"@" in authority:
        raise BadTarget("user info in proxy URL")
    path = path.partition(b"#")[0]
    if not path.startswith(b"/"):
        path = b"/" + path
    host, port = _split_authority(authority)
    return _parse_host_port(host, port, 80), authority, path


def basic_credentials(value: bytes) -> tuple[bytes, bytes] | None:
    """(user, password) from a `Basic` Proxy-Authorization value; None for anything else."""
    scheme, _, token = value.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, sep, password = decoded.partition(b":")
    return (user, password) if sep else None


def proxy_authorization(request: h11.Request) -> bytes | None:
    """The first Proxy-Authorization header's value, None when there is none."""
    for name, value in request.headers:
        if name == b"proxy-authorization":
            return bytes(value)
    return None


def auth_challenge(value: bytes | None) -> RequestRejected:
    """The 407 for a request whose Proxy-Authorization (`value`) did not authenticate."""
    return RequestRejected(
        407,
        "proxy authentication required",
        # A first request without credentials is the normal challenge, not bad input.
        "auth_failed" if value is not None else None,
        # both schemes it takes: a user's password, or a client identity's bearer token
        headers=(
            ("Proxy-Authenticate", f'Basic realm="{REALM}"'),
            ("Proxy-Authenticate", f'Bearer realm="{REALM}"'),
        ),
    )


def rewrite_head(request: h11.Request, authority: bytes, origin_form: bytes) -> bytes:
    """The request head for the origin: origin-form, no hop-by-hop headers, Connection: close."""
    listed: set[bytes] = set()
    for name, value in request.headers:
        if name == b"connection":
            listed.update(t.strip().lower() for t in value.split(b","))
    drop = (_HOP_BY_HOP | listed) - _KEEP
    out = [
        request.method + b" " + origin_form + b" HTTP/" + request.http_version,
        b"Host: " + authority,
    ]
    out += [n + b": " + v for n, v in request.headers.raw_items() if n.lower() not in drop]
    out.append(b"Connection: close")
    return b"\r\n".join(out) + b"\r\n\r\n"


def interpret(request: h11.Request, trailing: bytes = b"") -> ProxyRequest:
    """What `request` asks the proxy for; RequestRejected when it asks for nothing servable."""
    target = bytes(request.target)
    if request.method == b"CONNECT":
        try:
            host, port = parse_authority(target)
        except BadTarget as e:
            raise RequestRejected(400, str(e), "bad_target") from None
        if any(n in (b"content-length", b"transfer-encoding") for n, _ in request.headers):
            raise RequestRejected(400, "CONNECT has no body", "connect_with_body")
        return ProxyRequest(host, port, True, CONNECT_OK, trailing)
    if target.startswith((b"/", b"*")):
        raise RequestRejected(
            400,
            "this is a proxy; use CONNECT host:port or an absolute http:// URL",
            "not_a_proxy_request",
        )
    names = {n for n, _ in request.headers}
    if b"content-length" in names and b"transfer-encoding" in names:
        raise RequestRejected(
            400, "request has both Content-Length and Transfer-Encoding", "cl_and_te"
        )
    try:
        (host, port), authority, origin_form = parse_absolute_url(target)
    except BadTarget as e:
        raise RequestRejected(400, str(e), "bad_target") from None
    initial = rewrite_head(request, authority, origin_form) + trailing
    return ProxyRequest(host, port, False, b"", initial)


class RequestBody:
    """The body of the request `reader` just read, framed again for the origin.

    h11 decodes the body's framing (Content-Length, or chunked, its only transfer coding);
    chunks are encoded again because the head still says `Transfer-Encoding: chunked`.
    `receive_data` takes client bytes and returns what to forward; once `complete`, the
    caller forwards nothing more from this client (and must not feed it here: h11 would
    buffer a pipelined request without bound).
    """

    def __init__(self, reader: RequestReader, request: h11.Request) -> None:
        self._conn = reader._conn
        self._chunked = any(n == b"transfer-encoding" for n, _ in request.headers)
        self.complete = False

    def receive_data(self, data: bytes) -> bytes:
        """Client bytes (b"" = it closed) -> body bytes for the origin; BadBody if broken."""
        self._conn.receive_data(data)
        return self.take()

    def take(self) -> bytes:
        """Body bytes already received (with the head, or since the last call)."""
        out: list[bytes] = []
        while not self.complete:
            try:
                ev = self._conn.next_event()
            except h11.RemoteProtocolError as e:
                raise BadBody(str(e)) from None
            if ev is h11.NEED_DATA:
                break
            if isinstance(ev, h11.Data):
                if not ev.data:
                    continue  # an empty chunk here would read as the last chunk
                if self._chunked:
                    out += [b"%x\r\n" % len(ev.data), bytes(ev.data), b"\r\n"]
                else:
                    out.append(bytes(ev.data))
            elif isinstance(ev, h11.EndOfMessage):
                self.complete = True
                if self._chunked:
                    out.append(b"0\r\n")
                    out += [
                        n + b": " + v + b"\r\n"
                        for n, v in ev.headers.raw_items()
                        if n.lower() != b"proxy-authorization"
                    ]
                    out.append(b"\r\n")
            else:
                raise BadBody(f"unexpected {ev!r}")
        return b"".join(out)
