"""MASQUE framing, sans-I/O: capsules and HTTP Datagrams (RFC 9297), connect-udp payloads and
its URI template (RFC 9298), connect-ip's URI template and request (RFC 9484).

A connect-udp request carries UDP payloads two ways. In a QUIC DATAGRAM frame the HTTP Datagram
is `Quarter Stream ID (i), Context ID (i), payload`; where datagrams cannot be used (the peer
did not negotiate them, or the payload is too big for the path) the same `Context ID, payload`
travels on the request stream in a DATAGRAM capsule. Context id 0 is UDP; other ids belong to
extensions this endpoint does not speak, and are skipped (and counted) by the caller.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import unquote

from ramp.wire.http import BadTarget, parse_authority
from ramp.wire.varint import MAX_VARINT, decode_varint, encode_varint

CAPSULE_DATAGRAM = 0x00  # RFC 9297 section 3.5
CONTEXT_UDP = 0  # RFC 9298 section 4: the UDP payload context
MAX_CAPSULE = 65536 + 64  # a UDP payload of up to 65,527 bytes and its headers, with room
DEFAULT_UDP_TEMPLATE = "/.well-known/masque/udp/{target_host}/{target_port}/"
DEFAULT_IP_TEMPLATE = "/.well-known/masque/ip/{target}/{ipproto}/"  # RFC 9484 section 3
CONTEXT_IP = 0  # RFC 9484 section 6: context id 0 carries whole IP packets


class MasqueError(ValueError):
    """Malformed MASQUE framing: the request stream is to be aborted (H3_DATAGRAM_ERROR)."""


@dataclass(frozen=True, slots=True)
class Capsule:
    type: int
    value: bytes


def encode_capsule(capsule_type: int, value: bytes) -> bytes:
    return encode_varint(capsule_type) + encode_varint(len(value)) + value


class CapsuleDecoder:
    """Capsules out of a request stream's bytes, fed as they arrive. A capsule longer than
    `limit` is an error before its value is buffered: a peer cannot make us hold it."""

    def __init__(self, limit: int = MAX_CAPSULE) -> None:
        self.limit = limit
        self._buf = bytearray()

    @property
    def pending(self) -> int:
        """Bytes of an unfinished capsule held."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Capsule]:
        self._buf += data
        out: list[Capsule] = []
        pos = 0
        buf = self._buf
        while True:
            head = decode_varint(buf, pos)
            if head is None:
                break
            ctype, at = head
            length = decode_varint(buf, at)
            if length is None:
                break
            size, at = length
            if size > self.limit:
                raise MasqueError(f"capsule of {size} bytes (limit {self.limit})")
            if at + size > len(buf):
                break
            out.append(Capsule(ctype, bytes(buf[at : at + size])))
            pos = at + size
        del buf[:pos]
        return out

    def end(self) -> None:
        """The stream ended: a capsule cut short is an error (RFC 9297 section 3.3)."""
        if self._buf:
            raise MasqueError(f"stream ended inside a capsule ({len(self._buf)} bytes)")


def encode_context(context_id: int, payload: bytes) -> bytes:
    """An HTTP Datagram payload of connect-udp: `Context ID (i), payload`."""
    return encode_varint(context_id) + payload


def decode_context(data: bytes) -> tuple[int, bytes]:
    got = decode_varint(data)
    if got is None:
        raise MasqueError("empty HTTP Datagram: no context id")
    context_id, at = got
    return context_id, data[at:]


def encode_quic_datagram(stream_id: int, context_id: int, payload: bytes) -> bytes:
    """The body of a QUIC DATAGRAM frame for request stream `stream_id` (a client-initiated
    bidirectional stream: its id is a multiple of 4)."""
    return encode_varint(stream_id // 4) + encode_context(context_id, payload)


def decode_quic_datagram(data: bytes) -> tuple[int, int, bytes]:
    """(request stream id, context id, payload) of a QUIC DATAGRAM frame's body."""
    got = decode_varint(data)
    if got is None:
        raise MasqueError("empty QUIC DATAGRAM: no quarter stream id")
    quarter, at = got
    if quarter > MAX_VARINT // 4:
        raise MasqueError(f"quarter stream id {quarter} out of range")
    context_id, payload = decode_context(data[at:])
    return quarter * 4, context_id, payload


@dataclass(frozen=True, slots=True)
class UdpTarget:
    host: str  # a name, or an IP address without brackets
    port: int


class UdpTemplate:
    """The server side of a connect-udp URI template (RFC 9298 section 2): a path with the
    variables `{target_host}` and `{target_port}`, each a whole path segment."""

    def __init__(self, template: str = DEFAULT_UDP_TEMPLATE) -> None:
        path = template.split("?", 1)[0]
        if "://" in path:  # a full URI: only its path is matched
            path = "/" + path.split("://", 1)[1].partition("/")[2]
        self.path = path
        self.segments = path.split("/")
        for var in ("{target_host}", "{target_port}"):
            if self.segments.count(var) != 1:
                raise ValueError(f"URI template {template!r} needs {var} once, as a path segment")
        self.template = template

    def match(self, path: str) -> UdpTarget | None:
        """The target named by a request's `:path`, or None when the path is not this
        template's (MasqueError when it is, with a bad host or port)."""
        parts = path.split("?", 1)[0].split("/")
        if len(parts) != len(self.segments):
            return None
        host = port = None
        for seg, got in zip(self.segments, parts, strict=True):
            if seg == "{target_host}":
                host = unquote(got)
            elif seg == "{target_port}":
                port = got
            elif seg != got:
                return None
        assert host is not None and port is not None
        # isascii: str.isdigit() also takes digits int() refuses ("²")
        if not (port.isascii() and port.isdigit()) or not 0 < int(port) <= 65535:
            raise MasqueError(f"bad target port {port[:16]!r}")
        if not host:
            raise MasqueError("empty target host")
        if ":" in host:  # RFC 9298: an IPv6 literal, percent-encoded colons, no brackets
            try:
                host = str(ipaddress.IPv6Address(host))
            except ValueError:
                raise MasqueError(f"bad IPv6 target {host[:64]!r}") from None
        return UdpTarget(host, int(port))

    def expand(self, host: str, port: int) -> str:
        """The request `:path` a client sends for (host, port)."""
        return self.path.replace("{target_host}", host.replace(":", "%3A")).replace(
            "{target_port}", str(port)
        )


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class IpScope:
    """What a connect-ip request asks to reach (RFC 9484 section 4.6): `target` None for any
    address ("*"), else a prefix (an address is its /32 or /128); `ipproto` None for any
    protocol ("*"), else the one IP protocol number."""

    target: IPNetwork | None
    ipproto: int | None


def _template_path(template: str) -> str:
    path = template.split("?", 1)[0]
    if "://" in path:  # a full URI: only its path is matched
        path = "/" + path.split("://", 1)[1].partition("/")[2]
    return path


class IpTemplate:
    """The server side of a connect-ip URI template (RFC 9484 section 3): a path with the
    variables `{target}` and `{ipproto}`, each a whole path segment. The default has the
    client ask for any address and protocol (`/.well-known/masque/ip/*/*/`)."""

    def __init__(self, template: str = DEFAULT_IP_TEMPLATE) -> None:
        self.path = _template_path(template)
        self.segments = self.path.split("/")
        for var in ("{target}", "{ipproto}"):
            if self.segments.count(var) != 1:
                raise ValueError(f"URI template {template!r} needs {var} once, as a path segment")
        self.template = template

    def match(self, path: str) -> IpScope | None:
        """The scope a request's `:path` names, or None when the path is not this template's
        (MasqueError when it is, with a bad target or protocol)."""
        parts = path.split("?", 1)[0].split("/")
        if len(parts) != len(self.segments):
            return None
        target = proto = None
        for seg, got in zip(self.segments, parts, strict=True):
            if seg == "{target}":
                target = unquote(got)
            elif seg == "{ipproto}":
                proto = unquote(got)
            elif seg != got:
                return None
        assert target is not None and proto is not None
        if proto == "*":
            ipproto = None
        elif proto.isascii() and proto.isdigit() and len(proto) <= 3 and int(proto) <= 255:
            ipproto = int(proto)
        else:
            raise MasqueError(f"bad ipproto {proto[:16]!r}")
        if target == "*":
            return IpScope(None, ipproto)
        try:
            net = ipaddress.ip_network(target, strict=True)
        except ValueError:
            # RFC 9484 allows a DNS name here; this proxy routes by address only
            raise MasqueError(f"bad target {target[:64]!r}: not an IP address or prefix") from None
        return IpScope(net, ipproto)

    def expand(self, target: str = "*", ipproto: str | int = "*") -> str:
        """The request `:path` a client sends (a prefix's "/" and an address's ":" encoded)."""
        t = target.replace(":", "%3A").replace("/", "%2F")
        return self.path.replace("{target}", t).replace("{ipproto}", str(ipproto))


# -- requests ----------------------------------------------------------------------------------


class RequestRefused(ValueError):
    """A request the proxy answers itself: `status`, and an RFC 9209 error type."""

    def __init__(self, status: int, error: str, words: str, *, bad_input: str | None = None):
        super().__init__(words)
        self.status = status
        self.error = error
        self.words = words
        self.bad_input = bad_input  # the counter's reason when the request was malformed


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """CONNECT (RFC 9114 section 4.4): a TCP stream to host:port."""

    host: str
    port: int
    authorization: bytes | None


@dataclass(frozen=True, slots=True)
class UdpRequest:
    """Extended CONNECT with `:protocol = connect-udp` (RFC 9298)."""

    host: str
    port: int
    authorization: bytes | None
    authority: str
    path: str


@dataclass(frozen=True, slots=True)
class IpRequest:
    """Extended CONNECT with `:protocol = connect-ip` (RFC 9484)."""

    scope: IpScope
    authorization: bytes | None
    authority: str
    path: str


def parse_request(
    headers: list[tuple[bytes, bytes]],
    template: UdpTemplate,
    ip_template: IpTemplate | None = None,
) -> ConnectRequest | UdpRequest | IpRequest:
    """What a proxy request on an HTTP/3 stream asks for, or RequestRefused. connect-ip is
    served only with an `ip_template`."""
    pseudo: dict[bytes, bytes] = {}
    authorization = None
    for name, value in headers:
        if name.startswith(b":"):
            pseudo[name] = value
        elif name == b"proxy-authorization" and authorization is None:
            authorization = value
    method = pseudo.get(b":method")
    if method != b"CONNECT":
        raise RequestRefused(405, "http_request_denied", "this proxy only serves CONNECT")
    protocol = pseudo.get(b":protocol")
    authority = pseudo.get(b":authority", b"")
    if protocol is None:
        if b":scheme" in pseudo or b":path" in pseudo:
            raise RequestRefused(
                400, "http_request_error", "CONNECT has no :scheme or :path", bad_input="malformed"
            )
        try:
            host, port = parse_authority(authority)
        except BadTarget as e:
            raise RequestRefused(
                400, "destination_not_found", f"bad CONNECT target: {e}", bad_input="bad_target"
            ) from None
        return ConnectRequest(host, port, authorization)
    if protocol == b"connect-ip" and ip_template is not None:
        return _parse_ip_request(pseudo, authorization, ip_template)
    if protocol != b"connect-udp":
        raise RequestRefused(501, "http_request_denied", f"unsupported :protocol {protocol[:32]!r}")
    target, authority_text, path_text = _match_template(pseudo, "connect-udp", template.match)
    return UdpRequest(target.host, target.port, authorization, authority_text, path_text)


def _parse_ip_request(
    pseudo: dict[bytes, bytes], authorization: bytes | None, template: IpTemplate
) -> IpRequest:
    scope, authority_text, path_text = _match_template(pseudo, "connect-ip", template.match)
    return IpRequest(scope, authorization, authority_text, path_text)


_T = TypeVar("_T")


def _match_template(
    pseudo: dict[bytes, bytes], protocol: str, match: Callable[[str], _T | None]
) -> tuple[_T, str, str]:
    """What an extended CONNECT's :path names by the template of `protocol`, with its
    :authority and :path; RequestRefused when the request or the path does not fit."""
    path = pseudo.get(b":path", b"")
    authority = pseudo.get(b":authority", b"")
    if pseudo.get(b":scheme") != b"https" or not path or not authority:
        raise RequestRefused(
            400,
            "http_request_error",
            f"{protocol} needs :scheme https, :authority and :path",
            bad_input="malformed",
        )
    try:
        text = path.decode("ascii")
        found = match(text)
    except UnicodeDecodeError:
        found = None
    except MasqueError as e:
        raise RequestRefused(400, "destination_not_found", str(e), bad_input="bad_target") from None
    if found is None:
        raise RequestRefused(404, "http_request_denied", f"no {protocol} template at this path")
    return found, authority.decode("latin-1"), text
