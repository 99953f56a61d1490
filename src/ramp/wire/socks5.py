"""SOCKS5 (RFC 1928) with username/password authentication (RFC 1929), sans-I/O.

The server side is a small state machine: feed it bytes with `receive_data`, pull events with
`next_event` (a `Greeting`, an `AuthRequest`, a `Request`, or `NEED_DATA`), and write the bytes the
builders return. Anything malformed raises `Socks5Error`, whose `reason` is a short token for
logs and counters and whose `reply` is what the client should be told before the close (possibly
nothing). The client-side helpers at the bottom exist for tests and benchmarks.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass
from typing import Final

VERSION: Final = 0x05
AUTH_VERSION: Final = 0x01  # RFC 1929 subnegotiation version


class Method(enum.IntEnum):
    NO_AUTH = 0x00
    GSSAPI = 0x01
    USERNAME_PASSWORD = 0x02
    NO_ACCEPTABLE = 0xFF


class Command(enum.IntEnum):
    CONNECT = 0x01
    BIND = 0x02
    UDP_ASSOCIATE = 0x03


class AddressType(enum.IntEnum):
    IPV4 = 0x01
    DOMAIN = 0x03
    IPV6 = 0x04


class Rep(enum.IntEnum):
    SUCCEEDED = 0x00
    GENERAL_FAILURE = 0x01
    NOT_ALLOWED = 0x02
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08


class Socks5Error(Exception):
    """The peer sent something this codec will not accept.

    `reason` is a stable token (for counters); `reply` holds the bytes to send before closing,
    empty when the protocol has no way to say it (e.g. the peer does not speak SOCKS5 at all).
    """

    def __init__(self, reason: str, reply: bytes = b"", detail: str = "") -> None:
        super().__init__(detail or reason)
        self.reason = reason
        self.reply = reply


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()


@dataclass(frozen=True, slots=True)
class Greeting:
    """The client's method offer; `method` is the one the server picked (send it back)."""

    methods: tuple[int, ...]
    method: Method


@dataclass(frozen=True, slots=True)
class AuthRequest:
    """RFC 1929 credentials, as raw bytes (the RFC does not name an encoding)."""

    username: bytes
    password: bytes


@dataclass(frozen=True, slots=True)
class Request:
    command: Command
    address_type: AddressType
    host: str  # dotted IPv4, compressed IPv6, or a domain name
    port: int


@dataclass(frozen=True, slots=True)
class Reply:
    rep: int
    host: str
    port: int


Event = Greeting | AuthRequest | Request | _NeedData


class Phase(enum.Enum):
    GREETING = "greeting"
    AUTH = "auth"
    AUTH_PENDING = "auth_pending"  # credentials parsed; waiting for `auth_reply`
    REQUEST = "request"
    DONE = "done"
    FAILED = "failed"


def _fail_reply(rep: Rep) -> bytes:
    return build_reply(rep)


_AUTH_FAILURE: Final = bytes([AUTH_VERSION, 0x01])
_NO_METHOD: Final = bytes([VERSION, Method.NO_ACCEPTABLE])


class ServerHandshake:
    """Server side of one SOCKS5 handshake: greeting, optional auth, one request."""

    def __init__(self, *, require_auth: bool) -> None:
        self.require_auth = require_auth
        self.phase = Phase.GREETING
        self._buf = bytearray()

    def receive_data(self, data: bytes) -> None:
        self._buf += data

    @property
    def trailing_data(self) -> bytes:
        """Bytes received past the request (a client's early payload); valid once DONE."""
        return bytes(self._buf)

    def next_event(self) -> Event:
        try:
            if self.phase is Phase.GREETING:
                return self._greeting()
            if self.phase is Phase.AUTH:
                return self._auth()
            if self.phase is Phase.REQUEST:
                return self._request()
        except Socks5Error:
            self.phase = Phase.FAILED
            raise
        raise RuntimeError(f"next_event() called in phase {self.phase.value}")

    def auth_reply(self, ok: bool) -> bytes:
        """Record the credential check; returns the status bytes to send."""
        if self.phase is not Phase.AUTH_PENDING:
            raise RuntimeError(f"auth_reply() called in phase {self.phase.value}")
        self.phase = Phase.REQUEST if ok else Phase.FAILED
        return bytes([AUTH_VERSION, 0x00 if ok else 0x01])

    def _greeting(self) -> Event:
        buf = self._buf
        if not buf:
            return NEED_DATA
        if buf[0] != VERSION:
            # Not SOCKS5 (SOCKS4, HTTP, TLS ...): there is no reply it would understand.
            raise Socks5Error("bad_version", b"", f"greeting version {buf[0]:#04x}")
        if len(buf) < 2:
            return NEED_DATA
        n = buf[1]
        if n == 0:
            raise Socks5Error("no_methods", _NO_METHOD)
        if len(buf) < 2 + n:
            return NEED_DATA
        methods = tuple(buf[2 : 2 + n])
        del buf[: 2 + n]
        wanted = Method.USERNAME_PASSWORD if self.require_auth else Method.NO_AUTH
        if wanted not in methods:
            raise Socks5Error(
                "no_acceptable_method", _NO_METHOD, f"offered {list(methods)}, need {wanted}"
            )
        self.phase = Phase.AUTH if self.require_auth else Phase.REQUEST
        return Greeting(methods, wanted)

    def _auth(self) -> Event:
        buf = self._buf
        if not buf:
            return NEED_DATA
        if buf[0] != AUTH_VERSION:
            raise Socks5Error("bad_auth_version", _AUTH_FAILURE, f"version {buf[0]:#04x}")
        if len(buf) < 2:
            return NEED_DATA
        ulen = buf[1]
        if ulen == 0:
            raise Socks5Error("empty_username", _AUTH_FAILURE)
        if len(buf) < 3 + ulen:
            return NEED_DATA
        plen = buf[2 + ulen]
        end = 3 + ulen + plen
        if len(buf) < end:
            return NEED_DATA
        # RFC 1929 says PLEN >= 1, but clients send an empty password as PLEN 0; the
        # credential check rejects it unless a user really has an empty password.
        ev = AuthRequest(bytes(buf[2 : 2 + ulen]), bytes(buf[3 + ulen : end]))
        del buf[:end]
        self.phase = Phase.AUTH_PENDING
        return ev

    def _request(self) -> Event:
        buf = self._buf
        if not buf:
            return NEED_DATA
        if buf[0] != VERSION:
            raise Socks5Error(
                "bad_version", _fail_reply(Rep.GENERAL_FAILURE), f"request version {buf[0]:#04x}"
            )
        if len(buf) < 4:
            return NEED_DATA
        cmd, rsv = buf[1], buf[2]
        if cmd not in _COMMANDS:
            raise Socks5Error(
                "bad_command", _fail_reply(Rep.COMMAND_NOT_SUPPORTED), f"command {cmd:#04x}"
            )
        if rsv != 0:
            raise Socks5Error("bad_reserved", _fail_reply(Rep.GENERAL_FAILURE))
        parsed = parse_address(buf, 3)
        if parsed is None:
            return NEED_DATA
        atyp, host, port, end = parsed
        del buf[:end]
        command = Command(cmd)
        if command is Command.CONNECT and port == 0:
            raise Socks5Error("bad_port", _fail_reply(Rep.GENERAL_FAILURE), "CONNECT to port 0")
        self.phase = Phase.DONE
        return Request(command, atyp, host, port)


_COMMANDS: Final = frozenset(int(c) for c in Command)


def _valid_domain_byte(b: int) -> bool:
    # Printable ASCII without space; IDNs arrive as punycode. Rejecting the rest keeps control
    # characters and NULs out of logs, resolvers and policy matching.
    return 0x21 <= b <= 0x7E


def parse_address(buf: bytes | bytearray, offset: int) -> tuple[AddressType, str, int, int] | None:
    """Parse ATYP, ADDR, PORT at `offset`: (type, host, port, end offset), or None if short."""
    if len(buf) <= offset:
        return None
    atyp = buf[offset]
    start = offset + 1
    if atyp == AddressType.IPV4:
        end = start + 4
        if len(buf) < end + 2:
            return None
        host = str(ipaddress.IPv4Address(bytes(buf[start:end])))
        kind = AddressType.IPV4
    elif atyp == AddressType.IPV6:
        end = start + 16
        if len(buf) < end + 2:
            return None
        host = str(ipaddress.IPv6Address(bytes(buf[start:end])))
        kind = AddressType.IPV6
    elif atyp == AddressType.DOMAIN:
        if len(buf) <= start:
            return None
        n = buf[start]
        if n == 0:
            raise Socks5Error("empty_domain", _fail_reply(Rep.GENERAL_FAILURE))
        end = start + 1 + n
        if len(buf) < end + 2:
            return None
        raw = bytes(buf[start + 1 : end])
        if not all(_valid_domain_byte(b) for b in raw):
            raise Socks5Error("bad_domain", _fail_reply(Rep.GENERAL_FAILURE), repr(raw))
        host = raw.decode("ascii")
        kind = AddressType.DOMAIN
    else:
        raise Socks5Error(
            "bad_address_type",
            _fail_reply(Rep.ADDRESS_TYPE_NOT_SUPPORTED),
            f"address type {atyp:#04x}",
        )
    (port,) = struct.unpack_from("!H", buf, end)
    return kind, host, port, end + 2


def encode_address(host: str, port: int, address_type: AddressType | None = None) -> bytes:
    """ATYP + ADDR + PORT for an IP literal or a domain name.

    `address_type` forces the encoding: DOMAIN keeps a name that happens to look like an IP
    literal a name (answers must repeat an address exactly as the client wrote it).
    """
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port out of range: {port}")
    if address_type is not AddressType.DOMAIN:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            if address_type is not None:
                raise ValueError(f"not an IP address: {host!r}") from None
        else:
            atyp = AddressType.IPV4 if ip.version == 4 else AddressType.IPV6
            if address_type is not None and address_type is not atyp:
                raise ValueError(f"{host!r} is not of address type {address_type.name}")
            return bytes([atyp]) + ip.packed + struct.pack("!H", port)
    raw = host.encode("ascii")  # UnicodeEncodeError is a ValueError
    if not 1 <= len(raw) <= 255 or not all(_valid_domain_byte(b) for b in raw):
        raise ValueError(f"not a SOCKS5 domain name: {host!r}")
    return bytes([AddressType.DOMAIN, len(raw)]) + raw + struct.pack("!H", port)


# -- server-side builders ---------------------------------------------------------------------


def build_method_selection(method: int) -> bytes:
    return bytes([VERSION, method])


def build_auth_status(ok: bool) -> bytes:
    return bytes([AUTH_VERSION, 0x00 if ok else 0x01])


def build_reply(rep: int, host: str = "0.0.0.0", port: int = 0) -> bytes:
    return bytes([VERSION, rep, 0x00]) + encode_address(host, port)


# -- client side (tests, benchmarks) ----------------------------------------------------------


def build_greeting(methods: tuple[int, ...] | list[int] = (Method.NO_AUTH,)) -> bytes:
    if not 1 <= len(methods) <= 255:
        raise ValueError("a greeting offers 1 to 255 methods")
    return bytes([VERSION, len(methods), *methods])


def build_auth_request(username: bytes, password: bytes) -> bytes:
    if not 1 <= len(username) <= 255 or len(password) > 255:
        raise ValueError("username must be 1-255 bytes, password at most 255")
    return bytes([AUTH_VERSION, len(username)]) + username + bytes([len(password)]) + password


def build_request(command: int, host: str, port: int) -> bytes:
    return bytes([VERSION, command, 0x00]) + encode_address(host, port)


def parse_method_selection(data: bytes) -> int:
    if len(data) != 2 or data[0] != VERSION:
        raise Socks5Error("bad_method_selection", b"", repr(data))
    return data[1]


def parse_auth_status(data: bytes) -> bool:
    if len(data) != 2 or data[0] != AUTH_VERSION:
        raise Socks5Error("bad_auth_status", b"", repr(data))
    return data[1] == 0x00


def parse_reply(data: bytes | bytearray) -> tuple[Reply, int] | None:
    """A server reply from the start of `data`: (reply, bytes used), or None if incomplete."""
    if not data:
        return None
    if data[0] != VERSION:
        raise Socks5Error("bad_version", b"", f"reply version {data[0]:#04x}")
    if len(data) < 4:
        return None
    if data[2] != 0:
        raise Socks5Error("bad_reserved")
    parsed = parse_address(data, 3)
    if parsed is None:
        return None
    _, host, port, end = parsed
    return Reply(data[1], host, port), end


# -- UDP relay datagrams (RFC 1928 section 7) -------------------------------------------------
#
#   +----+------+------+----------+----------+----------+
#   |RSV | FRAG | ATYP | DST.ADDR | DST.PORT |   DATA   |
#   +----+------+------+----------+----------+----------+
#   | 2  |  1   |  1   | Variable |    2     | Variable |
#
# The same header goes both ways: client -> relay names the destination, relay -> client names
# the origin the reply came from.


@dataclass(frozen=True, slots=True)
class UdpDatagram:
    frag: int  # 0 = a whole datagram; anything else is a fragment (the relay drops those)
    address_type: AddressType
    host: str
    port: int
    data: bytes


def parse_udp_datagram(packet: bytes | bytearray | memoryview) -> UdpDatagram:
    """Parse one relay datagram; raises `Socks5Error` (no reply: UDP has no error channel).

    Reasons: truncated_header, bad_reserved, bad_address_type, empty_domain, bad_domain,
    bad_port.
    """
    if len(packet) < 4:
        raise Socks5Error("truncated_header", b"", f"{len(packet)} bytes")
    if packet[0] != 0 or packet[1] != 0:
        raise Socks5Error("bad_reserved", b"", f"RSV {bytes(packet[:2]).hex()}")
    try:
        parsed = parse_address(packet, 3)
    except Socks5Error as e:
        raise Socks5Error(e.reason, b"", str(e)) from None
    if parsed is None:
        raise Socks5Error("truncated_header", b"", f"{len(packet)} bytes")
    atyp, host, port, end = parsed
    if port == 0:
        raise Socks5Error("bad_port", b"", "destination port 0")
    return UdpDatagram(packet[2], atyp, host, port, bytes(packet[end:]))


def build_udp_header(
    host: str, port: int, address_type: AddressType | None = None, frag: int = 0
) -> bytes:
    """The header to put in front of a payload (see `encode_address` for `address_type`)."""
    if not 0 <= frag <= 0xFF:
        raise ValueError(f"FRAG out of range: {frag}")
    return bytes([0, 0, frag]) + encode_address(host, port, address_type)


def build_udp_datagram(
    host: str,
    port: int,
    data: bytes,
    address_type: AddressType | None = None,
    frag: int = 0,
) -> bytes:
    return build_udp_header(host, port, address_type, frag) + data
