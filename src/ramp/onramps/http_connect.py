"""The HTTP/1.1 proxy on-ramp: CONNECT tunnels, and absolute-form requests (`GET http://...`).

`curl -x http://E:8080 http://10.1.2.3/` sends an absolute-form GET, not CONNECT (unless
`--proxytunnel`), so both are served. An absolute-form request is forwarded as one request per
client connection: its head is rewritten to origin-form with `Connection: close` and handed to
the relay as the first bytes for the origin; the relay then carries the rest of the body and
the origin's whole response unparsed.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
import re
import socket

import h11

from ramp.flows.answers import ProxyRequest, Reply
from ramp.flows.flow import Destination, FlowResult
from ramp.onramps.registry import OnRampContext, OnRampOptions, register
from ramp.onramps.tcp_listener import FlowPlan, TcpOnRamp, check_user

log = logging.getLogger(__name__)

MAX_HEAD = 16384  # request line + headers
REALM = "ramp"

_REASONS = {
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

# (status, words for the body, RFC 9209 Proxy-Status error type)
_FAILURES: dict[FlowResult, tuple[int, str, str]] = {
    FlowResult.NOT_PERMITTED: (403, "not permitted by policy", "http_request_denied"),
    FlowResult.NET_UNREACHABLE: (502, "network unreachable", "destination_ip_unroutable"),
    FlowResult.HOST_UNREACHABLE: (502, "host unreachable", "destination_unavailable"),
    FlowResult.REFUSED: (502, "connection refused", "connection_refused"),
    FlowResult.TIMEOUT: (504, "connection timed out", "connection_timeout"),
    FlowResult.ERROR: (502, "proxy error", "proxy_internal_error"),
    FlowResult.RESET: (502, "connection reset", "connection_terminated"),
}

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


class BadTarget(ValueError):
    pass


def response(status: int, body: str = "", headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A complete error response; the connection closes after it."""
    text = (body + "\n").encode() if body else b""
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}"]
    lines += [f"{k}: {v}" for k, v in headers]
    lines += [
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(text)}",
        "Connection: close",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + text


CONNECT_OK = b"HTTP/1.1 200 Connection Established\r\n\r\n"


def failure_response(result: FlowResult, dest: Destination) -> bytes:
    status, words, error = _FAILURES.get(result, _FAILURES[FlowResult.ERROR])
    return response(status, f"ramp: {dest}: {words}", (("Proxy-Status", f"ramp; error={error}"),))


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


def parse_authority(target: bytes) -> Destination:
    """CONNECT's `host:port` (IPv6 in brackets); the port is required."""
    host, port = _split_authority(target)
    if port is None:
        raise BadTarget("CONNECT target needs a port")
    return Destination(*_parse_host_port(host, port, None))


def parse_absolute_url(target: bytes) -> tuple[Destination, bytes, bytes]:
    """`http://authority/path?q` -> (destination, authority, origin-form target)."""
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
    return Destination(*_parse_host_port(host, port, 80)), authority, path


def basic_credentials(value: bytes) -> tuple[bytes, bytes] | None:
    scheme, _, token = value.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, sep, password = decoded.partition(b":")
    return (user, password) if sep else None


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


class HttpConnectServer(TcpOnRamp):
    """HTTP proxy listener: `HttpConnectServer(config, opener)`, `await start(host, port)`,
    `port`, `await close()`."""

    onramp = "http"

    def _timeout_reply(self) -> bytes:
        return response(408, "ramp: request not received in time")

    async def _reject(
        self,
        sock: socket.socket,
        peer: tuple[str, int],
        reason: str | None,
        data: bytes,
    ) -> None:
        if reason is not None:
            self.opener.bad_input(self.onramp, reason, peer)
        await self.send_final(sock, data)
        return None

    async def _handshake(self, sock: socket.socket, peer: tuple[str, int]) -> FlowPlan | None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        got = 0
        while True:
            try:
                ev = conn.next_event()
            except h11.RemoteProtocolError as e:
                status = e.error_status_hint
                reason = "header_too_large" if status == 431 else "bad_request"
                log.debug("http %s: %s", peer, e)
                words = "request head too large" if status == 431 else "malformed HTTP request"
                return await self._reject(sock, peer, reason, response(status, f"ramp: {words}"))
            if ev is h11.NEED_DATA:
                data = await self.recv(sock, got > 0)
                conn.receive_data(data)
                got += len(data)
            elif isinstance(ev, h11.Request):
                break
            else:  # only reachable after EOF, which recv() turns into HandshakeEOF
                return await self._reject(sock, peer, "bad_request", response(400))
        # h11 bounds only an incomplete head; one that arrived whole may still be too big.
        if got - len(conn.trailing_data[0]) > MAX_HEAD:
            return await self._reject(
                sock, peer, "header_too_large", response(431, "ramp: request head too large")
            )

        identity: str | None = None
        users = self.config.users
        if users:
            value: bytes | None = None
            for name, v in ev.headers:
                if name == b"proxy-authorization":
                    value = v
                    break
            creds = basic_credentials(value) if value is not None else None
            user = check_user(users, *creds) if creds else None
            if user is None:
                challenge = response(
                    407,
                    "ramp: proxy authentication required",
                    (("Proxy-Authenticate", f'Basic realm="{REALM}"'),),
                )
                # A first request without credentials is the normal challenge, not bad input.
                reason = "auth_failed" if value is not None else None
                return await self._reject(sock, peer, reason, challenge)
            identity = user

        initial = conn.trailing_data[0]
        target = ev.target
        if ev.method == b"CONNECT":
            try:
                dest = parse_authority(target)
            except BadTarget as e:
                return await self._reject(sock, peer, "bad_target", response(400, f"ramp: {e}"))
            if any(n in (b"content-length", b"transfer-encoding") for n, _ in ev.headers):
                return await self._reject(
                    sock, peer, "connect_with_body", response(400, "ramp: CONNECT has no body")
                )
            ok = CONNECT_OK
        elif target.startswith((b"/", b"*")):
            return await self._reject(
                sock,
                peer,
                "not_a_proxy_request",
                response(
                    400,
                    "ramp: this is a proxy; use CONNECT host:port or an absolute http:// URL",
                ),
            )
        else:
            try:
                dest, authority, origin_form = parse_absolute_url(target)
            except BadTarget as e:
                return await self._reject(sock, peer, "bad_target", response(400, f"ramp: {e}"))
            initial = rewrite_head(ev, authority, origin_form) + initial
            ok = b""  # the origin's own response is the answer
        return FlowPlan(
            destination=dest,
            identity=identity,
            ok_reply=ok,
            error_reply=lambda result: failure_response(result, dest),
            busy_reply=response(503, "ramp: too many flows"),
            initial=initial,
            request=ProxyRequest(
                ev.method.decode("ascii", "replace"),
                target.decode("ascii", "replace"),
                tuple(
                    (n.decode("latin-1"), v.decode("latin-1"))
                    for n, v in ev.headers.raw_items()
                    if n.lower() != b"proxy-authorization"
                ),
            ),
            answer=hook_reply,
        )


def hook_reply(reply: Reply) -> bytes:
    """A `connect_request` hook's own answer, as a complete response."""
    return response(reply.status, reply.body, reply.headers)


def _build(ctx: OnRampContext, options: OnRampOptions) -> HttpConnectServer:
    return HttpConnectServer(ctx.config, ctx.opener, options)


register("http", OnRampOptions, _build, "HTTP/1.1 proxy: CONNECT and absolute-form requests")
