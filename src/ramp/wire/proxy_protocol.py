"""The PROXY protocol, versions 1 and 2 (HAProxy's proxy-protocol.txt): codec, sans-I/O.

A proxy in front of a server sends one header before the first payload byte, saying whom the
connection really came from. Version 1 is one line of text (at most 107 bytes):

    PROXY TCP4 203.0.113.7 192.0.2.1 56324 443\\r\\n
    PROXY UNKNOWN\\r\\n

Version 2 is binary: a 12-byte signature, version and command (LOCAL or PROXY), address
family and transport, a 16-bit length, the addresses, then type-length-value extensions.

`parse(buf)` looks at the start of a buffer that grows as bytes arrive and answers
`NEED_DATA` (every byte so far may still begin a header: the caller may consume all of them),
`(header, consumed)`, or raises `ProxyProtocolError` with a short `reason` for counters.
`encode_v1` / `encode_v2` (and `encode(header)`) build headers; `outbound(...)` builds the one
ramp sends to an origin.

ramp's own TLV types, in the range the specification keeps for custom use (0xE0-0xEF):
`PP2_TYPE_RAMP_IDENTITY` (0xE0, the authenticated user name, UTF-8) and `PP2_TYPE_RAMP_FLOW_ID`
(0xE1, the edge's flow id, ASCII decimal), so that an origin can log both as text.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass
from typing import Final

V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX: Final = b"PROXY "
V1_MAX: Final = 107  # the longest v1 line, CRLF included (section 2.1)
V2_HEADER: Final = 16  # signature, version/command, family/transport, length
# What a receiver takes after the 16 bytes by default: the addresses (at most 216 bytes, for
# UNIX) and a few TLVs. The format allows 65,535; nobody needs that much before a payload.
DEFAULT_MAX_V2_LENGTH: Final = 2048

PP2_TYPE_ALPN: Final = 0x01
PP2_TYPE_AUTHORITY: Final = 0x02
PP2_TYPE_CRC32C: Final = 0x03
PP2_TYPE_NOOP: Final = 0x04
PP2_TYPE_UNIQUE_ID: Final = 0x05
PP2_TYPE_SSL: Final = 0x20
PP2_TYPE_NETNS: Final = 0x30
PP2_TYPE_RAMP_IDENTITY: Final = 0xE0
PP2_TYPE_RAMP_FLOW_ID: Final = 0xE1
MAX_UNIQUE_ID: Final = 128  # section 2.2.5

_UNIX_ADDR = 108
_ADDRESS_LEN = {1: 12, 2: 36, 3: 2 * _UNIX_ADDR}  # by family: INET, INET6, UNIX


class ProxyProtocolError(ValueError):
    """Not a valid PROXY header; `reason` is a short label (counters), the text says more."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()


class Command(enum.IntEnum):
    LOCAL = 0x0  # the proxy's own connection (a health check): use the real addresses
    PROXY = 0x1


class Family(enum.IntEnum):
    UNSPEC = 0x0
    INET = 0x1
    INET6 = 0x2
    UNIX = 0x3


class Transport(enum.IntEnum):
    UNSPEC = 0x0
    STREAM = 0x1
    DGRAM = 0x2


Address = tuple[str, int]  # (IP literal, port); for UNIX (path, 0)


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    version: int  # 1 or 2
    command: Command = Command.PROXY
    family: Family = Family.UNSPEC
    transport: Transport = Transport.UNSPEC
    source: Address | None = None  # None: unknown (v1 UNKNOWN, v2 LOCAL or UNSPEC)
    destination: Address | None = None
    tlvs: tuple[tuple[int, bytes], ...] = ()

    @property
    def client(self) -> Address | None:
        """The address a receiver should take as the connection's source: None means keep
        the real peer address (LOCAL, UNKNOWN, UNSPEC, UNIX)."""
        if self.command is Command.LOCAL or self.family not in (Family.INET, Family.INET6):
            return None
        return self.source

    def tlv(self, kind: int) -> bytes | None:
        """The value of the first TLV of type `kind`, or None."""
        return next((v for t, v in self.tlvs if t == kind), None)

    @property
    def identity(self) -> str | None:
        raw = self.tlv(PP2_TYPE_RAMP_IDENTITY)
        return None if raw is None else raw.decode("utf-8", "replace")

    @property
    def flow_id(self) -> int | None:
        raw = self.tlv(PP2_TYPE_RAMP_FLOW_ID)
        return int(raw) if raw is not None and raw.isdigit() else None


# --- CRC32C (Castagnoli), for PP2_TYPE_CRC32C --------------------------------------------------


def _crc_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE: Final = _crc_table()


def crc32c(data: bytes | bytearray | memoryview) -> int:
    crc = 0xFFFFFFFF
    table = _CRC_TABLE
    for b in bytes(data):
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# --- parsing ---------------------------------------------------------------------------------


def signature_state(buf: bytes | bytearray) -> bool | None:
    """Whether `buf` starts with a PROXY signature: True, False, or None (too short to say)."""
    for sig in (V1_PREFIX, V2_SIGNATURE):
        n = min(len(buf), len(sig))
        if bytes(buf[:n]) == sig[:n]:
            return True if n == len(sig) else None
    return False


def parse(
    buf: bytes | bytearray | memoryview, *, max_v2_length: int = DEFAULT_MAX_V2_LENGTH
) -> tuple[ProxyHeader, int] | _NeedData:
    """One header from the start of `buf`: (header, bytes it took), or NEED_DATA.

    NEED_DATA promises that every byte of `buf` belongs to the header, so a reader may consume
    them all before waiting for more. Raises ProxyProtocolError."""
    data = bytes(buf)
    state = signature_state(data)
    if state is False:
        raise ProxyProtocolError("bad_signature", "not a PROXY protocol header")
    if state is None:
        return NEED_DATA
    if data.startswith(V1_PREFIX):
        return _parse_v1(data)
    return _parse_v2(data, max_v2_length)


def _parse_v1(data: bytes) -> tuple[ProxyHeader, int] | _NeedData:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        bad = data.find(b"\n", 0, V1_MAX)
        if bad >= 0:
            raise ProxyProtocolError("bad_v1", "v1 header: line ends without CR")
        if len(data) >= V1_MAX:
            raise ProxyProtocolError("too_long", f"v1 header: no CRLF within {V1_MAX} bytes")
        if b"\r" in data[:-1]:  # a lone CR anywhere but last: it is not followed by LF
            raise ProxyProtocolError("bad_v1", "v1 header: CR without LF")
        return NEED_DATA
    line = data[len(V1_PREFIX) : end]
    consumed = end + 2
    if line == b"UNKNOWN" or line.startswith(b"UNKNOWN "):
        # the rest of an UNKNOWN line is to be ignored (section 2.1)
        return ProxyHeader(1), consumed
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise ProxyProtocolError("bad_v1", "v1 header: not ASCII") from None
    parts = text.split(" ")
    if len(parts) != 5:
        raise ProxyProtocolError("bad_v1", "v1 header: expected 5 fields after PROXY")
    proto, src, dst, sport, dport = parts
    if proto not in ("TCP4", "TCP6"):
        raise ProxyProtocolError("bad_v1", f"v1 header: unknown protocol {proto[:8]!r}")
    version = 4 if proto == "TCP4" else 6
    return (
        ProxyHeader(
            1,
            Command.PROXY,
            Family.INET if version == 4 else Family.INET6,
            Transport.STREAM,
            (_v1_ip(src, version), _v1_port(sport)),
            (_v1_ip(dst, version), _v1_port(dport)),
        ),
        consumed,
    )


def _v1_ip(text: str, version: int) -> str:
    try:
        if "%" in text:  # a scope id means nothing to the receiver
            raise ValueError
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyProtocolError("bad_address", f"v1 header: bad address {text[:40]!r}") from None
    if ip.version != version:
        raise ProxyProtocolError("bad_address", f"v1 header: {text} is not IPv{version}")
    return _text(ip)


def _v1_port(text: str) -> int:
    if not text.isdigit() or not text.isascii() or (len(text) > 1 and text[0] == "0"):
        raise ProxyProtocolError("bad_port", f"v1 header: bad port {text[:8]!r}")
    port = int(text)
    if port > 65535:
        raise ProxyProtocolError("bad_port", f"v1 header: port {port} out of range")
    return port


def _parse_v2(data: bytes, max_length: int) -> tuple[ProxyHeader, int] | _NeedData:
    if len(data) < V2_HEADER:
        return NEED_DATA
    ver_cmd, fam_proto = data[12], data[13]
    length = int.from_bytes(data[14:16], "big")
    if ver_cmd >> 4 != 2:
        raise ProxyProtocolError("bad_version", f"v2 header: version {ver_cmd >> 4}")
    try:
        command = Command(ver_cmd & 0x0F)
    except ValueError:
        raise ProxyProtocolError("bad_command", f"v2 header: command {ver_cmd & 0x0F}") from None
    try:
        family = Family(fam_proto >> 4)
        transport = Transport(fam_proto & 0x0F)
    except ValueError:
        raise ProxyProtocolError(
            "bad_family", f"v2 header: family/transport 0x{fam_proto:02x}"
        ) from None
    if length > max_length:
        raise ProxyProtocolError(
            "too_long", f"v2 header: {length} bytes of addresses and TLVs (limit {max_length})"
        )
    need = _ADDRESS_LEN.get(family, 0)
    if length < need:
        raise ProxyProtocolError(
            "bad_length", f"v2 header: length {length} is short of the {need}-byte addresses"
        )
    total = V2_HEADER + length
    if len(data) < total:
        return NEED_DATA
    body = data[V2_HEADER:total]
    if command is Command.LOCAL:
        # a receiver must accept LOCAL and ignore what it carries (section 2.2)
        return ProxyHeader(2, command, family, transport), total
    source, destination = _v2_addresses(family, body[:need])
    tlvs = _parse_tlvs(body[need:])
    crc = next((v for t, v in tlvs if t == PP2_TYPE_CRC32C), None)
    if crc is not None:
        _check_crc(data[:total], need, crc)
    return ProxyHeader(2, command, family, transport, source, destination, tlvs), total


def _text(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """An address as text, IPv4-mapped IPv6 with the IPv4 part dotted (`::ffff:192.0.2.1`),
    as HAProxy writes it and whatever the Python version prints."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return f"::ffff:{ip.ipv4_mapped}"
    return str(ip)


def _v2_addresses(family: Family, raw: bytes) -> tuple[Address | None, Address | None]:
    if family is Family.INET:
        return (
            (str(ipaddress.IPv4Address(raw[0:4])), int.from_bytes(raw[8:10], "big")),
            (str(ipaddress.IPv4Address(raw[4:8])), int.from_bytes(raw[10:12], "big")),
        )
    if family is Family.INET6:
        return (
            (_text(ipaddress.IPv6Address(raw[0:16])), int.from_bytes(raw[32:34], "big")),
            (_text(ipaddress.IPv6Address(raw[16:32])), int.from_bytes(raw[34:36], "big")),
        )
    if family is Family.UNIX:
        return (_unix_path(raw[:_UNIX_ADDR]), 0), (_unix_path(raw[_UNIX_ADDR:]), 0)
    return None, None


def _unix_path(raw: bytes) -> str:
    return raw.split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")


def _parse_tlvs(raw: bytes) -> tuple[tuple[int, bytes], ...]:
    out = []
    pos = 0
    while pos < len(raw):
        if pos + 3 > len(raw):
            raise ProxyProtocolError("bad_tlv", "v2 header: truncated TLV")
        kind = raw[pos]
        n = int.from_bytes(raw[pos + 1 : pos + 3], "big")
        if pos + 3 + n > len(raw):
            raise ProxyProtocolError(
                "bad_tlv", f"v2 header: TLV 0x{kind:02x} of {n} bytes overruns the header"
            )
        value = raw[pos + 3 : pos + 3 + n]
        if kind == PP2_TYPE_CRC32C and n != 4:
            raise ProxyProtocolError("bad_tlv", "v2 header: CRC32C TLV is not 4 bytes")
        if kind == PP2_TYPE_UNIQUE_ID and n > MAX_UNIQUE_ID:
            raise ProxyProtocolError("bad_tlv", f"v2 header: UNIQUE_ID of {n} bytes")
        out.append((kind, value))
        pos += 3 + n
    return tuple(out)


def _check_crc(header: bytes, address_len: int, crc: bytes) -> None:
    # the checksum is over the whole header with its own value zeroed (section 2.2.3)
    zeroed = bytearray(header)
    pos = V2_HEADER + address_len
    while pos < len(zeroed):
        n = int.from_bytes(zeroed[pos + 1 : pos + 3], "big")
        if zeroed[pos] == PP2_TYPE_CRC32C:
            zeroed[pos + 3 : pos + 7] = b"\x00\x00\x00\x00"
            break
        pos += 3 + n
    if crc32c(zeroed).to_bytes(4, "big") != crc:
        raise ProxyProtocolError("bad_crc", "v2 header: CRC32C does not match")


# --- building --------------------------------------------------------------------------------


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def _same_family(source: Address, destination: Address) -> tuple[IP, IP]:
    src, dst = _ip(source[0]), _ip(destination[0])
    if src.version != dst.version:
        # one header holds one family: the IPv4 one goes as IPv4-mapped IPv6
        if src.version == 4:
            src = ipaddress.IPv6Address(f"::ffff:{src}")
        else:
            dst = ipaddress.IPv6Address(f"::ffff:{dst}")
    return src, dst


def encode_v1(source: Address | None, destination: Address | None) -> bytes:
    """A v1 line; UNKNOWN when either address is missing or not IP."""
    try:
        if source is None or destination is None:
            raise ValueError
        src, dst = _same_family(source, destination)
    except ValueError:
        return b"PROXY UNKNOWN\r\n"
    proto = "TCP4" if src.version == 4 else "TCP6"
    line = f"PROXY {proto} {_text(src)} {_text(dst)} {source[1]} {destination[1]}\r\n"
    return line.encode("ascii")


def _tlv(kind: int, value: bytes) -> bytes:
    if not 0 <= kind <= 0xFF or len(value) > 0xFFFF:
        raise ValueError(f"TLV 0x{kind:x} of {len(value)} bytes cannot be encoded")
    return bytes((kind,)) + len(value).to_bytes(2, "big") + value


def encode_v2(
    source: Address | None = None,
    destination: Address | None = None,
    *,
    command: Command = Command.PROXY,
    transport: Transport = Transport.STREAM,
    tlvs: tuple[tuple[int, bytes], ...] | list[tuple[int, bytes]] = (),
    family: Family | None = None,
    checksum: bool = False,
) -> bytes:
    """A v2 header. The family follows the addresses (IPv4-mapped IPv6 when they differ);
    `family=Family.UNIX` takes paths; no addresses gives UNSPEC. `checksum` adds CRC32C."""
    addr = b""
    if family is Family.UNIX:
        assert source is not None and destination is not None
        for path, _ in (source, destination):
            raw = path.encode("utf-8", "surrogateescape")
            if len(raw) > _UNIX_ADDR or b"\x00" in raw:
                raise ValueError(f"UNIX path of {len(raw)} bytes cannot be encoded")
            addr += raw.ljust(_UNIX_ADDR, b"\x00")
    elif source is not None and destination is not None and family is not Family.UNSPEC:
        src, dst = _same_family(source, destination)
        family = Family.INET if src.version == 4 else Family.INET6
        addr = src.packed + dst.packed + source[1].to_bytes(2, "big")
        addr += destination[1].to_bytes(2, "big")
    else:
        family = Family.UNSPEC
    body = addr + b"".join(_tlv(k, v) for k, v in tlvs)
    crc_at = -1
    if checksum:
        crc_at = V2_HEADER + len(body) + 3
        body += _tlv(PP2_TYPE_CRC32C, b"\x00\x00\x00\x00")
    if len(body) > 0xFFFF:
        raise ValueError(f"v2 header of {len(body)} bytes cannot be encoded")
    head = V2_SIGNATURE + bytes((0x20 | command, (family << 4) | transport))
    out = bytearray(head + len(body).to_bytes(2, "big") + body)
    if checksum:
        out[crc_at : crc_at + 4] = crc32c(out).to_bytes(4, "big")
    return bytes(out)


def encode(header: ProxyHeader, *, checksum: bool = False) -> bytes:
    """The bytes of `header` (the inverse of `parse`); a CRC32C TLV in it is computed anew,
    and `checksum` adds one."""
    if header.version == 1:
        return encode_v1(header.source, header.destination)
    tlvs = tuple(t for t in header.tlvs if t[0] != PP2_TYPE_CRC32C)
    checksum = checksum or len(tlvs) != len(header.tlvs)
    if header.command is Command.LOCAL:
        return encode_v2(command=Command.LOCAL, transport=header.transport, tlvs=tlvs)
    return encode_v2(
        header.source,
        header.destination,
        command=header.command,
        transport=header.transport,
        tlvs=tlvs,
        family=header.family,
        checksum=checksum,
    )


def outbound(
    version: str,
    source: Address | None,
    destination: Address | None,
    *,
    identity: str | None = None,
    flow_id: int | None = None,
    authority: str | None = None,
) -> bytes:
    """The header ramp sends an origin: `version` "v1" or "v2"; v2 carries the identity,
    the flow id and the name the client asked for (PP2_TYPE_AUTHORITY) as TLVs."""
    if version == "v1":
        return encode_v1(source, destination)
    if version != "v2":
        raise ValueError(f"unknown PROXY protocol version {version!r}")
    tlvs: list[tuple[int, bytes]] = []
    if authority:
        tlvs.append((PP2_TYPE_AUTHORITY, authority.encode("utf-8")[:255]))
    if identity:
        tlvs.append((PP2_TYPE_RAMP_IDENTITY, identity.encode("utf-8")[:1024]))
    if flow_id is not None:
        tlvs.append((PP2_TYPE_RAMP_FLOW_ID, str(flow_id).encode("ascii")))
    try:
        if source is None or destination is None:
            raise ValueError
        _same_family(source, destination)
    except ValueError:
        return encode_v2(transport=Transport.UNSPEC, tlvs=tlvs)
    return encode_v2(source, destination, tlvs=tlvs)


VERSIONS: Final = ("v1", "v2")
