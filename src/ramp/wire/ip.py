"""IPv4, IPv6, ICMP, ICMPv6, UDP and TCP headers and their checksums (sans-I/O).

Parsing is strict, because these packets come from clients and from the network: lengths must
agree, the IPv4 header checksum and the ICMP/UDP/TCP checksums must be right, and fragments are
refused (the packet path reassembles nothing; RFC 8900 explains why tunnels should not need to).
Every refusal is a `PacketError` whose `reason` is a short label for a counter.

Builders return whole IP packets with every checksum filled in. ICMP errors quote the packet
that caused them as RFC 792 / RFC 1812 section 4.3.2.3 (IPv4: as much as fits in 576 bytes) and
RFC 4443 section 2.4 (IPv6: as much as fits in the minimum MTU, 1,280 bytes) say.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Literal

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58

# IPv6 extension headers (RFC 8200 section 4) that may sit between the fixed header and the
# upper layer: skipped while looking for it. The fragment header is refused instead.
_EXT_HOP_BY_HOP = 0
_EXT_ROUTING = 43
_EXT_FRAGMENT = 44
_EXT_DEST_OPTIONS = 60
_SKIPPED_EXTENSIONS = frozenset((_EXT_HOP_BY_HOP, _EXT_ROUTING, _EXT_DEST_OPTIONS))

IPV4_HEADER = 20
IPV6_HEADER = 40
ICMP_HEADER = 8
UDP_HEADER = 8
TCP_MIN_HEADER = 20
MAX_PACKET = 65535
IPV4_ERROR_LIMIT = 576  # RFC 1812 section 4.3.2.3: an ICMP error packet fits in 576 bytes
IPV6_MIN_MTU = 1280  # RFC 8200 section 5, and RFC 4443's limit for an ICMPv6 error packet

_DF = 0x4000
_MF = 0x2000
_OFFSET_MASK = 0x1FFF

ICMP_ECHO_REPLY = 0
ICMP_DEST_UNREACHABLE = 3
ICMP_ECHO_REQUEST = 8
ICMP_TIME_EXCEEDED = 11
ICMP_PARAMETER_PROBLEM = 12
ICMPV6_DEST_UNREACHABLE = 1
ICMPV6_PACKET_TOO_BIG = 2
ICMPV6_TIME_EXCEEDED = 3
ICMPV6_PARAMETER_PROBLEM = 4
ICMPV6_ECHO_REQUEST = 128
ICMPV6_ECHO_REPLY = 129

ErrorKind = Literal[
    "admin_prohibited",
    "frag_needed",
    "packet_too_big",
    "time_exceeded",
    "port_unreachable",
    "host_unreachable",
    "net_unreachable",
]
ERROR_KINDS: tuple[str, ...] = ErrorKind.__args__  # type: ignore[attr-defined]

# kind -> (type, code) per IP version.
_ERRORS: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {
    "admin_prohibited": ((ICMP_DEST_UNREACHABLE, 13), (ICMPV6_DEST_UNREACHABLE, 1)),
    "frag_needed": ((ICMP_DEST_UNREACHABLE, 4), (ICMPV6_PACKET_TOO_BIG, 0)),
    "packet_too_big": ((ICMP_DEST_UNREACHABLE, 4), (ICMPV6_PACKET_TOO_BIG, 0)),
    "time_exceeded": ((ICMP_TIME_EXCEEDED, 0), (ICMPV6_TIME_EXCEEDED, 0)),
    "port_unreachable": ((ICMP_DEST_UNREACHABLE, 3), (ICMPV6_DEST_UNREACHABLE, 4)),
    "host_unreachable": ((ICMP_DEST_UNREACHABLE, 1), (ICMPV6_DEST_UNREACHABLE, 3)),
    "net_unreachable": ((ICMP_DEST_UNREACHABLE, 0), (ICMPV6_DEST_UNREACHABLE, 0)),
}


class PacketError(ValueError):
    """A packet the parser refuses; `reason` is a short label for a counter."""

    def __init__(self, reason: str, message: str | None = None) -> None:
        super().__init__(message or reason.replace("_", " "))
        self.reason = reason


# --- checksums -------------------------------------------------------------------------------


def checksum(data: bytes | bytearray | memoryview) -> int:
    """The Internet checksum (RFC 1071) of `data`: 0 when `data` holds a correct checksum."""
    if len(data) % 2:
        data = bytes(data) + b"\x00"
    # 65536 = 1 (mod 65535), so the big number modulo 65535 is the one's-complement sum of its
    # 16-bit words, computed in C instead of a Python loop over words.
    n = int.from_bytes(data, "big")
    total = n % 0xFFFF
    if total == 0 and n:
        total = 0xFFFF
    return 0xFFFF - total


def _pseudo_header(src: IPAddress, dst: IPAddress, proto: int, length: int) -> bytes:
    if src.version == 4:
        return src.packed + dst.packed + struct.pack("!xBH", proto, length)
    return src.packed + dst.packed + struct.pack("!I3xB", length, proto)


def pseudo_header_checksum(src: IPAddress, dst: IPAddress, proto: int, upper: bytes) -> int:
    """The checksum of an upper-layer segment (UDP, TCP, ICMPv6) with its pseudo header
    (RFC 768, RFC 9293, RFC 8200 section 8.1): 0 when `upper` holds a correct checksum."""
    return checksum(_pseudo_header(src, dst, proto, len(upper)) + upper)


# --- IP --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Packet:
    """One parsed IP packet. `header` runs to the upper layer (IPv6 extension headers
    included); `payload` is the upper-layer segment; `raw` is the whole packet."""

    version: int
    src: IPAddress
    dst: IPAddress
    proto: int
    ttl: int
    header: bytes
    payload: bytes
    raw: bytes


def parse_packet(data: bytes) -> Packet:
    if not data:
        raise PacketError("truncated", "empty packet")
    version = data[0] >> 4
    if version == 4:
        return _parse_ipv4(bytes(data))
    if version == 6:
        return _parse_ipv6(bytes(data))
    raise PacketError("bad_version", f"IP version {version}")


def _parse_ipv4(data: bytes) -> Packet:
    if len(data) < IPV4_HEADER:
        raise PacketError("truncated", f"{len(data)} bytes is shorter than an IPv4 header")
    header_len = (data[0] & 0x0F) * 4
    if header_len < IPV4_HEADER:
        raise PacketError("bad_header_length", f"IPv4 header length {header_len}")
    if len(data) < header_len:
        raise PacketError("truncated", "IPv4 options cut short")
    total = int.from_bytes(data[2:4], "big")
    if total < header_len:
        raise PacketError("bad_length", f"IPv4 total length {total} < header {header_len}")
    if total > len(data):
        raise PacketError("truncated", f"IPv4 total length {total} > {len(data)} bytes")
    if total < len(data):
        raise PacketError("bad_length", f"{len(data) - total} bytes after the IPv4 packet")
    header = data[:header_len]
    if checksum(header):
        raise PacketError("bad_checksum", "IPv4 header checksum")
    flags = int.from_bytes(data[6:8], "big")
    if flags & (_MF | _OFFSET_MASK):
        raise PacketError("fragment", "IPv4 fragment")
    return Packet(
        version=4,
        src=ipaddress.IPv4Address(data[12:16]),
        dst=ipaddress.IPv4Address(data[16:20]),
        proto=data[9],
        ttl=data[8],
        header=header,
        payload=data[header_len:total],
        raw=data,
    )


def _parse_ipv6(data: bytes) -> Packet:
    if len(data) < IPV6_HEADER:
        raise PacketError("truncated", f"{len(data)} bytes is shorter than an IPv6 header")
    payload_len = int.from_bytes(data[4:6], "big")
    total = IPV6_HEADER + payload_len
    if total > len(data):
        raise PacketError("truncated", f"IPv6 payload length {payload_len} > the bytes given")
    if total < len(data):
        raise PacketError("bad_length", f"{len(data) - total} bytes after the IPv6 packet")
    proto = data[6]
    pos = IPV6_HEADER
    while proto in _SKIPPED_EXTENSIONS:
        if pos + 8 > total:
            raise PacketError("truncated", "IPv6 extension header cut short")
        ext_len = (data[pos + 1] + 1) * 8
        if pos + ext_len > total:
            raise PacketError("truncated", "IPv6 extension header cut short")
        proto = data[pos]
        pos += ext_len
    if proto == _EXT_FRAGMENT:
        raise PacketError("fragment", "IPv6 fragment header")
    return Packet(
        version=6,
        src=ipaddress.IPv6Address(data[8:24]),
        dst=ipaddress.IPv6Address(data[24:40]),
        proto=proto,
        ttl=data[7],
        header=data[:pos],
        payload=data[pos:total],
        raw=data,
    )


def _check_ttl(ttl: int) -> None:
    if not 0 <= ttl <= 255:
        raise ValueError(f"TTL {ttl} out of range")


def build_ipv4(
    src: IPAddress, dst: IPAddress, proto: int, payload: bytes, ttl: int = 64, ident: int = 0
) -> bytes:
    _check_ttl(ttl)
    total = IPV4_HEADER + len(payload)
    if total > MAX_PACKET:
        raise ValueError(f"IPv4 packet of {total} bytes")
    header = bytearray(
        struct.pack(
            "!BBHHHBBH4s4s", 0x45, 0, total, ident, _DF, ttl, proto, 0, src.packed, dst.packed
        )
    )
    header[10:12] = checksum(header).to_bytes(2, "big")
    return bytes(header) + payload


def build_ipv6(
    src: IPAddress, dst: IPAddress, next_header: int, payload: bytes, hop_limit: int = 64
) -> bytes:
    _check_ttl(hop_limit)
    if len(payload) > MAX_PACKET:
        raise ValueError(f"IPv6 payload of {len(payload)} bytes")
    header = struct.pack(
        "!IHBB16s16s", 6 << 28, len(payload), next_header, hop_limit, src.packed, dst.packed
    )
    return header + payload


def build_ip(src: IPAddress, dst: IPAddress, proto: int, payload: bytes, ttl: int = 64) -> bytes:
    """An IPv4 or IPv6 packet, by the version of `src`."""
    if src.version != dst.version:
        raise ValueError(f"{src} and {dst} are of different IP versions")
    if src.version == 4:
        return build_ipv4(src, dst, proto, payload, ttl)
    return build_ipv6(src, dst, proto, payload, ttl)


def with_ttl(packet: bytes, ttl: int) -> bytes:
    """`packet` with its TTL (hop limit) set to `ttl`, the IPv4 header checksum fixed."""
    _check_ttl(ttl)
    if len(packet) < 1:
        raise PacketError("truncated", "empty packet")
    out = bytearray(packet)
    if packet[0] >> 4 == 4:
        if len(packet) < IPV4_HEADER:
            raise PacketError("truncated")
        header_len = (packet[0] & 0x0F) * 4
        if header_len < IPV4_HEADER or header_len > len(packet):
            raise PacketError("bad_header_length")
        out[8] = ttl
        out[10:12] = b"\x00\x00"
        out[10:12] = checksum(out[:header_len]).to_bytes(2, "big")
        return bytes(out)
    if packet[0] >> 4 == 6:
        if len(packet) < IPV6_HEADER:
            raise PacketError("truncated")
        out[7] = ttl
        return bytes(out)
    raise PacketError("bad_version")


def _version_of(src: IPAddress, dst: IPAddress, version: int | None) -> int:
    if src.version != dst.version:
        raise ValueError(f"{src} and {dst} are of different IP versions")
    if version is not None and version != src.version:
        raise ValueError(f"IPv{version} asked for with IPv{src.version} addresses")
    return src.version


# --- ICMP / ICMPv6 ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Icmp:
    """An ICMP or ICMPv6 message. `ident` and `seq` are the two 16-bit halves of the word after
    the checksum: an echo's identifier and sequence number, an error's unused word or MTU.
    `data` follows that word: an echo's payload, or the packet an error quotes."""

    version: int
    type: int
    code: int
    ident: int
    seq: int
    data: bytes

    @property
    def is_echo_request(self) -> bool:
        return self.type == (ICMP_ECHO_REQUEST if self.version == 4 else ICMPV6_ECHO_REQUEST)

    @property
    def is_echo_reply(self) -> bool:
        return self.type == (ICMP_ECHO_REPLY if self.version == 4 else ICMPV6_ECHO_REPLY)

    @property
    def is_error(self) -> bool:
        """An error message (RFC 792 types 3, 4, 5, 11, 12; ICMPv6 types below 128), which no
        ICMP error may answer (RFC 1122 section 3.2.2, RFC 4443 section 2.4)."""
        if self.version == 4:
            return self.type in (3, 4, 5, 11, 12)
        return self.type < 128

    @property
    def mtu(self) -> int:
        """The MTU a "fragmentation needed" (the low 16 bits) or "packet too big" reports."""
        return self.seq if self.version == 4 else (self.ident << 16) | self.seq


def parse_icmp(packet: Packet) -> Icmp:
    wanted = PROTO_ICMP if packet.version == 4 else PROTO_ICMPV6
    if packet.proto != wanted:
        raise PacketError("not_icmp", f"protocol {packet.proto} is not ICMP")
    body = packet.payload
    if len(body) < ICMP_HEADER:
        raise PacketError("truncated", "ICMP header cut short")
    if packet.version == 4:
        bad = checksum(body)
    else:
        bad = pseudo_header_checksum(packet.src, packet.dst, PROTO_ICMPV6, body)
    if bad:
        raise PacketError("bad_checksum", "ICMP checksum")
    icmp_type, code, _, ident, seq = struct.unpack_from("!BBHHH", body)
    return Icmp(packet.version, icmp_type, code, ident, seq, body[ICMP_HEADER:])


def build_icmp(
    src: IPAddress,
    dst: IPAddress,
    icmp_type: int,
    code: int,
    rest: int,
    data: bytes,
    version: int | None = None,
    ttl: int = 64,
) -> bytes:
    """A whole IP packet carrying an ICMP (IPv4) or ICMPv6 (IPv6) message; `rest` is the
    32-bit word after the checksum."""
    version = _version_of(src, dst, version)
    body = bytearray(struct.pack("!BBHI", icmp_type, code, 0, rest) + data)
    if version == 4:
        body[2:4] = checksum(body).to_bytes(2, "big")
        return build_ipv4(src, dst, PROTO_ICMP, bytes(body), ttl)
    body[2:4] = pseudo_header_checksum(src, dst, PROTO_ICMPV6, bytes(body)).to_bytes(2, "big")
    return build_ipv6(src, dst, PROTO_ICMPV6, bytes(body), ttl)


def build_echo(
    src: IPAddress,
    dst: IPAddress,
    ident: int,
    seq: int,
    data: bytes,
    reply: bool,
    version: int | None = None,
    ttl: int = 64,
) -> bytes:
    version = _version_of(src, dst, version)
    if version == 4:
        icmp_type = ICMP_ECHO_REPLY if reply else ICMP_ECHO_REQUEST
    else:
        icmp_type = ICMPV6_ECHO_REPLY if reply else ICMPV6_ECHO_REQUEST
    return build_icmp(src, dst, icmp_type, 0, (ident << 16) | seq, data, version, ttl)


def _original_source(original: bytes) -> tuple[int, IPAddress]:
    if not original:
        raise PacketError("truncated", "no packet to quote")
    version = original[0] >> 4
    if version == 4 and len(original) >= IPV4_HEADER:
        return 4, ipaddress.IPv4Address(original[12:16])
    if version == 6 and len(original) >= IPV6_HEADER:
        return 6, ipaddress.IPv6Address(original[8:24])
    if version in (4, 6):
        raise PacketError("truncated", "the packet to quote has no whole IP header")
    raise PacketError("bad_version", f"IP version {version}")


def build_icmp_error(
    original: bytes, src: IPAddress, kind: str, mtu: int | None = None, ttl: int = 64
) -> bytes:
    """An ICMP error from `src` to the sender of `original`, quoting it. `kind` is one of
    `ERROR_KINDS`; "frag_needed" and "packet_too_big" (the same error in IPv4 and IPv6 words)
    need `mtu`."""
    if kind not in _ERRORS:
        raise ValueError(f"unknown ICMP error kind {kind!r}")
    version, _ = _original_source(original)
    icmp_type, code = _ERRORS[kind][0 if version == 4 else 1]
    rest = 0
    if kind in ("frag_needed", "packet_too_big"):
        if mtu is None:
            raise ValueError(f"{kind} needs the MTU")
        if not 0 < mtu <= (0xFFFF if version == 4 else 0xFFFF_FFFF):
            raise ValueError(f"MTU {mtu} out of range")
        rest = mtu
    return build_icmp_error_typed(original, src, icmp_type, code, rest, ttl)


def build_icmp_error_typed(
    original: bytes, src: IPAddress, icmp_type: int, code: int, rest: int = 0, ttl: int = 64
) -> bytes:
    """An ICMP error of a given type and code (as a router reported it) from `src` to the
    sender of `original`, quoting as much of `original` as the RFCs allow."""
    version, dst = _original_source(original)
    if src.version != version:
        raise ValueError(f"an IPv{version} packet cannot get an error from {src}")
    if version == 4:
        room = IPV4_ERROR_LIMIT - IPV4_HEADER - ICMP_HEADER
    else:
        room = IPV6_MIN_MTU - IPV6_HEADER - ICMP_HEADER
    return build_icmp(src, dst, icmp_type, code, rest, original[:room], version, ttl)


def error_allowed(packet: Packet) -> bool:
    """Whether an ICMP error may answer `packet`: not an ICMP error itself, and not from an
    address no reply can go to (RFC 1122 section 3.2.2, RFC 4443 section 2.4 (e))."""
    src = packet.src
    if src.is_multicast or src.is_unspecified or (src.version == 4 and src == _BROADCAST):
        return False
    if packet.proto == (PROTO_ICMP if packet.version == 4 else PROTO_ICMPV6):
        if len(packet.payload) < 1:
            return False
        icmp_type = packet.payload[0]
        return not (icmp_type in (3, 4, 5, 11, 12) if packet.version == 4 else icmp_type < 128)
    return True


_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


def quoted_echo(icmp: Icmp) -> tuple[Packet, Icmp] | None:
    """The echo request an ICMP error quotes (its IP packet and ICMP header), or None when the
    quote is not of an echo request or too short to tell. The quoted packet may be cut short,
    so only its headers are read and no checksum is checked."""
    data = icmp.data
    if not data or data[0] >> 4 != icmp.version:
        return None
    if icmp.version == 4:
        if len(data) < IPV4_HEADER:
            return None
        header_len = (data[0] & 0x0F) * 4
        if header_len < IPV4_HEADER or len(data) < header_len + ICMP_HEADER:
            return None
        proto, ttl = data[9], data[8]
        src, dst = ipaddress.IPv4Address(data[12:16]), ipaddress.IPv4Address(data[16:20])
        wanted = (PROTO_ICMP, ICMP_ECHO_REQUEST)
    else:
        header_len = IPV6_HEADER
        if len(data) < header_len + ICMP_HEADER:
            return None
        proto, ttl = data[6], data[7]
        src, dst = ipaddress.IPv6Address(data[8:24]), ipaddress.IPv6Address(data[24:40])
        wanted = (PROTO_ICMPV6, ICMPV6_ECHO_REQUEST)
    body = data[header_len:]
    if (proto, body[0]) != wanted:
        return None
    _, code, _, ident, seq = struct.unpack_from("!BBHHH", body)
    packet = Packet(icmp.version, src, dst, proto, ttl, data[:header_len], body, data)
    return packet, Icmp(icmp.version, body[0], code, ident, seq, body[ICMP_HEADER:])


# --- UDP and TCP -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Udp:
    sport: int
    dport: int
    payload: bytes


def parse_udp(packet: Packet) -> Udp:
    if packet.proto != PROTO_UDP:
        raise PacketError("not_udp", f"protocol {packet.proto} is not UDP")
    body = packet.payload
    if len(body) < UDP_HEADER:
        raise PacketError("truncated", "UDP header cut short")
    sport, dport, length, check = struct.unpack_from("!HHHH", body)
    if length != len(body):
        raise PacketError("bad_length", f"UDP length {length} in {len(body)} bytes")
    if sport == 0 or dport == 0:
        raise PacketError("bad_port", "UDP port 0")
    # RFC 768: an IPv4 UDP checksum of 0 means none was computed; RFC 8200 makes it mandatory.
    if (check or packet.version == 6) and pseudo_header_checksum(
        packet.src, packet.dst, PROTO_UDP, body
    ):
        raise PacketError("bad_checksum", "UDP checksum")
    return Udp(sport, dport, body[UDP_HEADER:])


def _udp_segment(src: IPAddress, dst: IPAddress, sport: int, dport: int, payload: bytes) -> bytes:
    length = UDP_HEADER + len(payload)
    if length > 0xFFFF:
        raise ValueError(f"UDP payload of {len(payload)} bytes")
    segment = bytearray(struct.pack("!HHHH", sport, dport, length, 0) + payload)
    check = pseudo_header_checksum(src, dst, PROTO_UDP, bytes(segment)) or 0xFFFF
    segment[6:8] = check.to_bytes(2, "big")
    return bytes(segment)


def build_udp(
    src: IPAddress,
    dst: IPAddress,
    sport: int,
    dport: int,
    payload: bytes,
    version: int | None = None,
    ttl: int = 64,
) -> bytes:
    """A whole IP packet carrying one UDP datagram, checksums right."""
    _version_of(src, dst, version)
    return build_ip(src, dst, PROTO_UDP, _udp_segment(src, dst, sport, dport, payload), ttl)


@dataclass(frozen=True, slots=True)
class Tcp:
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    window: int
    header_len: int
    payload: bytes

    FIN = 0x01
    SYN = 0x02
    RST = 0x04
    PSH = 0x08
    ACK = 0x10


def parse_tcp_ports(packet: Packet) -> tuple[int, int]:
    """The source and destination ports of a TCP segment, for a flow key."""
    if packet.proto != PROTO_TCP:
        raise PacketError("not_tcp", f"protocol {packet.proto} is not TCP")
    if len(packet.payload) < TCP_MIN_HEADER:
        raise PacketError("truncated", "TCP header cut short")
    sport, dport = struct.unpack_from("!HH", packet.payload)
    return sport, dport


def parse_tcp(packet: Packet) -> Tcp:
    sport, dport = parse_tcp_ports(packet)
    body = packet.payload
    seq, ack, offset, flags, window = struct.unpack_from("!IIBBH", body, 4)
    header_len = (offset >> 4) * 4
    if header_len < TCP_MIN_HEADER or header_len > len(body):
        raise PacketError("bad_header_length", f"TCP header length {header_len}")
    if pseudo_header_checksum(packet.src, packet.dst, PROTO_TCP, body):
        raise PacketError("bad_checksum", "TCP checksum")
    return Tcp(sport, dport, seq, ack, flags, window, header_len, body[header_len:])


def rewrite(
    packet: Packet,
    *,
    src: IPAddress | None = None,
    dst: IPAddress | None = None,
    sport: int | None = None,
    dport: int | None = None,
) -> bytes:
    """`packet` with addresses and (TCP/UDP) ports replaced and every checksum recomputed: the
    NAT step of the packet path. Ports of other protocols cannot be replaced."""
    new_src = src or packet.src
    new_dst = dst or packet.dst
    if new_src.version != packet.version or new_dst.version != packet.version:
        raise ValueError("rewrite cannot change the IP version")
    body = bytearray(packet.payload)
    if sport is not None or dport is not None:
        if packet.proto not in (PROTO_TCP, PROTO_UDP) or len(body) < 4:
            raise ValueError(f"protocol {packet.proto} has no ports to rewrite")
        if sport is not None:
            body[0:2] = sport.to_bytes(2, "big")
        if dport is not None:
            body[2:4] = dport.to_bytes(2, "big")
    check_at = {PROTO_TCP: 16, PROTO_UDP: 6, PROTO_ICMPV6: 2}.get(packet.proto)
    if check_at is not None and len(body) >= check_at + 2:
        keep_none = packet.proto == PROTO_UDP and packet.version == 4 and body[6:8] == b"\0\0"
        if not keep_none:
            body[check_at : check_at + 2] = b"\0\0"
            check = pseudo_header_checksum(new_src, new_dst, packet.proto, bytes(body))
            if packet.proto == PROTO_UDP:
                check = check or 0xFFFF
            body[check_at : check_at + 2] = check.to_bytes(2, "big")
    header = bytearray(packet.header)
    if packet.version == 4:
        header[12:16] = new_src.packed
        header[16:20] = new_dst.packed
        header[10:12] = b"\0\0"
        header[10:12] = checksum(header).to_bytes(2, "big")
    else:
        header[8:24] = new_src.packed
        header[24:40] = new_dst.packed
    return bytes(header) + bytes(body)
